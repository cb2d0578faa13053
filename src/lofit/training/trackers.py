"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through accelerate's tracker integration.

A command that trains (``lofit run``, ``select``, ``tune``, ``compare``, and each cell of
``lofit experiment``) opens one tracker run with :func:`tracking` when ``--report-to`` names
trackers: an ``accelerate.Accelerator(log_with=..., project_dir=...)`` whose
``init_trackers`` stores the run configuration. While it is open, the training loop logs
every optimiser step's loss and learning rate (:func:`log_training_step`, as
``<stage>/loss`` and ``<stage>/lr``: ``select``, ``tune``, ``lora``...); the command logs
step 1's localization figures (``localization/<figure>``) and the final metrics
(``final/<name>``) itself; ``end_training`` closes the run.

- ``tensorboard``: event files in ``<directory>/<name>/`` (offline).
- ``wandb``: project ``project``, group ``group``, run ``name``, files under ``<directory>``
  (``WANDB_MODE=offline`` keeps it offline; ``wandb sync`` uploads later).
- ``mlflow``: experiment ``project``, run ``name`` (tag ``group``), in the store of
  ``MLFLOW_TRACKING_URI`` (a server, ``sqlite:///mlflow.db`` with the full ``mlflow``
  package, or ``file:<folder>``, which MLflow 3 allows only with ``MLFLOW_ALLOW_FILE_STORE=true``).

A tracker that cannot start its run (no store, a refused store, no login) stops the command
before any training, with the tracker's own message.

Steps are counted over the whole tracker run (step 1 then step 2 continue one axis), as
wandb requires steps that only grow. Only the main process of a multi-process run reports.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.tracking import TensorBoardTracker

from lofit.utils.compute import report_to_list
from lofit.utils.distributed import is_main_process, num_processes

TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "lofit[tensorboard]"),
    "wandb": ("wandb", "lofit[wandb]"),
    "mlflow": ("mlflow", "lofit[mlflow]"),
}
"""Each tracker's Python module and what to ``pip install`` for it."""


def check_trackers(report_to: str | None) -> list[str]:
    """The trackers ``report_to`` names (comma-separated, ``none`` for none), each checked to
    be installed: a ValueError naming the ``pip install`` that adds a missing one."""
    names = report_to_list(report_to)
    missing = [name for name in names if importlib.util.find_spec(TRACKER_PACKAGES[name][0]) is None]
    if missing:
        raise ValueError(
            f"--report-to {','.join(missing)}: not installed here; "
            + "; ".join(f"pip install {TRACKER_PACKAGES[name][1]}" for name in missing)
        )
    return names


@dataclass
class TrackerRun:
    """One tracker run: where it is written, its names and its configuration.

    Attributes:
        report_to: the trackers, comma-separated (``tensorboard,wandb``), or ``none``.
        directory: where local trackers write (TensorBoard: ``<directory>/<name>/``; wandb's files).
        project: wandb's project, MLflow's experiment.
        name: the run's name (TensorBoard's folder, wandb's and MLflow's run name).
        group: what groups runs (an experiment's name): wandb's group, an MLflow tag.
        config: the run configuration, stored when the run starts.
    """

    report_to: str | None
    directory: Path
    project: str
    name: str
    group: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


class TrackerSession:
    """An open tracker run: an accelerator holding the trackers, and the step count that
    every logged value is placed at."""

    def __init__(self, spec: TrackerRun, names: list[str]):
        state = AcceleratorState._shared_state
        # The state lofit's own accelerators set up (``make_accelerator``) is kept as it is:
        # trackers only need an accelerator, not a precision or device of their own.
        precision = state.get("_mixed_precision", "no") if state else "no"
        cpu = getattr(state.get("device"), "type", "cpu") == "cpu" if state else True
        log_with = [TensorBoardTracker(spec.name, spec.directory) if name == "tensorboard" else name for name in names]
        spec.directory.mkdir(parents=True, exist_ok=True)
        self.accelerator = Accelerator(
            log_with=log_with,
            project_dir=spec.directory,
            mixed_precision=precision,
            cpu=cpu,
            device_placement=False,
        )
        init_kwargs = {
            "wandb": {"name": spec.name, "group": spec.group, "dir": str(spec.directory)},
            "mlflow": {"run_name": spec.name, "tags": {"group": spec.group} if spec.group else None},
        }
        try:
            self.accelerator.init_trackers(spec.project, config=_scalars(spec.config), init_kwargs=init_kwargs)
        except BaseException:
            for tracker in self.accelerator.trackers:  # those started before the one that failed are finished
                tracker.finish()
            raise
        self.step = 0
        self.stage: tuple[str, int] | None = None
        """The stage being logged and the run step its step 0 sits at."""

    def log_training_step(self, stage: str, stage_step: int, values: dict[str, float]) -> None:
        """``values`` of optimiser step ``stage_step`` of ``stage`` as ``<stage>/<name>``; a new
        stage (or the same stage started again) continues after the steps logged so far."""
        if self.stage is None or self.stage[0] != stage or stage_step <= self.step - self.stage[1]:
            self.stage = (stage, self.step - stage_step + 1)
        self.step = self.stage[1] + stage_step
        self.accelerator.log({f"{stage}/{name}": value for name, value in values.items()}, step=self.step)

    def log(self, prefix: str, values: dict[str, Any]) -> None:
        """The numbers among ``values`` (nested dictionaries flattened), as ``<prefix>/<name>``, at the current step."""
        numbers = {f"{prefix}/{name}": value for name, value in _numbers(values).items()}
        if numbers:
            self.accelerator.log(numbers, step=self.step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """A finished run's summary: its step-1 ``localization`` figures as ``localization/<figure>``,
        its other numbers (metrics, trained parameters, wall times) as ``final/<name>``."""
        self.log("localization", summary.get("localization") or {})
        self.log("final", {key: value for key, value in summary.items() if key != "localization"})

    def close(self) -> None:
        """``end_training``: each tracker finishes its run. (With several processes the trackers
        are finished one by one instead: ``end_training`` would also take down the process group
        that later cells still use.)"""
        if num_processes() == 1:
            self.accelerator.end_training()
        else:
            for tracker in self.accelerator.trackers:
                tracker.finish()


_ACTIVE: list[TrackerSession] = []


@contextlib.contextmanager
def tracking(spec: TrackerRun) -> Iterator[TrackerSession | None]:
    """Open a tracker run for the ``with`` block (None when ``spec.report_to`` names no tracker,
    and on every process but the main one); training steps inside it are logged to it."""
    names = check_trackers(spec.report_to)
    if not names or not is_main_process():
        yield None
        return
    try:
        session = TrackerSession(spec, names)
    except Exception as error:  # each tracker library raises its own exception types
        raise ValueError(
            f"--report-to {','.join(names)}: a tracker could not start its run: {type(error).__name__}: {error}"
        ) from error
    _ACTIVE.append(session)
    try:
        yield session
    finally:
        _ACTIVE.remove(session)
        session.close()


def log_training_step(stage: str, step: int, loss: float, lr: float) -> None:
    """Log one optimiser step (its loss and learning rate) to the open tracker run, if any."""
    if _ACTIVE:
        _ACTIVE[-1].log_training_step(stage, step, {"loss": loss, "lr": lr})


def _numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The int and float entries of ``values`` (booleans as 0/1), nested dictionaries as ``outer/inner``."""
    numbers: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            numbers |= _numbers(value, f"{prefix}{name}/")
        elif isinstance(value, (bool, int, float)):
            numbers[f"{prefix}{name}"] = float(value) if isinstance(value, bool) else value
    return numbers


def _scalars(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with values trackers store as hyper-parameters: None, booleans, numbers and
    strings as they are, anything else (lists, mappings) as JSON text."""
    return {
        key: value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
        for key, value in config.items()
    }
