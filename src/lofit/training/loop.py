"""The one training loop of lofit, on ``accelerate``: one CPU, one GPU or N processes alike.

Every trained method (LoFiT's two steps, the bias-based selector, LoRA, RED, LoReFT)
minimises an :class:`~lofit.training.objectives.Objective` here with AdamW and a linear schedule.

**Batches.** ``batch_size`` is the *global* batch: the examples of one optimiser step,
drawn each epoch in an order fixed by the seed. With N processes, process r takes the
examples r, r + N, ... of each global batch, and splits its share into
``gradient_accumulation_steps`` micro-batches. Each micro-batch's summed loss is divided
by the number of loss terms of the *whole* global batch (completion tokens for SFT,
pairs for DPO) before its backward pass, and the gradients are summed over processes, so

    grad = (1 / W) * sum over every micro-batch of every process of  d(loss_sum)/d(theta)

is exactly the gradient of the global batch's mean loss, whatever N and the number of
micro-batches: two processes with global batch B train the same adapter as one process
with batch B. A regulariser (LoFiT's L1 term) is added once per step.

**Speed.** Batches group examples of similar length (:func:`epoch_batches`), and when
no trained tensor acts below layer L the layers below L run once per training sequence
(:mod:`lofit.training.prefix_cache`). With ``compile`` the model's forward pass (and so its
backward) runs through ``torch.compile`` with dynamic shapes, so that batch lengths share
compiled graphs, in place of the prefix cache, whose per-sequence lookups would break the graph.

**Precision.** Forward passes run under ``accelerator.autocast()`` (``mixed_precision``
bf16 or fp16; ``auto``: bf16 where the hardware runs it faster); the trained tensors stay
float32 (fp16 adds accelerate's loss scaling). float16 weights train only under fp16 on a
GPU: without loss scaling the adapter's small gradients underflow.

**Checkpoints.** With a :class:`CheckpointPolicy`, the main process writes a checkpoint at
the end of every epoch and every ``save_steps`` steps (see :mod:`lofit.training.checkpoints`);
``resume`` restores the newest one and skips the steps it covers, so an interrupted and
resumed stage ends with the same tensors as an uninterrupted one.

**Trackers.** Inside an open tracker run (:func:`lofit.training.trackers.tracking`, ``--report-to``)
every optimiser step's loss and learning rate are logged as ``<stage>/loss`` and ``<stage>/lr``.

**Gradient clipping.** With ``max_grad_norm`` > 0 the gradient g of all trained tensors
together is rescaled to g * min(1, max_grad_norm / ||g||_2) before each optimiser step, as
the Hugging Face Trainer does (its default, 1.0, is what the paper's code trained with).

**Proximal steps.** ``after_step(lr, optimizer)``, when given, runs after every optimiser
step with the learning rate that step used and the (torch) optimiser, whose state holds
Adam's moments: LoFiT's group-sparse step 1 applies its proximal shrinkage there
(:func:`lofit.methods.lofit.steps.shrink_heads`).

**Guards.** A loss that is NaN or infinite stops training before the optimiser applies
it (:class:`NonFiniteLossError`, naming the step). An epoch whose mean loss exceeds
:data:`DIVERGENCE_FACTOR` times the mean loss of the first steps, or
:data:`EXPLOSION_FACTOR` times the first step's loss (the loss before any update: a loss
that explodes within the first steps inflates their mean too), is reported as divergence,
naming the learning rate.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import GradientAccumulationPlugin
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from lofit.training.checkpoints import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from lofit.training.objectives import Objective
from lofit.training.prefix_cache import PrefixCache
from lofit.training.trackers import log_training_step
from lofit.utils.compute import ComputeConfig, check_launcher
from lofit.utils.distributed import (
    is_main_process,
    my_share,
    num_processes,
    process_index,
    sum_across_processes,
    wait_for_everyone,
)

DIVERGENCE_FACTOR = 1.25
"""An epoch mean above this multiple of the first steps' mean loss is reported as divergence."""
START_STEPS = 8
"""How many first steps define "where the loss started"."""
EXPLOSION_FACTOR = 2.0
"""An epoch mean above this multiple of the first step's loss is reported as divergence (a
margin wide enough for one batch's noise)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before applying that step."""


@dataclass
class CheckpointPolicy:
    """Where a stage's checkpoints go, how often, and whether to resume from the newest."""

    directory: Path
    save_steps: int | None = None
    resume: bool = False


@dataclass
class TrainingSetup:
    """How every training of a run executes: placement and precision, and its checkpoints."""

    compute: ComputeConfig = field(default_factory=ComputeConfig)
    checkpoints: CheckpointPolicy | None = None


@dataclass(kw_only=True)
class TrainingRun:
    """What the loop needs to know besides the model and the data.

    Attributes:
        stage: the checkpoint sub-folder of this training (``select``, ``tune``, ``lora``...).
        lr_name: how the user sets ``lr`` (e.g. ``--bias-lr``), named by the divergence report.
        first_trained_layer: no trained tensor acts below this decoder layer, so the layers
            below it may be served by a :class:`~lofit.training.prefix_cache.PrefixCache`.
    """

    parameters: list[nn.Parameter]
    lr: float
    epochs: int
    batch_size: int
    seed: int
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    description: str = "training"
    progress: bool = True
    stage: str = "train"
    lr_name: str = "lr"
    setup: TrainingSetup = field(default_factory=TrainingSetup)
    first_trained_layer: int = 0
    max_grad_norm: float = 0.0
    """Clip the global gradient norm to this before each step (0: no clipping)."""
    after_step: Callable[[float, torch.optim.Optimizer], None] | None = None
    """Called after every optimiser step with that step's learning rate and the optimiser (a proximal update)."""


@dataclass
class TrainingLog:
    """Mean loss of each epoch, optimiser steps, the step a resume started from, warnings, and
    (step 1) the localization figures of the ranking it produced."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    resumed_from_step: int = 0
    warnings: list[str] = field(default_factory=list)
    localization: dict | None = None


def cpu_has_bf16() -> bool:
    """Whether oneDNN, which runs PyTorch's bf16 matrix products on the CPU, supports bf16 on
    this CPU (its own test: AVX512-BF16 or AMX, or AVX-512 on which it emulates them)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products faster than float32: a CUDA GPU with bf16
    tensor cores (compute capability 8, Ampere, or later), or a CPU that oneDNN supports."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and cpu_has_bf16()


def resolve_mixed_precision(requested: str | None, device: torch.device) -> str:
    """The autocast precision a computation on ``device`` runs under: ``requested``, else what
    ``accelerate launch --mixed_precision`` set, else ``auto``; ``auto`` is bf16 where
    :func:`bf16_is_fast`, else ``no``. (bf16 kept CLUTRR's validation exact match within a
    point of float32 on the default model: docs/speed.md.)"""
    choice = requested or os.environ.get("ACCELERATE_MIXED_PRECISION", "auto")
    if choice == "auto":
        return "bf16" if bf16_is_fast(device) else "no"
    return choice


def check_loss_scaling(mixed_precision: str, weight_dtype: torch.dtype, device: torch.device) -> None:
    """Refuse to train through float16 weights without fp16 loss scaling, under which the
    small gradients of the adapter (A and v) would underflow to zero."""
    if weight_dtype != torch.float16 or (mixed_precision == "fp16" and device.type == "cuda"):
        return
    if device.type == "cuda":
        fix = "add --mixed-precision fp16 (autocast with accelerate's loss scaling), or load --dtype bfloat16"
    else:
        fix = "load the weights with --dtype float32 or bfloat16 (loss scaling needs a GPU)"
    raise ValueError(
        f"float16 weights would train without loss scaling under --mixed-precision {mixed_precision}, "
        f"and small gradients underflow to zero in float16: {fix}"
    )


def make_accelerator(mixed_precision: str | None, device: torch.device, weight_dtype: torch.dtype | None = None):
    """An ``accelerate.Accelerator`` for ``mixed_precision`` (:func:`resolve_mixed_precision`);
    ``weight_dtype``, when the accelerator trains through the model's weights, is their dtype
    (float16 weights need fp16 loss scaling: :func:`check_loss_scaling`).

    accelerate keeps one process-wide state; a later call asking for another precision or
    device type (a script or test training twice) resets that state first. Devices are
    lofit's own business (``load_model``), so the accelerator places nothing, and lofit's
    loop accumulates micro-batches itself, so a launch config's gradient-accumulation steps
    (which would divide every loss) are not taken. DeepSpeed, FSDP and Megatron-LM launches
    are refused (:func:`lofit.utils.compute.check_launcher`).
    """
    check_launcher()
    mixed_precision = resolve_mixed_precision(mixed_precision, device)
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("--mixed-precision fp16 needs a GPU; on the CPU use bf16")
    if weight_dtype is not None:
        check_loss_scaling(mixed_precision, weight_dtype, device)
    if mixed_precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn(
            "--mixed-precision bf16: this CPU has no bf16 instructions that oneDNN can use, so bf16 matrix "
            "products run in a slow fallback (a training step of the default model measured 34x slower than "
            "float32 on an AVX2 CPU); --mixed-precision no is faster here",
            stacklevel=2,
        )
    state = AcceleratorState._shared_state
    if state and (
        state.get("_mixed_precision") != mixed_precision
        or (device.type == "cpu") != (getattr(state.get("device"), "type", "cpu") == "cpu")
    ):
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=device.type == "cpu",
        device_placement=False,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
    )


def epoch_batches(
    count: int, lengths: list[int] | None, batch_size: int, epochs: int, seed: int
) -> list[list[list[int]]]:
    """The global batches of each epoch, as lists of indices of ``count`` items, drawn from ``random.Random(seed)``.

    Without ``lengths``: each epoch shuffles the items and cuts them into batches. With
    them (length grouping, the idea of transformers' ``group_by_length``): each epoch
    shuffles the items, cuts them into mega-batches of m = min(n // (4 B), 50) batches,
    sorts each mega-batch by length and cuts it into batches, then shuffles the order of all
    batches. Batches then hold examples of similar length (less padding) while their
    composition still changes from epoch to epoch.
    """
    rng = random.Random(seed)
    result = []
    for _ in range(epochs):
        order = list(range(count))
        rng.shuffle(order)
        if lengths is None:
            result.append([order[i : i + batch_size] for i in range(0, len(order), batch_size)])
            continue
        mega = batch_size * max(1, min(len(order) // (4 * batch_size), 50))
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        result.append(batches)
    return result


def _micro_batches(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` in at most ``parts`` contiguous, non-empty chunks of near-equal size."""
    size = math.ceil(len(indices) / parts) if indices else 1
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def _sum_gradients_across_processes(parameters: list[nn.Parameter]) -> None:
    """Replace each gradient by its sum over processes (one all-reduce of one flat vector)."""
    if num_processes() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    device = grads[0].device
    total = sum_across_processes(torch.cat([g.flatten().to(device) for g in grads]))
    offset = 0
    for parameter, grad in zip(parameters, grads):
        parameter.grad = total[offset : offset + grad.numel()].view_as(grad).to(grad.device)
        offset += grad.numel()


def _hf_model(model: nn.Module) -> PreTrainedModel:
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(f"{type(model).__name__} wraps no transformers model")


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute the decoder layers' activations in the backward pass, for the ``with`` block.

    transformers checkpoints a layer only while that layer is in training mode; the
    model itself stays in eval mode (no dropout), so only the layers' own flag is set.
    Non-reentrant checkpointing gives the same gradients as none.
    """
    if not enabled:
        yield
        return
    hf = _hf_model(model)
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in hf.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not layers:
        raise ValueError(f"{type(hf).__name__} does not support gradient checkpointing")
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
        hf.activation_checkpointing_disable()


def _prefix_cache(model: nn.Module, run: TrainingRun) -> contextlib.AbstractContextManager:
    """The frozen-prefix cache when something lies below the first trained layer and memory is allowed."""
    budget = run.setup.compute.prefix_cache_mb * 2**20
    if run.first_trained_layer < 1 or budget == 0 or run.setup.compute.compile:
        return contextlib.nullcontext()
    return PrefixCache(_hf_model(model), run.first_trained_layer, budget).attached()


def _fingerprint(run: TrainingRun, count: int) -> dict:
    return {
        "stage": run.stage,
        "shapes": [list(p.shape) for p in run.parameters],
        "lr": run.lr,
        "epochs": run.epochs,
        "batch_size": run.batch_size,
        "seed": run.seed,
        "items": count,
        "group_by_length": run.setup.compute.group_by_length,
        "max_grad_norm": run.max_grad_norm,
    }


def train(model: nn.Module, objective: Objective, run: TrainingRun) -> TrainingLog:
    """Minimise ``objective`` over ``objective.items`` by AdamW on ``run.parameters`` only (see module docstring)."""
    items = objective.items
    if not items:
        raise ValueError("no training examples")
    device = next(iter(run.parameters)).device
    weights = model.get_input_embeddings().weight
    accelerator = make_accelerator(run.setup.compute.mixed_precision, weights.device, weights.dtype)
    lengths = [objective.item_length(item) for item in items] if run.setup.compute.group_by_length else None
    batches = epoch_batches(len(items), lengths, run.batch_size, run.epochs, run.seed)
    steps_per_epoch = len(batches[0])
    total_steps = steps_per_epoch * run.epochs
    optimizer = torch.optim.AdamW(run.parameters, lr=run.lr, weight_decay=run.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(run.warmup_ratio * total_steps), total_steps)
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)  # fp16: loss scaling in step()
    fingerprint = _fingerprint(run, len(items)) | {
        "dtype": str(weights.dtype).removeprefix("torch."),
        "mixed_precision": accelerator.mixed_precision,
    }
    stage_dir = run.setup.checkpoints.directory / run.stage if run.setup.checkpoints else None

    state, log = TrainerState(), TrainingLog()
    if run.setup.checkpoints and run.setup.checkpoints.resume and (folder := latest_checkpoint(stage_dir)) is not None:
        state = load_checkpoint(folder, fingerprint, run.parameters, optimizer.optimizer, schedule, accelerator.scaler)
        log.resumed_from_step = state.step
    state.total_steps = total_steps

    def checkpoint() -> None:
        if stage_dir is not None:
            if is_main_process():
                save_checkpoint(
                    stage_dir, state, fingerprint, run.parameters, optimizer.optimizer, schedule, accelerator.scaler
                )
            wait_for_everyone()

    # The model stays in eval mode: only adapter tensors train, and the frozen model's dropout must
    # not perturb the policy (DPO's reference log-probabilities are computed without it).
    model.eval()
    forward_model = model
    if run.setup.compute.compile:
        # A new adapter (a cell, a step) fails the guards of the graphs compiled before it; past dynamo's
        # recompile limit it would fall back to eager silently, so each compiled training starts afresh.
        torch._dynamo.reset()
        forward_model = torch.compile(model, dynamic=True)
    show = run.progress and is_main_process()
    with (
        tqdm(total=total_steps, initial=state.step, desc=run.description, disable=not show, dynamic_ncols=True) as bar,
        gradient_checkpointing(model, run.setup.compute.gradient_checkpointing),
        _prefix_cache(model, run),
    ):
        while state.step < total_steps:
            epoch, offset = divmod(state.step, steps_per_epoch)
            batch_ids = batches[epoch][offset]
            share = [batch_ids[i] for i in my_share(len(batch_ids))]
            loss = _step(forward_model, objective, share, run, accelerator, device)
            if not math.isfinite(loss):
                kept = latest_checkpoint(stage_dir) if stage_dir else None
                raise NonFiniteLossError(
                    f"{run.description}: the loss became {loss} at step {state.step + 1} of {total_steps} (epoch "
                    f"{epoch + 1}); "
                    f"training stopped before applying it. Last good checkpoint: {kept or 'none saved'}. "
                    f"Try a lower learning rate ({run.lr_name} {run.lr:g})."
                )
            if run.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.parameters, run.max_grad_norm)
            step_lr = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if run.after_step is not None:
                run.after_step(step_lr, optimizer.optimizer)
            state.step += 1
            state.step_losses.append(loss)
            log_training_step(run.stage, state.step, loss, step_lr)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            end_of_epoch = state.step % steps_per_epoch == 0
            if end_of_epoch:
                _check_divergence(state, steps_per_epoch, run, log)
            if end_of_epoch or (
                run.setup.checkpoints
                and run.setup.checkpoints.save_steps
                and state.step % run.setup.checkpoints.save_steps == 0
            ):
                checkpoint()
    log.steps = state.step
    log.epoch_losses = [
        sum(chunk) / len(chunk)
        for chunk in (
            state.step_losses[start : start + steps_per_epoch] for start in range(0, total_steps, steps_per_epoch)
        )
    ]
    return log


def _step(
    model: nn.Module, objective: Objective, local_ids: list[int], run: TrainingRun, accelerator, device: torch.device
) -> float:
    """Forward and backward this process's share of one global batch; return the global batch's loss."""
    batches = [
        objective.collate([objective.items[i] for i in chunk]).to(device)
        for chunk in _micro_batches(local_ids, run.setup.compute.gradient_accumulation_steps)
    ]
    weight = sum_across_processes(torch.tensor([float(sum(b.weight for b in batches))], device=device))
    loss_sum = torch.zeros((), device=device)
    for batch in batches:
        with accelerator.autocast():
            part = objective.loss_sum(model, batch)
        accelerator.backward(part / weight)
        loss_sum += part.detach().float()
    loss = sum_across_processes(loss_sum.reshape(1)) / weight
    regularizer = objective.regularizer()
    if regularizer is not None:  # once per step: each process adds its 1/N share of the gradient
        accelerator.backward(regularizer / num_processes())
        loss = loss + regularizer.detach()
    _sum_gradients_across_processes(run.parameters)
    return float(loss)


def _check_divergence(state: TrainerState, steps_per_epoch: int, run: TrainingRun, log: TrainingLog) -> None:
    """Warn when this epoch's mean loss is far above where the loss started: the first
    steps' mean, or the first step's loss alone (see the module docstring)."""
    start = state.step_losses[: min(START_STEPS, steps_per_epoch)]
    epoch = state.step_losses[-steps_per_epoch:]
    start_mean, epoch_mean, first = sum(start) / len(start), sum(epoch) / len(epoch), state.step_losses[0]
    if epoch_mean > DIVERGENCE_FACTOR * start_mean and epoch_mean - start_mean > 1e-3:
        reference = f"{start_mean:.3f} over the first {len(start)} steps"
    elif epoch_mean > EXPLOSION_FACTOR * first:
        reference = f"{first:.3f} at the first step"
    else:
        return
    message = (
        f"{run.description}: the loss is diverging: epoch {state.step // steps_per_epoch} mean {epoch_mean:.3f} "
        f"against {reference}. The learning rate ({run.lr_name} {run.lr:g}) is likely too high for this setup; lower "
        "it."
    )
    log.warnings.append(message)
    if process_index() == 0:
        warnings.warn(message, stacklevel=2)
