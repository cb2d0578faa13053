"""Training checkpoints without pickles: safetensors for tensors, JSON for everything else.

A checkpoint of one training stage (``<run folder>/checkpoints/<stage>/step-<N>/``) holds
what an exact resume needs:

- ``tensors.safetensors``: the trained tensors (``param.<i>``), AdamW's moments and step
  counts (``optimizer.<i>.<name>``) and the RNG states (``rng.torch``, ``rng.cuda.<d>``);
- ``state.json``: the step and the stage's total steps, every step's loss so far, a fingerprint of the setup (tensor
  shapes, learning rate, epochs, batch size, seed, number of items, the model's dtype and
  the mixed precision), AdamW's hyper-parameters, the learning-rate schedule's state and,
  for fp16, the loss scaler's.

A checkpoint is written into ``step-<N>.tmp`` and renamed when complete, so a folder
named ``step-<N>`` is always whole; the newest :data:`KEEP` are kept. Only the main
process writes them; on resume the main process picks the checkpoint and every process
loads that one (:func:`latest_checkpoint`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lofit.utils.distributed import broadcast_from_main, process_index

TENSORS = "tensors.safetensors"
STATE = "state.json"
KEEP = 2


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this run or cannot be read."""


@dataclass
class TrainerState:
    """Where a training stage stands: optimizer steps done, of how many, and the loss of each."""

    step: int = 0
    step_losses: list[float] = field(default_factory=list)
    total_steps: int = 0
    """The steps the stage runs in all (0 in checkpoints written before it was recorded)."""


def checkpoint_folders(stage_dir: Path) -> list[Path]:
    """Complete checkpoints of a stage, oldest first."""
    if not stage_dir.is_dir():
        return []
    folders = [p for p in stage_dir.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[5:]))


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint of a stage as the main process sees it, the same in every
    process (each process must call this). A process that cannot see that folder (checkpoints
    written to a disk the machines do not share) raises a :class:`CheckpointError`."""
    folders = checkpoint_folders(stage_dir)
    chosen = broadcast_from_main(folders[-1].name if folders else None)
    if chosen is None:
        return None
    folder = stage_dir / chosen
    if not folder.is_dir():
        raise CheckpointError(
            f"the main process resumes from {folder}, which process {process_index()} cannot see: "
            "put --output-dir on a disk that every machine shares"
        )
    return folder


def save_checkpoint(
    stage_dir: Path,
    state: TrainerState,
    fingerprint: dict,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    scaler: Any = None,
) -> Path:
    """Write the checkpoint of ``state.step`` (complete, or not at all) and drop older ones beyond :data:`KEEP`."""
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(parameters)}
    optimizer_state = optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for device, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = rng
    record = {
        "step": state.step,
        "total_steps": state.total_steps,
        "step_losses": state.step_losses,
        "fingerprint": fingerprint,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "schedule": {k: v for k, v in schedule.state_dict().items() if k != "lr_lambdas"},
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    final = stage_dir / f"step-{state.step}"
    partial = stage_dir / f"step-{state.step}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / TENSORS))
    (partial / STATE).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in checkpoint_folders(stage_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def cuda_rng_states(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The saved ``rng.cuda.<d>`` states in device order (numeric: device 10 after device 9)."""
    keys = [key for key in tensors if key.startswith("rng.cuda.")]
    return [tensors[key] for key in sorted(keys, key=lambda key: int(key.removeprefix("rng.cuda.")))]


def load_checkpoint(
    folder: Path,
    fingerprint: dict,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    scaler: Any = None,
) -> TrainerState:
    """Restore a checkpoint into the trained tensors, the optimizer, the schedule, the scaler and the RNGs."""
    try:
        record = json.loads((folder / STATE).read_text())
        tensors = load_file(str(folder / TENSORS))
    except Exception as error:  # OSError, JSON errors, and safetensors' own error type for a damaged file
        raise CheckpointError(f"cannot read the checkpoint {folder}: {error}") from None
    if record.get("fingerprint") != fingerprint:
        saved = record.get("fingerprint") or {}
        differences = ", ".join(f"{k} {saved.get(k)!r} vs {v!r}" for k, v in fingerprint.items() if saved.get(k) != v)
        raise CheckpointError(
            f"the checkpoint {folder} belongs to another training setup (checkpoint vs now: {differences}); "
            "run without --resume or use another --output-dir"
        )
    with torch.no_grad():
        for i, parameter in enumerate(parameters):
            parameter.copy_(tensors[f"param.{i}"].to(parameter.device, parameter.dtype))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": record["optimizer_param_groups"]})
    schedule.load_state_dict(record["schedule"] | {"lr_lambdas": [None] * len(record["schedule"]["base_lrs"])})
    if scaler is not None and record.get("scaler"):
        scaler.load_state_dict(record["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = cuda_rng_states(tensors)
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return TrainerState(record["step"], list(record["step_losses"]), record.get("total_steps", 0))


@dataclass(frozen=True)
class StageProgress:
    """How far the training of a run folder has come, from its newest checkpoint: the stage,
    its step of ``total_steps`` (0: not recorded), and its rate in steps per second between
    the stage's two newest checkpoints (None with only one)."""

    stage: str
    step: int
    total_steps: int
    steps_per_second: float | None

    def describe(self) -> str:
        """ "tune checkpointed at step 190 of 228" (and, with a rate, the training minutes left)."""
        of = f" of {self.total_steps}" if self.total_steps else ""
        text = f"{self.stage} checkpointed at step {self.step}{of}"
        if self.total_steps and self.steps_per_second:
            text += f", ~{(self.total_steps - self.step) / self.steps_per_second / 60:.0f} min of it left"
        return text


def stage_progress(checkpoints: Path, since: float | None = None) -> StageProgress | None:
    """The progress of the stage whose checkpoint under ``checkpoints`` (a run folder's
    ``checkpoints/``) was written last, or None when there is none; readable while the run
    goes on (checkpoints removed meanwhile count as absent). The rate needs both newest
    checkpoints written after ``since`` (a timestamp: the job's start), so that a resumed
    job's rate does not span its interruption."""
    try:
        newest = []
        for stage_dir in checkpoints.iterdir() if checkpoints.is_dir() else []:
            if folders := checkpoint_folders(stage_dir):
                newest.append((folders[-1].stat().st_mtime, stage_dir.name, folders))
        if not newest:
            return None
        _, stage, folders = max(newest)
        record = json.loads((folders[-1] / STATE).read_text())
        rate = None
        if len(folders) > 1 and (since is None or folders[-2].stat().st_mtime >= since):
            seconds = folders[-1].stat().st_mtime - folders[-2].stat().st_mtime
            steps = record["step"] - int(folders[-2].name[5:])
            rate = steps / seconds if seconds > 0 and steps > 0 else None
    except (OSError, json.JSONDecodeError, KeyError):
        return None
    return StageProgress(stage, record["step"], record.get("total_steps", 0), rate)
