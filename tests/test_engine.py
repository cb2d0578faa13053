"""The training engine: precision, gradient accumulation, checkpoints and resume, guards,
gradient checkpointing, placement, and the caller's random state."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.utils import counters

from lofit import LofitConfig, get_lofit_model, load_model
from lofit.cli import main
from lofit.methods import FitContext, get_method
from lofit.methods.lofit.intervention import HeadIntervention
from lofit.methods.lofit.steps import select_heads, tune_biases
from lofit.models.architectures import decoder_layers
from lofit.tasks import PromptCompletion, UserFileTask
from lofit.training import loop as training
from lofit.training.checkpoints import checkpoint_folders, stage_progress
from lofit.training.loop import (
    CheckpointPolicy,
    NonFiniteLossError,
    TrainingRun,
    TrainingSetup,
    epoch_batches,
    gradient_checkpointing,
    train,
)
from lofit.training.objectives import SFT, Objective
from lofit.training.prefix_cache import PrefixCache
from lofit.utils.compute import ComputeConfig, resolve_device

from .conftest import PAD, randomize_adapter, synthetic_pairs, tiny_model, word_tokenizer
from .tiny_run import tiny_model_folder, write_task

CONFIG = LofitConfig(
    num_heads=4, select_epochs=2, tune_epochs=3, batch_size=4, scale_lr=1e-2, bias_lr=5e-2, l1_lambda=1e-3
)
HEADS = [(0, 1), (1, 2), (2, 0), (2, 3)]
ABOVE_LAYER_0 = [(1, 0), (1, 2), (2, 1)]
"""Heads with a frozen layer below them, so that step 2 runs with the prefix cache by default."""


def tuned_bias(
    setup: TrainingSetup | None = None, objective=None, model_type: str = "llama", heads=HEADS
) -> torch.Tensor:
    lofit_model = get_lofit_model(tiny_model(model_type), CONFIG)
    tune_biases(lofit_model, objective or SFT(synthetic_pairs(14), PAD), heads, progress=False, setup=setup)
    return lofit_model.lofit_bias.detach().clone()


class Interrupting(SFT):
    """SFT that raises KeyboardInterrupt on its ``at``-th forward pass, as a killed run would stop."""

    def __init__(self, at: int):
        super().__init__(synthetic_pairs(14), PAD)
        self.at, self.calls = at, 0

    def loss_sum(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().loss_sum(model, batch)


class NanAt(SFT):
    """SFT whose loss is NaN on its ``at``-th forward pass."""

    def __init__(self, at: int):
        super().__init__(synthetic_pairs(14), PAD)
        self.at, self.calls = at, 0

    def loss_sum(self, model, batch):
        self.calls += 1
        loss = super().loss_sum(model, batch)
        return loss * math.nan if self.calls == self.at else loss


def test_gradient_accumulation_gives_the_same_adapter():
    """Micro-batches are normalised by the whole batch's token count: same gradient, same adapter."""
    plain = tuned_bias()
    accumulated = tuned_bias(TrainingSetup(ComputeConfig(gradient_accumulation_steps=3)))
    assert torch.allclose(plain, accumulated, atol=1e-6)


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(monkeypatch):
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 instructions"):
        training.make_accelerator("bf16", torch.device("cpu"))
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training.make_accelerator("bf16", torch.device("cpu"))
    assert not [w for w in caught if "no bf16 instructions" in str(w.message)]


def test_bf16_mixed_precision_follows_float32():
    def losses(precision: str):
        lofit_model = get_lofit_model(tiny_model("llama"), CONFIG)
        _, log = select_heads(
            lofit_model,
            SFT(synthetic_pairs(16), PAD),
            progress=False,
            setup=TrainingSetup(ComputeConfig(mixed_precision=precision)),
        )
        return log.epoch_losses, lofit_model.lofit_scale.dtype

    full, dtype_full = losses("no")
    half, dtype_half = losses("bf16")
    assert dtype_full == dtype_half == torch.float32  # master weights stay float32
    assert half != full  # autocast really ran in bf16
    assert all(abs(h - f) / f < 0.03 for h, f in zip(half, full))
    assert half[-1] < half[0]


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path):
    uninterrupted = tuned_bias()
    policy = CheckpointPolicy(tmp_path, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        tuned_bias(TrainingSetup(checkpoints=policy), objective=Interrupting(at=8))
    assert [p.name for p in checkpoint_folders(tmp_path / "tune")] == ["step-4", "step-6"]
    resumed = tuned_bias(TrainingSetup(checkpoints=CheckpointPolicy(tmp_path, save_steps=2, resume=True)))
    assert torch.allclose(resumed, uninterrupted, atol=1e-6)


def test_resume_refuses_a_checkpoint_of_another_setup(tmp_path):
    tuned_bias(TrainingSetup(checkpoints=CheckpointPolicy(tmp_path)))
    lofit_model = get_lofit_model(tiny_model("llama"), LofitConfig(**CONFIG.to_dict() | {"bias_lr": 0.1}))
    with pytest.raises(ValueError, match="belongs to another training setup.*lr 0.05 vs 0.1"):
        tune_biases(
            lofit_model,
            SFT(synthetic_pairs(14), PAD),
            HEADS,
            progress=False,
            setup=TrainingSetup(checkpoints=CheckpointPolicy(tmp_path, resume=True)),
        )


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    policy = CheckpointPolicy(tmp_path, save_steps=1)
    lofit_model = get_lofit_model(tiny_model("llama"), CONFIG)
    with pytest.raises(
        NonFiniteLossError, match=r"loss became nan at step 3 of 12 \(epoch 1\).*step-2.*--bias-lr 0.05"
    ):
        tune_biases(lofit_model, NanAt(at=3), HEADS, progress=False, setup=TrainingSetup(checkpoints=policy))
    assert checkpoint_folders(tmp_path / "tune")[-1].name == "step-2"
    assert torch.isfinite(lofit_model.lofit_bias).all()


class ScriptedLoss(Objective):
    """A stand-in objective whose n-th loss (from 1) is ``loss(n)``."""

    def __init__(self, parameter: nn.Parameter, loss, items: int = 8):
        self.items, self.pad_id, self.parameter, self.loss_of_call, self.calls = (
            list(range(items)),
            PAD,
            parameter,
            loss,
            0,
        )

    def collate(self, items):
        class Batch:
            weight = 1

            def to(self, device):
                return self

        return Batch()

    def loss_sum(self, model, batch):
        self.calls += 1
        return self.parameter.sum() * 0 + self.loss_of_call(self.calls)


def test_a_climbing_loss_is_reported_as_divergence_naming_the_learning_rate():
    parameter = nn.Parameter(torch.zeros(2))
    run = TrainingRun(
        parameters=[parameter], lr=0.5, epochs=2, batch_size=4, seed=0, progress=False, lr_name="--bias-lr"
    )
    rising = ScriptedLoss(parameter, lambda call: 1.0 if call <= 2 else 3.0)  # 1 in the first epoch, 3 after
    with pytest.warns(
        UserWarning, match="diverging: epoch 2 mean 3.000 against 1.000 over the first 2 steps.*--bias-lr 0.5"
    ):
        log = train(tiny_model("llama"), rising, run)
    assert len(log.warnings) == 1


def test_a_loss_that_explodes_within_the_first_steps_is_reported_against_the_first_step():
    # 8 steps per epoch: the first steps' mean (8.9) is inflated by the explosion itself
    parameter = nn.Parameter(torch.zeros(2))
    run = TrainingRun(
        parameters=[parameter], lr=0.05, epochs=1, batch_size=4, seed=0, progress=False, lr_name="--bias-lr"
    )
    exploding = ScriptedLoss(parameter, lambda call: 1.0 if call == 1 else 10.0, items=32)
    with pytest.warns(
        UserWarning, match="diverging: epoch 1 mean 8.875 against 1.000 at the first step.*--bias-lr 0.05"
    ):
        log = train(tiny_model("llama"), exploding, run)
    assert len(log.warnings) == 1


def test_a_noisy_falling_loss_is_not_reported_as_divergence():
    parameter = nn.Parameter(torch.zeros(2))
    run = TrainingRun(parameters=[parameter], lr=0.05, epochs=2, batch_size=4, seed=0, progress=False)
    # the first batch is the easy kind: batches alternate between 0.6 and 1.6 times a falling loss
    noisy = ScriptedLoss(parameter, lambda call: 1.0 / call**0.5 * (0.6 if call % 2 else 1.6), items=32)
    log = train(tiny_model("llama"), noisy, run)
    assert log.warnings == []


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(model_type):
    lofit_model = get_lofit_model(tiny_model(model_type), CONFIG)
    randomize_adapter(lofit_model, scale=0.1)
    lofit_model.lofit_scale.requires_grad_(True)
    lofit_model.lofit_bias.requires_grad_(True)
    objective = SFT(synthetic_pairs(6), PAD)
    batch = objective.collate(objective.items)

    def gradients(enabled: bool):
        lofit_model.zero_grad()
        with gradient_checkpointing(lofit_model, enabled):
            objective.loss(lofit_model, batch).backward()
        return lofit_model.lofit_scale.grad.clone(), lofit_model.lofit_bias.grad.clone()

    plain, checkpointed = gradients(False), gradients(True)
    assert plain[0].abs().sum() > 0
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-7)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in lofit_model.base_model.modules())


def test_adapters_stay_float32_and_apply_in_the_activation_dtype_and_device():
    model = tiny_model("llama").to(torch.bfloat16)
    lofit_model = get_lofit_model(model, CONFIG)
    randomize_adapter(lofit_model, scale=0.1)
    assert lofit_model.lofit_bias.dtype == torch.float32
    out = lofit_model(input_ids=torch.tensor([[3, 4, 5]])).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    hook = HeadIntervention(0, 4, 8, lambda layer: (torch.zeros(4, 8), torch.ones(4, 8)), lambda: True)
    (edited,) = hook(None, (torch.zeros(2, 3, 32, dtype=torch.float16, device="meta"),))
    assert edited.device.type == "meta" and edited.dtype == torch.float16


def test_library_calls_leave_the_callers_random_state_alone():
    examples = [PromptCompletion("Q: sky A:", " blue"), PromptCompletion("Q: red A:", " no")] * 4
    setup_config = LofitConfig(num_heads=2, select_epochs=1, tune_epochs=1, batch_size=4)
    for method in ("lofit", "lora", "reft", "red"):
        context = FitContext(
            model=tiny_model("llama"), tokenizer=word_tokenizer(), examples=examples, lofit=setup_config, progress=False
        )
        torch.manual_seed(123)
        before = torch.get_rng_state()
        get_method(method).fit(context)
        assert torch.equal(torch.get_rng_state(), before), method


def test_placement_options(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), dtype="bfloat16", device="cpu")
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"
    assert load_model(str(tmp_path))[0].dtype == torch.float32  # auto on the CPU
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_model(str(tmp_path), device="cuda:0")
    with pytest.raises(ValueError, match="either --device or --device-map"):
        ComputeConfig(device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        tuned_bias(TrainingSetup(ComputeConfig(mixed_precision="fp16")))
    with pytest.raises(ValueError, match="--compile with --gradient-checkpointing: .* use one of the two"):
        ComputeConfig(compile=True, gradient_checkpointing=True)


def run_options(tmp_path, *extra: str) -> list[str]:
    model_dir = tmp_path / "tiny"
    if not model_dir.exists():
        tiny_model_folder(model_dir)
        write_task(tmp_path / "task.jsonl")
    return [
        "run",
        "--task",
        str(tmp_path / "task.jsonl"),
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--select-epochs",
        "2",
        "--tune-epochs",
        "2",
        "--num-heads",
        "3",
        "--no-progress",
        *extra,
    ]


def adapter_bias(folder) -> torch.Tensor:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))["lofit_bias"]


def test_lofit_run_resume_continues_an_interrupted_run(tmp_path, monkeypatch, capsys):
    assert main(run_options(tmp_path, "--output-dir", str(tmp_path / "whole"))) == 0
    steps = {"count": 0}
    original = training._step

    def interrupted_step(*args, **kwargs):
        steps["count"] += 1
        if steps["count"] == 11:  # in step 2 (step 1 has 8 steps), after its first checkpoint
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "_step", interrupted_step)
    options = run_options(tmp_path, "--output-dir", str(tmp_path / "cut"), "--save-steps", "2")
    with pytest.raises(KeyboardInterrupt):
        main(options)
    assert not (tmp_path / "cut" / "adapter").exists()
    progress = stage_progress(tmp_path / "cut" / "checkpoints")  # what lofit experiment --status shows
    assert (progress.stage, progress.step) == ("tune", 2) and progress.total_steps > 2
    monkeypatch.setattr(training, "_step", original)
    capsys.readouterr()
    assert main(options + ["--resume"]) == 0
    assert "optimiser steps ran before, not counted)" in capsys.readouterr().out
    assert torch.allclose(adapter_bias(tmp_path / "cut"), adapter_bias(tmp_path / "whole"), atol=1e-6)
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert 10 <= resumed["resumed_steps"] < resumed["steps"]  # step 1's 8 and step 2's first checkpoint
    assert "resumed_steps" not in json.loads((tmp_path / "whole" / "metrics.json").read_text())


def test_the_adapter_is_written_before_evaluation(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(UserFileTask, "evaluate", crash)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        main(run_options(tmp_path, "--output-dir", str(tmp_path / "run")))
    assert adapter_bias(tmp_path / "run").abs().max() > 0


def test_resume_refuses_changed_settings(tmp_path, capsys):
    assert main(run_options(tmp_path, "--output-dir", str(tmp_path / "run"))) == 0
    assert main(run_options(tmp_path, "--output-dir", str(tmp_path / "run"), "--bias-lr", "0.2", "--resume")) == 2
    assert "bias_lr: 0.05 then, 0.2 now" in capsys.readouterr().err
    assert main(run_options(tmp_path, "--output-dir", str(tmp_path / "nothing-here"), "--resume")) == 2


def test_resume_accepts_a_change_to_an_option_the_run_does_not_read(tmp_path, capsys):
    folder = str(tmp_path / "run")
    assert main(run_options(tmp_path, "--output-dir", folder, "--selection", "l1")) == 0
    assert (
        main(run_options(tmp_path, "--output-dir", folder, "--selection", "l1", "--group-lambda", "0.5", "--resume"))
        == 0
    )
    assert main(run_options(tmp_path, "--output-dir", folder, "--selection", "group", "--resume")) == 2
    assert "selection: 'l1' then, 'group' now" in capsys.readouterr().err


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2", "gpt_neox", "qwen3"])
def test_the_prefix_cache_gives_the_same_loss_and_gradients(model_type):
    lofit_model = get_lofit_model(tiny_model(model_type), CONFIG)
    randomize_adapter(lofit_model, scale=0.1)
    lofit_model.set_active_heads([(1, 0), (2, 3)])
    lofit_model.train_only("bias")
    objective = SFT(synthetic_pairs(6), PAD)
    first, regrouped = objective.collate(objective.items), objective.collate(objective.items[3:0:-1])

    def loss_and_gradient(batch):
        lofit_model.zero_grad()
        loss = objective.loss(lofit_model, batch)
        loss.backward()
        return loss.detach(), lofit_model.lofit_bias.grad.clone()

    full_first, full_regrouped = loss_and_gradient(first), loss_and_gradient(regrouped)
    cache = PrefixCache(lofit_model.base_model, 1, 2**30)
    with cache.attached():
        filled = loss_and_gradient(first)  # runs in full and keeps the states after layer 0
        served = loss_and_gradient(first)  # skips layer 0
        served_regrouped = loss_and_gradient(regrouped)  # other rows, other padding width
    assert cache.skipped_passes == 2 and len(cache.store) == 6
    for cached, full in ((filled, full_first), (served, full_first), (served_regrouped, full_regrouped)):
        assert torch.allclose(cached[0], full[0], atol=1e-6) and torch.allclose(cached[1], full[1], atol=1e-6)
    assert full_first[1].abs().sum() > 0
    assert not any("forward" in layer.__dict__ for layer in decoder_layers(lofit_model.base_model))


def test_step_2_with_the_prefix_cache_trains_the_same_adapter():
    def tuned(budget_mb: int) -> torch.Tensor:
        return tuned_bias(TrainingSetup(ComputeConfig(prefix_cache_mb=budget_mb)), heads=ABOVE_LAYER_0)

    assert torch.allclose(tuned(0), tuned(64), atol=1e-5)


def test_compiled_training_trains_the_same_adapter():
    """torch.compile (dynamic shapes: the batches differ in length) in place of eager steps and of the
    prefix cache: the same biases, to float rounding, and every frame dynamo met compiled, none left
    to run eagerly (DPO, whose loss runs the same forward pass, is compiled in tests/test_distributed.py)."""

    def tuned(compiled: bool) -> torch.Tensor:
        return tuned_bias(TrainingSetup(ComputeConfig(compile=compiled)), heads=ABOVE_LAYER_0)

    eager = tuned(False)
    counters.clear()
    compiled = tuned(True)
    assert counters["stats"]["unique_graphs"] >= 1 and counters["frames"]["ok"] == counters["frames"]["total"]
    assert not counters["unimplemented"]  # nothing dynamo gave up on, so no layer fell back to eager
    assert compiled.abs().sum() > 0 and torch.allclose(eager, compiled, atol=1e-5)


def test_length_grouped_batches_are_seeded_complete_and_less_padded():
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (300,), generator=rng).tolist()
    grouped = epoch_batches(300, lengths, 8, 3, seed=1)
    assert grouped == epoch_batches(300, lengths, 8, 3, seed=1) != epoch_batches(300, lengths, 8, 3, seed=2)
    plain = epoch_batches(300, None, 8, 3, seed=1)
    for epoch in grouped:
        assert sorted(i for batch in epoch for i in batch) == list(range(300))
        assert len(epoch) == 38 and sum(len(b) < 8 for b in epoch) <= 1
    assert grouped[0] != grouped[1]  # batches change between epochs

    def padding(epochs):
        return sum(
            max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch)
            for epoch in epochs
            for batch in epoch
        )

    assert padding(grouped) < 0.3 * padding(plain)
