"""Experiment grids: a YAML file expanded into cells, each one resolved configuration.

A grid names the tasks, seeds and *arms* (a label, a method, the arm's options) of an
experiment, options shared by every cell, and a *sweep* (option -> values) crossed with
the arms. Every (task, arm, sweep point, seed) is one cell. With ``--tune`` an arm's
``tune`` grid (option -> values) is tried on the validation split first; every tuned arm
must have the same number of base trials and tune at least two options (one where the grid
states an equal training ``budget``), so no method gets more tuning than another. A numeric
tuned option is a log grid (a list with a constant ratio between consecutive sorted values,
or ``{low, high, points}``); where the best trial sits at an edge of the range explored,
:func:`search` adds trials one log step beyond it.

A cell's options are flat names of :class:`~lofit.runs.config.RunConfig`,
:class:`~lofit.methods.lofit.config.LofitConfig`, :class:`~lofit.utils.compute.ComputeConfig` and the
method's config, plus two of the runner's own:

- ``heads_task``: the task whose step-1 ranking chooses the heads (the cross-task
  experiment; default: the cell's own task);
- ``select_only: true``: the cell is step 1 alone (the layers experiment).

``num_heads: all`` means every head of the model. A cell's *key* is the SHA-256 of its
resolved configuration: every option with its default filled in, minus those that only
say where or how verbosely to run (:data:`UNHASHED`), those the cell does not read
(``"read_when"`` in a field's metadata) and those of :data:`HASHED_WHEN_SET` left unset.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lofit.methods import METHODS
from lofit.methods.lofit.config import LofitConfig, selection_bias_lr_option
from lofit.runs.config import OPTION_OWNERS, CellConfig, RunConfig
from lofit.runs.config import cell_config as build_cell_config
from lofit.runs.recipes import with_recipe
from lofit.tasks import TASKS, training_task_name
from lofit.utils.compute import ComputeConfig
from lofit.utils.options import option_group, unread_options

RUNNER_OPTIONS = {"heads_task": None, "select_only": False}
"""The runner's own cell options and their defaults."""
UNHASHED = option_group([RunConfig, ComputeConfig], "hashed", False)
"""Options that do not change what a cell computes, only where, how fast or how verbosely (compiling
may round floats differently, as the thread count may), left out of its key (``"hashed": False``
in a field's metadata)."""
ALL_HEADS = "all"
CONFIG_CLASSES = (RunConfig, LofitConfig, ComputeConfig, *(m.config_class for m in METHODS.values() if m.config_class))
HASHED_WHEN_SET = option_group(CONFIG_CLASSES, "hashed", "when set")
"""Options left out of a cell's key while ``None`` (``"hashed": "when set"`` in a field's metadata):
added after cells were keyed, they keep the keys of the cells that do not set them."""
INTEGER_OPTIONS = frozenset(
    f.name
    for cls in CONFIG_CLASSES
    for f in fields(cls)
    if str(getattr(f.type, "__name__", f.type)).split("|")[0].strip() == "int"
)
"""Options whose values are integers (ranks, epochs): tuned values are rounded and stay >= 1."""
LOG_TOLERANCE = 0.01
"""How far (relative) a tuned float value may sit from the exact log grid through the smallest and largest value."""


def shipped_grids() -> dict[str, Path]:
    """The grids shipped with lofit, by name (``table1``, ``num-heads``, ...)."""
    folder = resources.files(__package__)
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def is_numeric(values: list) -> bool:
    """Whether every value is a number (not a bool): a log-spaced option, else a categorical one."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def log_ratio(values: list) -> float:
    """The log step of a numeric tuned option: (largest / smallest) ** (1 / (n - 1)); 1.0 for one value."""
    if len(values) < 2:
        return 1.0
    return (max(values) / min(values)) ** (1 / (len(values) - 1))


def log_grid(low: float, high: float, points: int, integer: bool) -> list:
    """``points`` log-spaced values from ``low`` to ``high``: integers rounded, floats to 4 significant digits."""
    exact = [low * (high / low) ** (i / (points - 1)) for i in range(points)]
    return [round(v) for v in exact] if integer else [float(f"{v:.4g}") for v in exact]


def _off_grid(values: list, integer: bool) -> list:
    """The values that are not on the log grid through the smallest and the largest (integers: not within rounding)."""
    ordered, ratio = sorted(values), log_ratio(values)
    exact = [ordered[0] * ratio**i for i in range(len(ordered))]
    return [v for v, e in zip(ordered, exact) if (abs(v - e) > 0.5 if integer else abs(v / e - 1) > LOG_TOLERANCE)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def tune_values(where: str, option: str, spec: Any) -> list:
    """The values of one tuned option: a list, or ``{low, high, points}`` expanded by :func:`log_grid`.
    A numeric list must be log-spaced, positive and distinct (integer options: whole numbers >= 1);
    a ValueError names ``where`` (grid and arm) and the option otherwise."""
    integer = option in INTEGER_OPTIONS
    if isinstance(spec, dict):
        if (
            set(spec) != {"low", "high", "points"}
            or not is_numeric([spec["low"], spec["high"]])
            or not isinstance(spec["points"], int)
            or spec["points"] < 2
            or not 0 < spec["low"] < spec["high"]
        ):
            raise ValueError(
                f"{where}, option {option}: a compact grid is {{low: L, high: H, points: N}} with "
                f"0 < L < H and N >= 2; got {spec}"
            )
        spec = log_grid(spec["low"], spec["high"], spec["points"], integer)
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"{where}, option {option}: give a list of values or {{low, high, points}}; got {spec!r}")
    if len({json.dumps(v, default=str) for v in spec}) != len(spec):
        raise ValueError(f"{where}, option {option}: the values {spec} repeat (integers after rounding)")
    numbers_as_text = [v for v in spec if isinstance(v, str) and _is_number(v)]
    if numbers_as_text:
        raise ValueError(
            f"{where}, option {option}: YAML reads {numbers_as_text} as text; write numbers with a dot "
            "(1.0e-3, not 1e-3)"
        )
    if not is_numeric(spec):
        return spec  # categorical
    if min(spec) <= 0 or (integer and any(v != int(v) or v < 1 for v in spec)):
        kind = "a whole number >= 1" if integer else "> 0"
        raise ValueError(f"{where}, option {option}: a tuned number must be {kind} (on a log grid); got {spec}")
    spec = [int(v) for v in spec] if integer else spec
    off = _off_grid(spec, integer)
    if off:
        suggestion = log_grid(min(spec), max(spec), len(spec), integer)
        raise ValueError(
            f"{where}, option {option}: {spec} is not log-spaced ({off} off the constant ratio "
            f"{log_ratio(spec):.4g}); use e.g. {suggestion} or {{low: {min(spec)}, high: {max(spec)}, "
            f"points: {len(spec)}}}"
        )
    return spec


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def epochs_option(method: str) -> str | None:
    """The option that sets how many epochs a ``method`` cell trains: ``tune_epochs`` (step 2)
    for LoFiT, ``<method>_epochs`` for another method that has one, None for one without (zero-shot
    trains nothing; ITI and RepE fit their directions in one pass)."""
    if method == "lofit":
        return "tune_epochs"
    config_class = METHODS[method].config_class if method in METHODS else None
    name = f"{method}_epochs"
    return name if config_class and name in {f.name for f in fields(config_class)} else None


def step_beyond(option: str, value: float, ratio: float, up: bool) -> float | None:
    """One log step beyond ``value``: times ``ratio`` (``up``) or divided by it, floats to 6 significant
    digits; an integer option's value is rounded and at least 1, None when that leaves ``value`` itself."""
    new = value * ratio if up else value / ratio
    if option not in INTEGER_OPTIONS:
        return float(f"{new:.6g}")
    new = max(1, round(new))
    return None if new == value else new


@dataclass
class Arm:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    tune: dict[str, list] = field(default_factory=dict)

    def trials(self) -> list[dict[str, Any]]:
        """The base tuning trials: every combination of the tune grid's values, in file order (none without a grid)."""
        if not self.tune:
            return []
        names = list(self.tune)
        return [dict(zip(names, values)) for values in itertools.product(*(self.tune[n] for n in names))]

    def searched(self) -> list[str]:
        """The tuned options with more than one value: the hyper-parameters this arm searches."""
        return [option for option, values in self.tune.items() if len(values) > 1]


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
    tune_limit: int = 300
    """Validation examples each tuning trial is scored on (the first ones; all when the split is smaller)."""
    tune_extend: int = 3
    """Extension trials per side per numeric tuned option, at most (0: the base grid only)."""
    budget: int | dict[str, int] | None = None
    """An equal training budget, stated rather than tuned: every arm that trains runs this many
    epochs (LoFiT: of step 2, ``tune_epochs``; another method: its ``<method>_epochs``), one number
    for every task or one per task (``{clutrr: 48, mquake: 5}``), and its epochs are set nowhere
    else. For a method whose accuracy still rises at the longest training a grid can afford, so
    that a tuned epoch count would sit at the extension cap."""

    def __post_init__(self) -> None:
        """The report's reference row (``compare_to``) checked against the arms and the sweep; each arm's
        tune grid expanded and checked by :func:`tune_values`; the ``budget`` checked."""
        if not isinstance(self.tune_extend, int) or self.tune_extend < 0:
            raise ValueError(f"grid {self.name}: tune_extend must be an integer >= 0; got {self.tune_extend!r}")
        check_compare_to(self)
        for arm in self.arms:
            if not isinstance(arm.tune, dict):
                raise ValueError(f"grid {self.name}, arm {arm.label}: tune maps options to values; got {arm.tune!r}")
            arm.tune = {
                option: tune_values(f"grid {self.name}, arm {arm.label}", option, spec)
                for option, spec in arm.tune.items()
            }
        if self.budget is not None:
            self._check_budget()

    def _check_budget(self) -> None:
        """Refuse a budget that is not a whole number >= 1 (or one per task of the grid), and epochs
        the budget fixes set elsewhere: in the grid's options, a sweep, or an arm's options or tune
        grid (:meth:`budget_options` sets them on every cell)."""
        budgets = self.budget if isinstance(self.budget, dict) else dict.fromkeys(self.tasks, self.budget)
        wrong = {task: epochs for task, epochs in budgets.items() if not _whole_number(epochs)}
        missing = [task for task in self.tasks if task not in budgets]
        if wrong or missing:
            raise ValueError(
                f"grid {self.name}: budget is a whole number of epochs >= 1, or one per task "
                f"({', '.join(self.tasks)}); got {self.budget!r}"
                + (f" (no budget for {', '.join(missing)})" if missing else "")
            )
        fixed = f"which the grid's budget ({self.budget_words()}) fixes"
        for where, options in (("options", self.options), ("sweep", self.sweep)):
            clash = sorted(self.fixed_epochs() & set(options))
            if clash:
                raise ValueError(f"grid {self.name}: its {where} give {', '.join(clash)}, {fixed}; remove it there")
        for arm in self.arms:
            option = epochs_option(arm.method)
            for where, options in (("tune grid", arm.tune), ("options", arm.options)):
                if option in options:
                    raise ValueError(
                        f"grid {self.name}, arm {arm.label}: its {where} gives {option}, {fixed}; remove it there"
                    )

    def fixed_epochs(self) -> set[str]:
        """The epochs options the grid's ``budget`` fixes: those of its training arms (none without a budget)."""
        if self.budget is None:
            return set()
        return {option for arm in self.arms if (option := epochs_option(arm.method)) is not None}

    def budget_words(self) -> str:
        """The budget in words: "48 epochs for every training arm", or per task."""
        if isinstance(self.budget, dict):
            return (
                ", ".join(f"{task}: {epochs}" for task, epochs in self.budget.items())
                + " epochs for every training arm"
            )
        return f"{self.budget} epochs for every training arm"

    def budget_options(self, arm: Arm, task: str) -> dict[str, int]:
        """The epochs the grid's ``budget`` gives ``arm``'s cells on ``task`` (none without a budget, or
        for an arm whose method has no epochs option)."""
        option = epochs_option(arm.method)
        if self.budget is None or option is None:
            return {}
        if isinstance(self.budget, dict) and task not in self.budget:
            raise ValueError(
                f"grid {self.name}: its budget ({self.budget_words()}) gives no epochs for task {task!r}; add it there"
            )
        return {option: self.budget[task] if isinstance(self.budget, dict) else self.budget}

    def points(self) -> list[dict[str, Any]]:
        names = list(self.sweep)
        return [dict(zip(names, values)) for values in itertools.product(*(self.sweep[n] for n in names))]


def same_value(a: Any, b: Any) -> bool:
    """Whether two option values are one: equal as text, or as numbers (0.1, "0.1" and "1e-1";
    3 and 3.0), as a value typed on the command line meets one read from YAML or JSON."""
    if str(a) == str(b):
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def check_compare_to(grid: Grid) -> None:
    """A ValueError unless the report's ``compare_to`` singles out one row of every task: a
    mapping with ``label``, one of the arms' labels (needed with more than one arm), and a value
    of each swept option that has several (:func:`same_value`), none other."""
    spec = grid.report.get("compare_to") if isinstance(grid.report, dict) else None
    if spec is None:
        return
    where = f"grid {grid.name}: report compare_to"
    labels = [arm.label for arm in grid.arms]
    if not isinstance(spec, dict):
        raise ValueError(f"{where} maps label and swept options to the reference row's values; got {spec!r}")
    unknown = sorted(set(spec) - set(grid.sweep) - {"label"})
    if unknown:
        raise ValueError(
            f"{where} names {', '.join(unknown)}: neither label nor a swept option ({', '.join(grid.sweep) or 'none'})"
        )
    if "label" in spec and spec["label"] not in labels:
        raise ValueError(f"{where} names no arm's label: {spec['label']!r} (labels: {', '.join(labels)})")
    if len(labels) > 1 and "label" not in spec:
        raise ValueError(f"{where} needs a label: the grid has {len(labels)} arms")
    for option, values in grid.sweep.items():
        if option in spec and not any(same_value(spec[option], value) for value in values):
            raise ValueError(f"{where}: {option}={spec[option]!r} is not among its swept values {values}")
        if option not in spec and len(values) > 1:
            raise ValueError(f"{where} needs a value of {option}: it is swept over {values}")


def _grid_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    """The file of a shipped grid named ``name_or_path``, or that path (relative to ``relative_to``'s
    folder when it is relative and one is given); a ValueError when there is none."""
    shipped = shipped_grids()
    path = shipped.get(name_or_path) or Path(name_or_path)
    if relative_to is not None and name_or_path not in shipped and not path.is_absolute():
        path = relative_to.parent / path
    if not path.is_file():
        what = f"{relative_to}: no base grid" if relative_to is not None else "no experiment"
        raise ValueError(f"{what} {name_or_path!r}: name one of {', '.join(sorted(shipped))} or a grid YAML file")
    return path


def merge_arms(path: Path, base_arms: list[dict], arms: list[dict], drop: list[str]) -> list[dict]:
    """A derived grid's arms over its base's: the base arms labelled in ``drop`` go; an arm whose
    label a base arm has replaces that arm's keys it gives (``method``, ``options``, ``tune``: each
    whole, not merged) and keeps its place; an arm with a new label is added after the base's."""
    merged = {arm.get("label"): dict(arm) for arm in base_arms}
    unknown = [label for label in drop if label not in merged]
    if unknown:
        raise ValueError(f"{path}: drop_arms names no arm of its base: {unknown} (its arms: {', '.join(merged)})")
    merged = {label: arm for label, arm in merged.items() if label not in drop}
    for arm in arms:
        if not isinstance(arm, dict) or "label" not in arm:
            raise ValueError(f"{path}: each arm is a mapping with a label; got {arm!r}")
        merged[arm["label"]] = merged.get(arm["label"], {}) | arm
    return list(merged.values())


def grid_data(path: Path, derived: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping a grid file states, over its ``base`` grid's when it names one (a shipped grid or
    a file relative to this one): every key it gives replaces the base's, except ``arms`` and
    ``drop_arms`` (:func:`merge_arms`); ``name`` is the file's stem unless given, not the base's. A
    ValueError for a file that is not a mapping, an unknown key, ``drop_arms`` without a base or a
    chain of bases that returns to a grid it started from."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping (name, tasks, seeds, arms, ...)")
    known = {f.name for f in fields(Grid)} | {"base", "drop_arms"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown grid keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    data = {"name": path.stem} | data
    if "base" not in data:
        if "drop_arms" in data:
            raise ValueError(f"{path}: drop_arms drops arms of a base grid; name it with base: <grid>")
        return data
    base_path = _grid_path(str(data.pop("base")), relative_to=path)
    chain = (*derived, path.resolve())
    if base_path.resolve() in chain:
        raise ValueError(f"{path}: its bases form a circle ({' -> '.join(p.name for p in (*chain, base_path))})")
    base = grid_data(base_path, chain)
    drop = data.pop("drop_arms", [])
    if not isinstance(drop, list):
        raise ValueError(f"{path}: drop_arms is a list of its base's arm labels; got {drop!r}")
    data["arms"] = merge_arms(path, base.get("arms") or [], data.get("arms") or [], drop)
    return base | data


def load_grid(name_or_path: str) -> Grid:
    """A shipped grid by name, or a grid YAML file (over the grid its ``base`` names, if any:
    :func:`grid_data`); a ValueError naming what is wrong."""
    path = _grid_path(name_or_path)
    data = grid_data(path)
    try:
        arms = [Arm(**arm) for arm in data.pop("arms")]
        grid = Grid(**{"description": ""} | data, arms=arms)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a valid grid: {error}") from None
    if not grid.arms or len({arm.label for arm in grid.arms}) != len(grid.arms):
        raise ValueError(f"{path}: a grid needs arms with distinct labels")
    return grid


def grid_mapping(grid: Grid) -> dict[str, Any]:
    """The grid as the mapping a grid file states, its base merged and its tune grids expanded (every
    key given, arms last): :func:`load_grid` reads it back to the same cells under the same keys."""
    mapping = asdict(grid)
    mapping["arms"] = mapping.pop("arms")
    return mapping


@dataclass(frozen=True, kw_only=True)
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
    extends: str | None = None
    """For an extension trial, the option it steps beyond the explored range."""

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def key(self) -> str:
        return ranking_key(self.config) if self.phase == "ranking" else config_key(self.method, self.config)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.point + self.trial)
        extra += f"; extends {self.extends}" if self.extends else ""
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
    """SHA-256 (hex, 16 digits) of the resolved configuration without :data:`UNHASHED`, without
    the options it does not read (``"read_when"`` in a field's metadata: a new default of
    ``group_lambda`` does not turn finished L1 cells into new ones, nor a grid's ``select_bias_lr``
    the cells whose selector is not bias-based) and without :data:`HASHED_WHEN_SET` options left unset."""
    unread = unread_options(CONFIG_CLASSES, options).keys() | {
        name for name in HASHED_WHEN_SET if options.get(name) is None
    }
    kept = {k: v for k, v in sorted(options.items()) if k not in UNHASHED and k not in unread} | {"method": method}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


STEP2_ONLY = option_group([RunConfig, LofitConfig], "step", 2)
"""Options step 1 does not read (``"step": 2`` in a field's metadata): cells differing only in
these share one head ranking (a recipe's values are in the options themselves)."""


def ranking_key(options: dict[str, Any]) -> str:
    """The key of the step-1 ranking a cell uses: its run, LoFiT and compute options minus
    :data:`STEP2_ONLY` (the bias learning rate counts only for bias-based selection without its
    own ``select_bias_lr``), with the task replaced by ``heads_task`` when that is set."""
    shared = {f.name for cls in (RunConfig, LofitConfig, ComputeConfig) for f in fields(cls)}
    kept = {k: options[k] for k in sorted(shared) if k in options and k not in STEP2_ONLY and k not in UNHASHED}
    kept["task"] = options.get("heads_task") or options["task"]
    if selection_bias_lr_option(kept) != "bias_lr":
        kept.pop("bias_lr", None)
    return config_key("ranking", kept)


def canonical_options(options: dict[str, Any], training_examples: int | None = None) -> dict[str, Any]:
    """``options`` with those set to what leaving them unset means, unset: a ``heads_task`` naming
    the task the cell trains on (its heads are then that task's own) and, for a cell with its own
    task's heads, a ``train_size`` that samples what the task's default size does: equal to it
    or, for a task whose default is all of its training examples, at least ``training_examples``
    (how many it has; None where the caller does not know, and then only equality counts: a size
    at least that large trains on all of them, in file order, as unset does). Cells whose
    canonical options are equal measure the same thing under different keys: cross-task's
    diagonal is table3's LoFiT arm, data-efficiency's n = 300 is table3's cells on CLUTRR (300
    stories, its default) and on MQuAKE (all 134 examples)."""
    options = dict(options)
    trains_on = training_task_name(options["task"])
    if options.get("heads_task") == trains_on:
        options["heads_task"] = None
    task_class = TASKS.get(trains_on)
    own_heads = options.get("heads_task") is None  # else step 1 samples train_size examples of another task
    size = options.get("train_size")
    if own_heads and task_class is not None and size is not None:
        default = task_class.default_train_size
        if size == default or (default is None and training_examples is not None and size >= training_examples):
            options["train_size"] = None
    return options


def measurement_key(method: str, phase: str, options: dict[str, Any], training_examples: int | None = None) -> str:
    """What a cell (or, for ``phase`` ``ranking``, a step 1) with ``options`` measures, as a key:
    the :func:`config_key` (:func:`ranking_key`, its task the one whose training examples step 1
    uses) of its :func:`canonical_options` (``training_examples``: how many its task has, where
    known). Equal for cells of two experiments that measure the same thing, so one copies the
    other's record (:class:`~lofit.experiments.runner.Runner`)."""
    options = canonical_options({k: v for k, v in options.items() if k != "method"}, training_examples)
    if phase == "ranking":
        return ranking_key(options | {"task": training_task_name(options.get("heads_task") or options["task"])})
    return config_key(method, options)


EVALUATION_ONLY = option_group([RunConfig], "evaluation", True)
"""Options that shape only a cell's evaluation (``"evaluation": True`` in a field's metadata):
which split, how many examples, which file, how answers are matched."""


def training_key(method: str, options: dict[str, Any]) -> str | None:
    """The key of what a ``method`` cell with ``options`` trains: its key without
    :data:`EVALUATION_ONLY` and with a ``TRAIN:EVAL`` task as TRAIN. Cells with one training key
    (a tuning trial and its test cell of the same seed; ``truthfulqa`` and ``truthfulqa:mmlu``)
    train the same adapter, so one trains it and the others evaluate it. None for a method
    that trains nothing."""
    if not METHODS[method].trains:
        return None
    kept = {k: v for k, v in options.items() if k not in EVALUATION_ONLY}
    kept["task"] = training_task_name(options["task"])
    return config_key(f"{method}:trained", kept)


def cell_config(cell: Cell, total_heads: int | None = None) -> CellConfig:
    """The :class:`~lofit.runs.config.CellConfig` of ``cell``; ``num_heads: all`` becomes ``total_heads``."""
    options = {k: v for k, v in cell.config.items() if k not in RUNNER_OPTIONS}
    if options.get("num_heads") == ALL_HEADS:
        if total_heads is None:
            raise ValueError("num_heads: all needs the model's number of heads")
        options["num_heads"] = total_heads
    return build_cell_config(options, cell.method)


def admissible(method: str, options: dict[str, Any]) -> bool:
    """Whether the configs of ``method`` accept ``options`` (a cell's resolved options, one value changed)."""
    try:
        resolved = resolve(method, {k: v for k, v in options.items() if k != "method"})
        cell_config(
            Cell(
                experiment="",
                phase="tune",
                label="",
                task="",
                seed=0,
                method=method,
                options=tuple(sorted(resolved.items())),
            ),
            total_heads=1_000_000,
        )
    except ValueError:
        return False
    return True


def make_cell(
    grid: Grid,
    phase: str,
    arm: Arm,
    task: str,
    seed: int,
    point: dict,
    trial: dict,
    overrides: dict[str, Any],
    extends: str | None = None,
) -> Cell:
    """The cell of ``arm`` on ``task`` with ``seed``: recipe < grid options < arm < the grid's budget <
    sweep point < trial < overrides (the budget's epochs are set nowhere else); a grid option or
    override of another method's config is left out of this arm's cells."""
    shared = {k: v for k, v in (grid.options | overrides).items() if OPTION_OWNERS.get(k, arm.method) == arm.method}
    options = shared | arm.options | grid.budget_options(arm, task) | point | trial | {"task": task, "seed": seed}
    options |= {k: v for k, v in overrides.items() if k in shared}
    if phase == "tune":
        options |= {"eval_split": "val", "limit": min(grid.tune_limit, overrides.get("limit") or grid.tune_limit)}
    options = with_recipe(options | {"method": arm.method}, task)  # a recipe's values lie below every given option
    resolved = resolve(arm.method, {k: v for k, v in options.items() if k != "method"})
    cell = Cell(
        experiment=grid.name,
        phase="ranking" if resolved["select_only"] else phase,
        label=arm.label,
        task=task,
        seed=seed,
        method=arm.method,
        point=tuple(point.items()),
        trial=tuple(trial.items()),
        options=tuple(sorted(resolved.items())),
        extends=extends,
    )
    cell_config(cell, total_heads=1_000_000)  # every value checked now, before anything runs
    return cell


def check_tuning(grid: Grid) -> None:
    """Every arm that has options to tune has a tune grid searching at least two options (one
    where the grid's ``budget`` fixes the arm's epochs: they are then stated, not searched), and
    every tune grid has the same number of base trials (extension trials come on top)."""
    sizes = {arm.label: len(arm.trials()) for arm in grid.arms if arm.tune}
    untuned = [
        arm.label for arm in grid.arms if not arm.tune and (arm.method == "lofit" or METHODS[arm.method].config_class)
    ]
    if untuned or len(set(sizes.values())) > 1:
        raise ValueError(
            f"grid {grid.name}: with --tune every tunable arm needs a tune grid of the same size "
            f"(trials per arm: {sizes or 'none'}; without a grid: {', '.join(untuned) or 'none'})"
        )
    narrow = {
        arm.label: arm.searched()
        for arm in grid.arms
        if arm.tune and len(arm.searched()) < (1 if grid.budget and epochs_option(arm.method) else 2)
    }
    if narrow:
        raise ValueError(
            f"grid {grid.name}: with --tune every tunable arm must tune at least two hyper-parameters, one "
            "where the grid's budget fixes its epochs (options with two or more values); "
            + "; ".join(f"{label} tunes {', '.join(options) or 'none'}" for label, options in narrow.items())
        )


def check_searches(grid: Grid, overrides: dict[str, Any], tune: bool) -> None:
    """Refuse what would make a grid's searched values one cell, under one key: an option that the
    sweep gives two or more values or (with ``tune``) an arm tunes, which no cell of that arm on a
    task reads (``"read_when"`` in the field's metadata); with ``tune``, an override (``--option``)
    of an option an arm tunes; an override of the epochs a grid's ``budget`` fixes."""
    fixed = sorted(grid.fixed_epochs() & set(overrides))
    if fixed:
        raise ValueError(
            f"grid {grid.name}: the command line sets {', '.join(fixed)} (--option), which the grid's budget "
            f"({grid.budget_words()}) fixes; leave it out, or copy the grid with another budget"
        )
    swept = [option for option, values in grid.sweep.items() if len(values) > 1]
    searched: dict[str, list[str]] = {}
    phases: dict[str, str] = {}
    for arm in grid.arms:
        tuned = arm.searched() if tune else []
        overridden = sorted(set(tuned) & set(overrides))
        if overridden:
            raise ValueError(
                f"grid {grid.name}, arm {arm.label}: the command line sets {', '.join(overridden)}, which --tune "
                "searches for this arm, so its trials would be one cell; leave it to the tuning, or run without --tune"
            )
        searched[arm.label] = swept + tuned
        phases[arm.label] = "tune" if tune and arm.trials() else "test"  # an arm without a tune grid is only tested
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    first_seed = replace(grid, seeds=grid.seeds[:1])  # the seed changes no option's reading
    for phase in dict.fromkeys(phases.values()):  # the base trials of tuned arms, the untuned test cells of others
        for cell in expand(first_seed, phase, overrides):
            if phases[cell.label] == phase and searched[cell.label]:
                groups.setdefault((cell.label, cell.task), []).append(cell.config)
    for (label, task), resolved in groups.items():
        unread = [unread_options(CONFIG_CLASSES, options) for options in resolved]
        idle = [option for option in searched[label] if all(option in options for options in unread)]
        if idle:
            reasons = "; ".join(
                f"{option} is read only with "
                + ", ".join(f"{other}: {value}" for other, value in unread[0][option].items())
                + " (here "
                + ", ".join(
                    f"{other}: {resolved[0].get(other)}" + (" from the command line" if other in overrides else "")
                    for other in unread[0][option]
                )
                + ")"
                for option in idle
            )
            raise ValueError(
                f"grid {grid.name}, arm {label} on {task}: searches {', '.join(idle)}, which its cells do not "
                f"read ({reasons}), so its values would be one cell; set the option that makes them read it, or "
                "search an option they read"
            )


INSIDE, EXTENDED_INSIDE, EDGE_PENDING, EDGE_CAP, EDGE_BOUND, FLAT, NO_EFFECT = (
    "inside",
    "inside after extension",
    "edge (pending)",
    "edge (cap)",
    "edge (bound)",
    "flat",
    "no effect: all heads",
)
"""Where a chosen value sits in the range explored (:func:`edge_step`, :func:`flat_step`), or
that the option shapes nothing the trial trains (:func:`chooses_nothing`)."""

STEP1_ONLY = option_group([LofitConfig], "step", 1)
"""Options only step 1 reads (``"step": 1`` in a field's metadata): the head ranking's."""


def chooses_nothing(option: str, options: dict[str, Any]) -> bool:
    """Whether ``option`` shapes nothing that a cell with ``options`` trains: a step-1 option
    (:data:`STEP1_ONLY`) where every head is selected (``num_heads: all``), so that the ranking
    it shapes chooses no head over another. Its trials differ at most by the order of the same
    heads: their ties are no plateau to extend (:func:`search`), and the report gives its value
    no position in the range explored."""
    return option in STEP1_ONLY and options.get("num_heads") == ALL_HEADS


def edge_step(
    option: str,
    base: list,
    explored: list,
    value: Any,
    cap: int,
    accepts: Callable[[Any], bool],
    line: list | None = None,
    tied: list | None = None,
) -> tuple[str | None, list]:
    """Where ``value``, the best trial's, sits among the values tried for a tuned option whose
    base grid is ``base``, and the values due a trial; ``explored`` holds the option's values in
    every trial of the group, ``line`` (default: ``explored``) those in the trials whose other
    tuned options equal the best trial's: the line through the best trial along this option, and
    ``tied`` (default: none) those of the line's trials that scored the same as the best.

    The value is a local optimum along the option when, on each side of it, the line holds a
    value whose trial scores below the best: walking outwards from ``value``, the values of
    trials tied with the best are passed over (a plateau that reaches the edge of the range
    explored may go on rising beyond it), and the first value that is not tied closes the side.
    A side left open is due one trial beyond the last tied value (the frontier), the other
    options at the best trial's values: at the nearest value explored beyond it in another trial;
    past every explored value, one log step beyond (an extension), unless ``cap`` values beyond the base grid
    were explored on that side (the extension steps taken: a value counts once, however many
    trials of the other options it has) or the option takes no value there (``accepts`` says
    which it takes). Returns (None, []) for an option not searched on a log grid (categorical, or one
    value); else (:data:`EDGE_PENDING`, the values due) while any is due, then
    (:data:`EDGE_CAP`, []) or (:data:`EDGE_BOUND`, []) for a side left unexplored at the cap or
    at a bound, else (:data:`INSIDE`, []) strictly inside the base grid's range or
    (:data:`EXTENDED_INSIDE`, []) inside the explored range only."""
    if len(base) < 2 or not is_numeric(base):
        return None, []
    line = explored if line is None else line
    plateau = {float(v) for v in tied or ()}
    due, ends = [], []
    for up in (False, True):
        frontier, closed = value, False
        for neighbour in sorted((v for v in line if (v > value if up else v < value)), reverse=not up):
            if float(neighbour) not in plateau:
                closed = True  # it scores below the best
                break
            frontier = neighbour
        if closed:
            continue
        beyond = [v for v in explored if (v > frontier if up else v < frontier)]
        if beyond:
            new = min(beyond) if up else max(beyond)
        else:
            steps = len({float(v) for v in explored if (v > max(base) if up else v < min(base))})
            if steps >= cap:
                ends.append(EDGE_CAP)
                continue
            new = step_beyond(option, frontier, log_ratio(base), up)
        if new is None or not accepts(new):
            ends.append(EDGE_BOUND)
        else:
            due.append(new)
    if due:
        return EDGE_PENDING, due
    if ends:
        return (EDGE_CAP if EDGE_CAP in ends else EDGE_BOUND), []
    return (INSIDE if min(base) < value < max(base) else EXTENDED_INSIDE), []


def flat_step(
    option: str, base: list, explored: list, cap: int, accepts: Callable[[Any], bool]
) -> tuple[str | None, list]:
    """For a group whose trials all scored the same, so that no value beats another (every trial
    scored 0, say): the values of a tuned option due a trial, ``base`` its base grid and
    ``explored`` its values in every trial. One log step beyond the lowest explored value and one
    beyond the highest, each side until ``cap`` values beyond the base grid were explored there
    or the option takes no value there (``accepts``): a method that fails throughout the base
    grid is looked for on both sides of it. Returns (None, []) for an option not searched on a log
    grid; (:data:`EDGE_PENDING`, the values due) while any is due; then (:data:`EDGE_CAP`, []) for
    a group never extended (``cap`` 0), else (:data:`FLAT`, [])."""
    if len(base) < 2 or not is_numeric(base):
        return None, []
    if cap == 0:
        return EDGE_CAP, []
    due = []
    for up in (False, True):
        if len({float(v) for v in explored if (v > max(base) if up else v < min(base))}) >= cap:
            continue
        new = step_beyond(option, max(explored) if up else min(explored), log_ratio(base), up)
        if new is not None and accepts(new):
            due.append(new)
    return (EDGE_PENDING, due) if due else (FLAT, [])


def on_option_line(trial: dict, best: dict, option: str) -> bool:
    """Whether ``trial`` (tuned values by option) has ``best``'s values of every option but
    ``option``: it lies on the line through the best trial along ``option``."""
    return all(same_value(trial.get(other), value) for other, value in best.items() if other != option)


def option_line(trials: list[dict], best: dict, option: str) -> list:
    """The values of ``option`` in those ``trials`` on the line through ``best`` along ``option``
    (:func:`on_option_line`)."""
    return [trial[option] for trial in trials if on_option_line(trial, best, option)]


def tied_on_line(trials: list[dict], scores: list[float], best: dict, option: str) -> list:
    """The values of ``option`` on the line through ``best`` along ``option`` whose trials
    (``scores`` in the order of ``trials``) scored the highest score, the best's own included."""
    top = max(scores)
    on_line = [(trial, score) for trial, score in zip(trials, scores) if on_option_line(trial, best, option)]
    return [trial[option] for trial, score in on_line if score == top]


@dataclass
class Search:
    """The tuning of one (task, arm, sweep point): its trials so far (the base grid, then the
    extension trials in the order they were added), whether it has settled (every trial
    finished and no extension due), and its best finished trial once settled."""

    cells: list[Cell]
    settled: bool
    best: Cell | None = None


def all_tied(scores: list[float]) -> bool:
    """Whether no trial of a group beats another: every score that counts (not -inf, a trial that
    is not eligible) is the same, or none counts."""
    return len({score for score in scores if score != float("-inf")}) <= 1


def _accepts(method: str, options: dict[str, Any], option: str, value: Any) -> bool:
    """Whether ``method`` accepts ``options`` with ``option`` set to ``value`` (:func:`admissible`)."""
    return admissible(method, options | {option: value})


def _edges_due(
    arm: Arm,
    cap: int,
    trials: list[dict],
    scores: list[float],
    chosen: dict,
    config: dict[str, Any],
    plateaus: bool,
) -> dict[str, list]:
    """For each tuned option of ``arm``, the values due a trial along the line through the best
    trial (``chosen``, its tuned values; ``config``, its options) among ``trials`` (tuned values,
    ``scores`` in their order), by :func:`edge_step` with extensions up to ``cap``. With
    ``plateaus``, the trials tied with the best are passed over (:func:`tied_on_line`) and an
    option that chooses nothing at ``config`` (:func:`chooses_nothing`) is left out."""
    due = {}
    for option in arm.searched():
        if plateaus and chooses_nothing(option, config):
            continue
        due[option] = edge_step(
            option,
            arm.tune[option],
            [trial[option] for trial in trials],
            chosen[option],
            cap,
            functools.partial(_accepts, arm.method, config, option),
            option_line(trials, chosen, option),
            tied_on_line(trials, scores, chosen, option) if plateaus else None,
        )[1]
    return due


def search(
    grid: Grid, arm: Arm, task: str, point: dict, overrides: dict[str, Any], score: Callable[[Cell], float | None]
) -> Search:
    """Replay the tuning of ``arm`` on ``task`` at ``point`` from the ``score`` of each finished trial
    (None: not finished). Once every trial so far has a score, the best (highest score, the earlier
    trial on a tie) is looked at: for each numeric tuned option whose line through the best trial
    lacks a value on a side (:func:`edge_step`), one trial with that option at the nearest value
    explored on that side, or one log step beyond every explored value, and the other options at
    the best trial's values is added; this repeats until none is due. Where none is due but no
    trial beats another (:func:`all_tied`), no value is best: each option is extended on both sides instead
    (:func:`flat_step`), until a trial scores otherwise or every side reached the cap or a bound.
    Where none is due and some trials tie with the best, a side of a line on which those tied
    trials reach the edge of the values explored (a plateau that may rise beyond it) is due one
    trial past the plateau's end (``tied`` of :func:`edge_step`), except along an option that
    chooses nothing there (:func:`chooses_nothing`), whose trials tie as one training. Plateaus are
    looked at only once nothing else is due, so a tie never changes the path of the search before
    it settles: it only adds trials to the settled state."""
    seed = grid.seeds[0]
    cells = [make_cell(grid, "tune", arm, task, seed, point, trial, overrides) for trial in arm.trials()]
    while True:
        scores = [score(cell) for cell in cells]
        if any(s is None for s in scores):
            return Search(cells, False)
        if not cells:
            return Search(cells, True)
        best = cells[scores.index(max(scores))]
        trials, chosen = [dict(cell.trial) for cell in cells], dict(best.trial)
        due = _edges_due(arm, grid.tune_extend, trials, scores, chosen, best.config, plateaus=False)
        if not any(due.values()) and len(cells) > 1 and all_tied(scores):  # settled, but flat: both sides
            due = {
                option: flat_step(
                    option,
                    arm.tune[option],
                    [trial[option] for trial in trials],
                    grid.tune_extend,
                    functools.partial(_accepts, arm.method, best.config, option),
                )[1]
                for option in arm.searched()
            }
        elif not any(due.values()):  # settled: a plateau of trials tied with the best may reach an edge
            due = _edges_due(arm, grid.tune_extend, trials, scores, chosen, best.config, plateaus=True)
        added = [
            make_cell(grid, "tune", arm, task, seed, point, chosen | {option: new}, overrides, option)
            for option, values in due.items()
            for new in values
        ]
        if not added:
            return Search(cells, True, best)
        cells += added


def tuning_group(task: str, label: str, point: tuple) -> tuple[str, str, tuple]:
    """The tuning group (task, label, sweep point) that chooses the setting of a test cell on
    ``task``: the task itself, or for a ``TRAIN:EVAL`` task TRAIN, since such a cell trains TRAIN's
    adapter and EVAL may have no validation split (an out-of-domain task such as NQ-open)."""
    return training_task_name(task), label, point


def expand(grid: Grid, phase: str, overrides: dict[str, Any], chosen: dict[tuple, dict] | None = None) -> list[Cell]:
    """The grid's cells of ``phase``: for ``tune``, every base trial of every arm with the first
    seed; for ``test``, every seed (with the trial ``chosen`` for the cell's :func:`tuning_group`, if any).
    Ordered seed first, so that a stopped experiment has whole seeds."""
    cells = []
    seeds = grid.seeds[:1] if phase == "tune" else grid.seeds
    for seed in seeds:
        for task in grid.tasks:
            for arm in grid.arms:
                for point in grid.points():
                    if phase == "tune":
                        cells += [
                            make_cell(grid, phase, arm, task, seed, point, trial, overrides) for trial in arm.trials()
                        ]
                    else:
                        trial = (chosen or {}).get(tuning_group(task, arm.label, tuple(point.items())), {})
                        cells.append(make_cell(grid, phase, arm, task, seed, point, trial, overrides))
    return cells
