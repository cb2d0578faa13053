"""Experiment grids: a YAML file expanded into cells, each one resolved configuration.

A grid names the tasks, seeds and *arms* (a label, a method, the arm's options) of an
experiment, options shared by every cell, and a *sweep* (option -> values) crossed with
the arms. Every (task, arm, sweep point, seed) is one cell. With ``--tune`` an arm's
``tune`` grid (option -> values) is tried on the validation split first; every tuned arm
must have the same number of trials, so no method gets more tuning than another.

A cell's options are flat names of :class:`~lofit.pipeline.RunConfig`,
:class:`~lofit.config.LofitConfig`, :class:`~lofit.compute.ComputeConfig` and the
method's config, plus two of the runner's own:

- ``heads_task``: the task whose step-1 ranking chooses the heads (the cross-task
  experiment; default: the cell's own task);
- ``select_only: true``: the cell is step 1 alone (the layers experiment).

``num_heads: all`` means every head of the model. A cell's *key* is the SHA-256 of its
resolved configuration: every option with its default filled in, minus those that only
say where or how verbosely to run (:data:`UNHASHED`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..compute import ComputeConfig
from ..config import LofitConfig
from ..methods import METHODS
from ..options import build_config
from ..pipeline import CellConfig, RunConfig

RUNNER_OPTIONS = {"heads_task": None, "select_only": False}
"""The runner's own cell options and their defaults."""
UNHASHED = ("output_dir", "data_dir", "progress", "resume", "save_steps", "eval_batch_size")
"""Options that do not change a cell's result, left out of its key."""
ALL_HEADS = "all"
OWNERS = {f.name: name for name, method in METHODS.items() if method.config_class for f in fields(method.config_class)}
"""Each method-specific option and its method."""


def shipped_grids() -> dict[str, Path]:
    """The grids shipped with lofit, by name (``table1``, ``num-heads``, ...)."""
    folder = resources.files(__package__)
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


@dataclass
class Arm:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    tune: dict[str, list] = field(default_factory=dict)

    def trials(self) -> list[dict[str, Any]]:
        """The tuning trials: every combination of the tune grid's values, in file order (none without a grid)."""
        if not self.tune:
            return []
        names = list(self.tune)
        return [dict(zip(names, values)) for values in itertools.product(*(self.tune[n] for n in names))]


@dataclass
class Grid:
    name: str
    description: str
    tasks: list[str]
    seeds: list[int]
    arms: list[Arm]
    options: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=lambda: {"kind": "table"})
    tune_limit: int = 100
    """Validation examples each tuning trial is scored on."""

    def points(self) -> list[dict[str, Any]]:
        names = list(self.sweep)
        return [dict(zip(names, values)) for values in itertools.product(*(self.sweep[n] for n in names))]


def load_grid(name_or_path: str) -> Grid:
    """A shipped grid by name, or a grid YAML file; a ValueError naming what is wrong."""
    shipped = shipped_grids()
    path = shipped.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"no experiment {name_or_path!r}: name one of {', '.join(sorted(shipped))} or a grid YAML file")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping (name, tasks, seeds, arms, ...)")
    known = {f.name for f in fields(Grid)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown grid keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        arms = [Arm(**arm) for arm in data.pop("arms")]
        grid = Grid(**{"name": path.stem, "description": ""} | data, arms=arms)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a valid grid: {error}") from None
    if not grid.arms or len({arm.label for arm in grid.arms}) != len(grid.arms):
        raise ValueError(f"{path}: a grid needs arms with distinct labels")
    return grid


@dataclass(frozen=True)
class Cell:
    """One unit of work: ``options`` is the complete flat configuration (defaults filled in)."""

    experiment: str
    phase: str
    """``tune`` (a trial on the validation split), ``test``, or ``ranking`` (step 1 alone)."""
    label: str
    task: str
    seed: int
    method: str
    point: tuple = ()
    """The sweep values of this cell, as (option, value) pairs."""
    trial: tuple = ()
    """The tuned options of this cell, as (option, value) pairs."""
    options: tuple = ()

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def key(self) -> str:
        return ranking_key(self.config) if self.phase == "ranking" else config_key(self.method, self.config)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.point + self.trial)
        return f"{self.phase} {self.task} {self.label} seed {self.seed}" + (f" ({extra})" if extra else "")


def config_classes(method: str) -> tuple[type, ...]:
    config_class = METHODS[method].config_class
    return (RunConfig, LofitConfig, ComputeConfig) + ((config_class,) if config_class else ())


def resolve(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of a ``method`` cell, defaults filled in and overridden by ``options``;
    a ValueError for an option no config of this method has."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    resolved: dict[str, Any] = dict(RUNNER_OPTIONS)
    for cls in config_classes(method):
        resolved |= asdict(cls())
    unknown = sorted(set(options) - set(resolved))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} are not options of method {method}")
    return resolved | options | {"method": method}


def config_key(method: str, options: dict[str, Any]) -> str:
    """SHA-256 (hex, 16 digits) of the resolved configuration without :data:`UNHASHED`."""
    kept = {k: v for k, v in sorted(options.items()) if k not in UNHASHED} | {"method": method}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


STEP2_ONLY = ("num_heads", "tune_epochs", "eval_split", "limit", "eval_file", "match", "heads_file", "method")
"""Options step 1 does not read: cells differing only in these share one head ranking."""


def ranking_key(options: dict[str, Any]) -> str:
    """The key of the step-1 ranking a cell uses: its run, LoFiT and compute options minus
    :data:`STEP2_ONLY` (the bias learning rate counts only for bias-based selection), with
    the task replaced by ``heads_task`` when that is set."""
    shared = {f.name for cls in (RunConfig, LofitConfig, ComputeConfig) for f in fields(cls)}
    kept = {k: options[k] for k in sorted(shared) if k in options and k not in STEP2_ONLY and k not in UNHASHED}
    kept["task"] = options.get("heads_task") or options["task"]
    if kept.get("heads") != "bias-based":
        kept.pop("bias_lr", None)
    return config_key("ranking", kept)


def cell_config(cell: Cell, total_heads: int | None = None) -> CellConfig:
    """The :class:`~lofit.pipeline.CellConfig` of ``cell``; ``num_heads: all`` becomes ``total_heads``."""
    options = {k: v for k, v in cell.config.items() if k not in RUNNER_OPTIONS}
    if options.get("num_heads") == ALL_HEADS:
        if total_heads is None:
            raise ValueError("num_heads: all needs the model's number of heads")
        options["num_heads"] = total_heads
    classes = config_classes(cell.method)
    built = [build_config(cls, options) for cls in classes]
    return CellConfig(built[0], built[1], built[2], built[3] if len(built) > 3 else None)


def make_cell(grid: Grid, phase: str, arm: Arm, task: str, seed: int, point: dict, trial: dict,
              overrides: dict[str, Any]) -> Cell:
    """The cell of ``arm`` on ``task`` with ``seed``: grid options < arm < sweep point < trial <
    overrides; a grid option or override of another method's config is left out of this arm's cells."""
    shared = {k: v for k, v in (grid.options | overrides).items() if OWNERS.get(k, arm.method) == arm.method}
    options = shared | arm.options | point | trial | {"task": task, "seed": seed}
    options |= {k: v for k, v in overrides.items() if k in shared}
    if phase == "tune":
        options |= {"eval_split": "val", "limit": min(grid.tune_limit, overrides.get("limit") or grid.tune_limit)}
    options["method"] = arm.method
    resolved = resolve(arm.method, {k: v for k, v in options.items() if k != "method"})
    cell = Cell(grid.name, "ranking" if resolved["select_only"] else phase, arm.label, task, seed, arm.method,
                tuple(point.items()), tuple(trial.items()), tuple(sorted(resolved.items())))
    cell_config(cell, total_heads=1_000_000)  # every value checked now, before anything runs
    return cell


def check_tuning(grid: Grid) -> None:
    """Every arm that has options to tune has a tune grid with the same number of trials."""
    sizes = {arm.label: len(arm.trials()) for arm in grid.arms if arm.tune}
    untuned = [arm.label for arm in grid.arms if not arm.tune and (arm.method == "lofit" or METHODS[arm.method].config_class)]
    if untuned or len(set(sizes.values())) > 1:
        raise ValueError(f"grid {grid.name}: with --tune every tunable arm needs a tune grid of the same size "
                         f"(trials per arm: {sizes or 'none'}; without a grid: {', '.join(untuned) or 'none'})")


def expand(grid: Grid, phase: str, overrides: dict[str, Any], chosen: dict[tuple, dict] | None = None) -> list[Cell]:
    """The grid's cells of ``phase``: for ``tune``, every trial of every arm with the first
    seed; for ``test``, every seed (with the trial ``chosen`` per (task, label, point), if any).
    Ordered seed first, so that a stopped experiment has whole seeds."""
    cells = []
    seeds = grid.seeds[:1] if phase == "tune" else grid.seeds
    for seed in seeds:
        for task in grid.tasks:
            for arm in grid.arms:
                for point in grid.points():
                    if phase == "tune":
                        cells += [make_cell(grid, phase, arm, task, seed, point, trial, overrides) for trial in arm.trials()]
                    else:
                        trial = (chosen or {}).get((task, arm.label, tuple(point.items())), {})
                        cells.append(make_cell(grid, phase, arm, task, seed, point, trial, overrides))
    return cells
