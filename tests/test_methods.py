"""Every method on tiny random models: identity when untrained, fitting changes the output,
the parameter count, the save/load round trip, a result for another model refused."""

from __future__ import annotations

import random

import pytest
import torch

from lofit import LofitConfig, get_lofit_model
from lofit.methods import METHODS, FitContext, get_method, load_adapted, saved_method
from lofit.methods.iti import ItiConfig
from lofit.methods.lofit.adapter_io import AdapterMismatchError
from lofit.methods.lora import LoraBaselineConfig
from lofit.methods.red import RedModel
from lofit.methods.reft import ReftConfig, ReftModel, prompt_positions
from lofit.methods.repe import RepeConfig, ResidualShiftModel
from lofit.tasks.base import PromptCompletion, PromptPreference

from .conftest import input_batch, tiny_model, word_tokenizer

ARCHITECTURES = ["llama", "gpt2", "gemma2"]
TRAINED = ["lofit", "iti", "repe", "lora", "red", "reft"]
SETTINGS = LofitConfig(num_heads=3, select_epochs=1, tune_epochs=2, batch_size=4, bias_lr=1e-1, scale_lr=1e-2)
CONFIGS = {
    "iti": ItiConfig(iti_num_heads=3, iti_alpha=5.0),
    "repe": RepeConfig(repe_num_layers=2, repe_coefficient=4.0),
    "lora": LoraBaselineConfig(lora_rank=2, lora_lr=5e-2, lora_targets="c_attn,q_proj,v_proj"),
}


def sft_examples(n: int = 16, seed: int = 0) -> list[PromptCompletion]:
    """'Q: <words> A:' answered 'yes' when the first word is 'sky', else 'no'."""
    rng = random.Random(seed)
    words = ["sky", "blue", "red", "maybe"]
    examples = []
    for _ in range(n):
        body = [rng.choice(words) for _ in range(rng.randrange(2, 5))]
        examples.append(PromptCompletion("Q: " + " ".join(body) + " A:", "yes" if body[0] == "sky" else "no"))
    return examples


def context(model_type: str, examples=None) -> FitContext:
    return FitContext(
        model=tiny_model(model_type),
        tokenizer=word_tokenizer(),
        examples=examples or sft_examples(),
        lofit=SETTINGS,
        progress=False,
    )


def logits(model, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v.clamp(max=9) for k, v in input_batch(seed).items()}).logits


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_untrained_interventions_are_the_identity(model_type):
    from peft import LoraConfig, get_peft_model

    base = logits(tiny_model(model_type))
    lora = lambda m: get_peft_model(m, LoraConfig(r=2, target_modules=["c_attn", "q_proj", "v_proj"]))  # noqa: E731
    wrappers = (
        RedModel,
        ResidualShiftModel,
        lambda m: ReftModel(m, ReftConfig(reft_positions="first+last")),
        lora,
        lambda m: get_lofit_model(m),
    )
    for wrap in wrappers:
        model = wrap(tiny_model(model_type))
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("name", TRAINED)
def test_fitting_changes_the_output_and_the_result_round_trips(name, model_type, tmp_path):
    fit_context = context(model_type)
    base = logits(fit_context.model)
    method = get_method(name, CONFIGS.get(name))
    result = method.fit(fit_context)
    fitted = logits(result.model)
    assert not torch.allclose(fitted, base, atol=1e-4)
    assert result.trained_parameters > 0
    method.save(result, tmp_path / "saved", {"note": 1})
    assert saved_method(tmp_path / "saved") == name
    reloaded = load_adapted(tiny_model(model_type), tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded), fitted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TRAINED)
def test_a_result_for_another_model_is_refused(name, tmp_path):
    method = get_method(name, CONFIGS.get(name))
    method.save(method.fit(context("llama")), tmp_path / "saved")
    with pytest.raises((AdapterMismatchError, ValueError), match="another model|model_type|shape|size"):
        load_adapted(tiny_model("gpt2"), tmp_path / "saved")


def test_zero_shot_is_the_frozen_model(tmp_path):
    fit_context = context("llama")
    result = get_method("zero-shot").fit(fit_context)
    assert result.model is fit_context.model and result.trained_parameters == 0
    get_method("zero-shot").save(result, tmp_path / "z")
    assert load_adapted(fit_context.model, tmp_path / "z") is fit_context.model


def test_parameter_counts():
    layers, hidden = 3, 32  # the tiny llama: 3 layers, hidden 32, 4 query heads of 8, 2 key-value heads
    assert RedModel(tiny_model("llama")).num_trainable_parameters() == 2 * layers * hidden
    reft = ReftModel(tiny_model("llama"), ReftConfig(reft_rank=2, reft_layers="0,2"))
    assert reft.num_trainable_parameters() == 2 * (2 * 2 * hidden + 2)  # R, W (rank x hidden) and b per layer
    assert get_method("iti", ItiConfig(iti_num_heads=3)).fit(context("llama")).trained_parameters == 3 * 8
    assert get_method("repe", RepeConfig(repe_num_layers=2)).fit(context("llama")).trained_parameters == 2 * hidden
    lora = get_method("lora", LoraBaselineConfig(lora_rank=2, lora_epochs=1)).fit(context("llama"))
    q_in, q_out, v_out = hidden, 4 * 8, 2 * 8  # 2 key-value heads of 8
    assert lora.trained_parameters == layers * 2 * ((q_in + q_out) + (q_in + v_out))
    assert get_method("lofit").fit(context("llama")).trained_parameters == 3 * 8


def test_reft_edits_only_the_last_prompt_position():
    model = ReftModel(tiny_model("llama"), ReftConfig(reft_layers="0"))
    with torch.no_grad():
        model.edits[0].source.bias.fill_(1.0)
        batch = {k: v.clamp(max=9) for k, v in input_batch(1, batch=2, length=6).items()}
        keep = torch.zeros(2, 6, dtype=torch.bool)
        keep[0, 3:5] = keep[1, 2:5] = True  # prompts of 4 and 3 tokens, then their completions
        assert prompt_positions((2, 6), None, keep, "last", torch.device("cpu")).flatten().tolist() == [3, 2]
        edited = model(**batch, logits_to_keep=keep, output_hidden_states=True).hidden_states[1]
        with model.disable_adapter():
            plain = model(**batch, output_hidden_states=True).hidden_states[1]
    changed = (edited - plain).abs().amax(dim=-1) > 1e-6
    assert changed[0].nonzero().flatten().tolist() == [3] and changed[1].nonzero().flatten().tolist() == [2]


def test_preference_data_drives_the_learning_free_methods():
    examples = [PromptPreference(e.prompt, e.completion, "maybe") for e in sft_examples()]
    base = logits(tiny_model("llama"))
    iti = get_method("iti", ItiConfig(iti_num_heads=2)).fit(context("llama", examples))
    repe = get_method("repe", RepeConfig(repe_num_layers=1)).fit(context("llama", examples))
    assert len(iti.model.selected_heads) == 2 and repe.trained_parameters == 32
    assert not torch.allclose(logits(iti.model), base, atol=1e-4) and not torch.allclose(
        logits(repe.model), base, atol=1e-4
    )


def test_every_method_is_registered():
    assert set(METHODS) == {"lofit", "zero-shot", "iti", "repe", "lora", "red", "reft"}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_reft_generation_with_kv_cache_edits_only_the_prompt_end(model_type):
    """Greedy tokens from generate (KV cache, left padding) equal the argmax of one full forward
    that edits the last prompt position only."""
    model = ReftModel(tiny_model(model_type), ReftConfig(reft_positions="first+last"))
    with torch.no_grad():
        for edit in model.edits:
            edit.source.bias.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    prompts = [[5, 6, 7, 8, 9], [7, 8, 9]]
    width, new = 5, 4
    input_ids = torch.tensor([prompts[0], [0, 0, *prompts[1]]])
    attention_mask = (torch.arange(width) >= torch.tensor([[0], [2]])).long()
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, width:]
    with torch.no_grad():
        full = torch.cat([input_ids, generated], dim=1)
        mask = torch.cat([attention_mask, torch.ones_like(generated)], dim=1)
        keep = torch.zeros_like(full, dtype=torch.bool)
        keep[:, width - 1 : -1] = True  # predicting the generated tokens; the first True is the prompt end
        logits = model(input_ids=full, attention_mask=mask, logits_to_keep=keep).logits.view(2, new, -1)
        with model.disable_adapter():
            plain = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )[:, width:]
    assert torch.equal(logits.argmax(dim=-1), generated)
    assert not torch.equal(plain, generated)  # the edit matters


@pytest.mark.parametrize("name", ["lofit", "lora", "red", "reft"])
def test_trained_methods_learn_preferences_with_dpo(name):
    """DPO against the model with the method's adapter disabled: the loss starts at log 2 and falls."""
    examples = [PromptPreference(e.prompt, e.completion, "maybe") for e in sft_examples()]
    result = get_method(name, CONFIGS.get(name)).fit(context("llama", examples))
    losses = result.log.get("train_losses") or result.log["tune_losses"]
    assert losses[-1] < losses[0] < 0.6932


def test_repe_reading_vector_finds_the_axis_that_separates_pairs():
    """Positives sit 3 units along e0 from their negatives; e1 carries larger, unpaired noise."""
    from lofit.methods.repe import reading_vectors

    generator = torch.Generator().manual_seed(0)
    n, layers, hidden = 40, 2, 6
    positive = torch.randn(n, layers, hidden, generator=generator)
    negative = positive.clone()
    negative[..., 0] -= 3.0
    negative[..., 1] += 2.0 * torch.randn(n, layers, generator=generator)
    reading = reading_vectors(
        torch.cat([positive, negative]), torch.cat([torch.ones(n), torch.zeros(n)]), torch.arange(n).repeat(2), seed=0
    )
    assert (reading.vectors[:, 0] > 0.99).all() and (reading.accuracy == 1).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: ItiConfig(iti_num_heads=0),
        lambda: ItiConfig(iti_num_heads=2.5),
        lambda: RepeConfig(repe_num_layers=0),
        lambda: LoraBaselineConfig(lora_rank=0),
        lambda: LoraBaselineConfig(lora_lr=-1.0),
        lambda: ReftConfig(reft_positions="middle"),
        lambda: ReftConfig(reft_epochs=-1),
        lambda: ReftConfig(reft_layers="1,x").layer_indices(3),
        lambda: ReftConfig(reft_layers="7").layer_indices(3),
    ],
)
def test_bad_method_options_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_a_method_refuses_another_method_s_config_and_unknown_names():
    with pytest.raises(TypeError, match="takes a ItiConfig"):
        get_method("iti", ReftConfig())
    with pytest.raises(TypeError, match="no options"):
        get_method("zero-shot", ReftConfig())
    with pytest.raises(ValueError, match="unknown method 'ia3'"):
        get_method("ia3")


def test_an_incomplete_saved_result_is_reported(tmp_path):
    method = get_method("red")
    method.save(method.fit(context("llama")), tmp_path / "saved")
    (tmp_path / "saved" / "red.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="red.safetensors is missing"):
        load_adapted(tiny_model("llama"), tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match="nothing saved by lofit"):
        load_adapted(tiny_model("llama"), tmp_path / "elsewhere")


def test_reft_scores_multiple_choice_on_whole_prompts():
    """With a shared few-shot prefix, LoReFT is not given a cached prefix: it edits the same
    positions as when each prompt carries the prefix itself."""
    from lofit.evaluation.multiple_choice import MultipleChoiceExample, choice_logprobs

    model = ReftModel(tiny_model("llama"), ReftConfig(reft_positions="first+last"))
    with torch.no_grad():
        for edit in model.edits:
            edit.source.bias.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    tokenizer = word_tokenizer()
    examples = [MultipleChoiceExample(" Q: sky A:", (" yes", " no maybe"), (1, 0), best=0)]
    prefix = "Q: red A: no"
    shared = choice_logprobs(model, tokenizer, examples, prefix=prefix, progress=False)
    whole = choice_logprobs(
        model,
        tokenizer,
        [MultipleChoiceExample(prefix + e.prompt, e.choices, e.labels, e.best) for e in examples],
        progress=False,
    )
    with model.disable_adapter():
        plain = choice_logprobs(model, tokenizer, examples, prefix=prefix, progress=False)
    assert shared[0] == pytest.approx(whole[0], abs=1e-5) and shared[0] != pytest.approx(plain[0], abs=1e-3)
