"""The properties every architecture must have, checked on a tiny model of each (PEFT-style)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.data.batching import collate
from lofit.evaluation.scoring import sft_loss
from lofit.methods.lofit.adapter_io import AdapterMismatchError
from lofit.methods.lofit.merge import NotExportableError, save_merged
from lofit.methods.lofit.steps import select_heads, tune_biases
from lofit.models.architectures import ARCHITECTURES, architecture_row, head_layout, projection_weight
from lofit.training.objectives import SFT

from .conftest import ARCHITECTURE_NAMES, PAD, input_batch, randomize_adapter, synthetic_pairs, tiny_model


def logits(model, **batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_every_table_row_is_tested_and_most_types_are_located_automatically():
    """Rows are exceptions (tests/test_head_location.py checks each is needed); the rest of the
    matrix runs on rows read off the module tree."""
    assert set(ARCHITECTURES) <= set(ARCHITECTURE_NAMES)
    assert len(set(ARCHITECTURE_NAMES) - set(ARCHITECTURES)) >= 25


def test_identity_at_init(model_type):
    model = tiny_model(model_type)
    batch = input_batch()
    before = logits(model, **batch)
    lofit_model = get_lofit_model(model)
    assert torch.equal(logits(lofit_model, **batch), before)


def test_intervention_matches_independent_reference(model_type):
    """z'_h = (1 + A[l,h]) z_h + v[l,h], computed by a plain per-head loop in a hook of the test's own."""
    model = tiny_model(model_type)
    lofit_model = get_lofit_model(model)
    randomize_adapter(lofit_model)
    lofit_model.set_active_heads([(0, 1), (1, 0), (1, 3), (2, 2)])
    batch = input_batch()
    hooked = logits(lofit_model, **batch)

    layout = head_layout(model)
    scale, bias, active = lofit_model.lofit_scale.detach(), lofit_model.lofit_bias.detach(), lofit_model.active_heads
    d = layout.head_dim

    def reference_hook(layer):
        def hook(module, args):
            x = args[0].clone()
            for h in range(layout.num_heads):
                if active[layer, h]:
                    x[..., h * d : (h + 1) * d] = x[..., h * d : (h + 1) * d] * (1 + scale[layer, h]) + bias[layer, h]
            return (x,)

        return hook

    handles = [proj.register_forward_pre_hook(reference_hook(layer)) for layer, proj in enumerate(layout.out_projs)]
    with lofit_model.disable_adapter():
        reference = logits(model, **batch)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(hooked, reference, rtol=1e-5, atol=1e-5)
    with lofit_model.disable_adapter():
        assert not torch.allclose(logits(lofit_model, **batch), hooked, atol=1e-4)


def test_training_changes_only_adapter_parameters(model_type):
    model = tiny_model(model_type)
    frozen = copy.deepcopy(model.state_dict())
    lofit_model = get_lofit_model(
        model, LofitConfig(num_heads=3, select_epochs=2, tune_epochs=2, batch_size=4, scale_lr=1e-2, bias_lr=1e-1)
    )
    pairs = synthetic_pairs()
    ranking, _ = select_heads(lofit_model, SFT(pairs, PAD), progress=False)
    assert lofit_model.lofit_scale.detach().abs().sum() > 0
    assert not lofit_model.lofit_bias.detach().any()
    heads = ranking.top(3)
    tune_biases(lofit_model, SFT(pairs, PAD), heads, progress=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, frozen[name]), name
    assert not lofit_model.lofit_scale.detach().any()
    moved = {tuple(p) for p in lofit_model.lofit_bias.detach().norm(dim=-1).nonzero().tolist()}
    assert moved == set(heads)
    assert lofit_model.num_adapter_parameters() == 3 * head_layout(model).head_dim


def test_save_load_round_trip_is_exact(model_type, tmp_path):
    lofit_model = get_lofit_model(tiny_model(model_type))
    randomize_adapter(lofit_model)
    lofit_model.set_active_heads([(2, 3), (0, 0), (1, 2)])
    batch = input_batch()
    expected = logits(lofit_model, **batch)
    lofit_model.save_pretrained(tmp_path, metrics={"exact_match": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = LofitModel.from_pretrained(tiny_model(model_type), tmp_path)
    assert torch.equal(logits(loaded, **batch), expected)
    assert loaded.selected_heads == lofit_model.selected_heads


def test_adapter_for_another_model_is_refused(model_type, tmp_path):
    lofit_model = get_lofit_model(tiny_model(model_type))
    randomize_adapter(lofit_model)
    lofit_model.save_pretrained(tmp_path)
    other = "gpt2" if model_type != "gpt2" else "llama"
    with pytest.raises(AdapterMismatchError, match="another model"):
        LofitModel.from_pretrained(tiny_model(other), tmp_path)


def test_merged_equals_hooked(model_type):
    lofit_model = get_lofit_model(tiny_model(model_type))
    randomize_adapter(lofit_model)
    lofit_model.set_active_heads([(0, 2), (2, 1), (1, 1)])
    batch = input_batch()
    hooked = logits(lofit_model, **batch)
    merged = lofit_model.merge_and_unload()
    assert not any(module._forward_pre_hooks for module in merged.modules())
    torch.testing.assert_close(logits(merged, **batch), hooked, rtol=1e-5, atol=1e-5)


def test_merged_checkpoint_loads_in_plain_transformers(model_type, tmp_path):
    lofit_model = get_lofit_model(tiny_model(model_type))
    randomize_adapter(lofit_model)
    batch = input_batch()
    hooked = logits(lofit_model, **batch)
    merged = lofit_model.merge_and_unload()
    if architecture_row(merged).bias_flag is None:
        with pytest.raises(NotExportableError, match="Exportable model types"):
            save_merged(merged, None, tmp_path)
        return
    save_merged(merged, None, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, **batch), hooked, rtol=1e-5, atol=1e-5)


def test_generate_with_kv_cache_and_left_padding_matches_full_recompute(model_type):
    lofit_model = get_lofit_model(tiny_model(model_type))
    randomize_adapter(lofit_model, scale=1.0)
    input_ids = torch.tensor([[PAD, PAD, 5, 9, 14, 3], [7, 8, 9, 10, 11, 12]])
    attention_mask = (input_ids != PAD).long()
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    cached = lofit_model.generate(**kwargs, use_cache=True)
    recomputed = lofit_model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step_cached, step_full in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(step_cached, step_full, rtol=1e-4, atol=1e-4)
    with lofit_model.disable_adapter():
        plain = lofit_model.generate(**kwargs, use_cache=True)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(plain.logits, cached.logits))


def test_sft_loss_only_scores_completion_tokens(model_type):
    """Changing a prompt token's target never changes the loss; changing a completion token does."""
    lofit_model = get_lofit_model(tiny_model(model_type))
    pairs = synthetic_pairs(3)
    batch = collate(pairs, PAD)
    assert batch.targets.tolist() == [t for p in pairs for t in p.completion_ids]
    with torch.no_grad():
        loss = sft_loss(lofit_model, batch)
        full = lofit_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logprobs = torch.log_softmax(full.float(), -1)
    expected = []
    for row, pair in enumerate(pairs):
        start = len(pair.prompt_ids)
        for offset, token in enumerate(pair.completion_ids):
            expected.append(-logprobs[row, start - 1 + offset, token])
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-5)


def test_scale_merge_keeps_head_columns_separate():
    """b += W[:, head] @ v: only the column block of each head contributes (projected, not copied)."""
    lofit_model = get_lofit_model(tiny_model("llama"))
    layout = lofit_model.layout
    with torch.no_grad():
        lofit_model.lofit_bias[1, 2] = torch.arange(layout.head_dim, dtype=torch.float32)
    lofit_model.set_active_heads([(1, 2)])
    weight = projection_weight(layout.out_projs[1]).detach().clone()
    merged = lofit_model.merge_and_unload()
    d = layout.head_dim
    expected = weight[:, 2 * d : 3 * d] @ torch.arange(d, dtype=torch.float32)
    torch.testing.assert_close(merged.model.layers[1].self_attn.o_proj.bias, expected)
    assert merged.model.layers[0].self_attn.o_proj.bias.abs().max() == 0
