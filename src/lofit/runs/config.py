"""A run's configuration: :class:`RunConfig` (what to train and evaluate, where), the
:class:`CellConfig` of one unit of work, and the one conversion of flat option values
(command-line flags, a ``--config`` file, an experiment cell) into configs,
:func:`build_configs`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lofit.methods import METHODS, get_method
from lofit.methods.lofit.config import LofitConfig
from lofit.runs.recipes import NO_RECIPE, RECIPES
from lofit.utils.compute import ComputeConfig
from lofit.utils.options import OptionsError, build_config, option_group


@dataclass
class RunConfig:
    """What to train and evaluate, and where to write it."""

    task: str = field(
        default="clutrr",
        metadata={
            "help": (
                "task name, or data of your own: a .jsonl/.csv/.parquet file or a datasets dataset "
                "(owner/name[:split] or a folder; see docs/data.md)"
            )
        },
    )
    eval_file: str | None = field(
        default=None,
        metadata={
            "step": 2,
            "evaluation": True,
            "help": "with your own data: the file or dataset to evaluate on (default: the training data)",
        },
    )
    match: str = field(
        default="exact",
        metadata={
            "step": 2,
            "evaluation": True,
            "help": "with a file task of prompt/completion rows: 'exact' or 'contains' (default: exact)",
        },
    )
    method: str = field(default="lofit", metadata={"step": 2, "help": "the method", "choices": METHODS})
    recipe: str | None = field(
        default=None,
        metadata={
            "step": 2,
            "help": "start from a preset of option values: 'paper' (the original code's settings for the task; "
            "see docs/method.md) or 'none' (the plain defaults); options given explicitly override it "
            "(default: LoFiT's step-1 settings measured to localize on the task, where there are some)",
        },
    )
    model: str = field(
        default="default",
        metadata={"help": "'default' (SmolLM2-135M), 'gemma3-270m', a folder, a .gguf file or a hub id"},
    )
    data_dir: str | None = field(default=None, metadata={"hashed": False, "help": "data folder (default: $LOFIT_DATA)"})
    output_dir: str | None = field(
        default=None, metadata={"hashed": False, "help": "run folder (default: runs/<task>-<model>)"}
    )
    train_size: int | None = field(
        default=None,
        metadata={
            "help": "training examples sampled (default: the task's, 300 for CLUTRR); more than the task has "
            "trains on all of them, with a warning kept in metrics.json"
        },
    )
    eval_split: str = field(
        default="test", metadata={"step": 2, "evaluation": True, "help": "split to evaluate: val or test"}
    )
    eval_batch_size: int = field(
        default=16, metadata={"resume": "may change", "hashed": False, "help": "prompts per generation batch"}
    )
    limit: int | None = field(
        default=None,
        metadata={"resume": "may change", "step": 2, "evaluation": True, "help": "evaluate only the first N examples"},
    )
    beta: float = field(default=0.5, metadata={"help": "DPO beta, for tasks trained on preferences"})
    chat_template: bool = field(
        default=False, metadata={"help": "wrap prompts in the tokenizer's chat template (instruct models)"}
    )
    fold: str = field(
        default="0", metadata={"help": "TruthfulQA fold: 0, 1, or all (each fold, then the mean; default: 0)"}
    )
    all_pairs: bool = field(
        default=False,
        metadata={
            "help": (
                "TruthfulQA: train on the best answer against every incorrect answer, not only the first "
                "(default: False)"
            )
        },
    )

    save_steps: int | None = field(
        default=None,
        metadata={
            "resume": "may change",
            "hashed": False,
            "help": "also checkpoint every N optimiser steps (default: at the end of each epoch only)",
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "resume": "may change",
            "hashed": False,
            "help": "continue the interrupted run in the output folder from its newest checkpoint",
        },
    )
    progress: bool = field(
        default=True, metadata={"resume": "may change", "hashed": False, "help": "show progress bars"}
    )

    def __post_init__(self) -> None:
        if self.recipe is not None and self.recipe not in (*RECIPES, NO_RECIPE):
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of: {', '.join([*RECIPES, NO_RECIPE])}")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"save_steps must be >= 1; got {self.save_steps}")
        self.folds()

    def folds(self) -> list[int]:
        if self.fold == "all":
            return [0, 1]
        if self.fold not in ("0", "1"):
            raise ValueError(f"fold must be 0, 1 or all; got {self.fold!r}")
        return [int(self.fold)]

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        model_name = Path(self.model).name.removesuffix(".gguf").replace("/", "_")
        is_file = self.task.endswith(
            (".jsonl", ".csv", ".parquet")
        )  # a dataset id owner/name[:split] becomes owner_name_split
        task_name = Path(self.task).stem if is_file else self.task.replace("/", "_").replace(":", "_")
        method = "" if self.method == "lofit" else f"-{self.method}"
        return Path("runs") / f"{task_name}-{model_name}{method}"


RESUME_IGNORES = option_group([RunConfig], "resume", "may change")
"""Run options that may change between an interrupted run and its resumption (``"resume": "may
change"`` in a field's metadata)."""


@dataclass(kw_only=True)
class CellConfig:
    """One fully resolved unit of work: what to run (one fold), how to fit it, where to compute it."""

    run: RunConfig
    lofit: LofitConfig = field(default_factory=LofitConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    method: object | None = None
    """The config dataclass of ``run.method`` (None: its defaults, or a method without options)."""


OPTION_OWNERS: dict[str, str] = {
    f.name: name for name, method in METHODS.items() if method.config_class for f in fields(method.config_class)
}
"""Each method-specific option and the method it belongs to."""


def build_configs(
    values: dict[str, Any], methods: Sequence[str]
) -> tuple[RunConfig, LofitConfig, ComputeConfig, dict[str, object | None]]:
    """The one conversion of flat option values (flags, a ``--config`` file, an experiment cell)
    into configs: RunConfig, LofitConfig, ComputeConfig and each of ``methods``' own config (None
    for a method without options). Options of a method not in ``methods`` are refused first, on
    their own; then every value a config refuses, all in one OptionsError, a problem per line."""
    problems = [
        f"--{name.replace('_', '-')} is an option of --method {OPTION_OWNERS[name]}; this run uses {', '.join(methods)}"
        for name in sorted(values)
        if name in OPTION_OWNERS and OPTION_OWNERS[name] not in methods
    ]
    if problems:
        raise OptionsError(problems)
    built = []
    for cls in (RunConfig, LofitConfig, ComputeConfig):
        try:
            built.append(build_config(cls, values))
        except ValueError as error:
            problems.append(str(error))
    method_configs: dict[str, object | None] = {}
    for name in methods:
        try:
            config_class = get_method(name).config_class
            method_configs[name] = build_config(config_class, values) if config_class is not None else None
        except (ValueError, TypeError) as error:
            problems.append(str(error))
    if problems:
        raise OptionsError(problems)
    run, lofit, compute = built
    return run, lofit, compute, method_configs


def cell_config(values: dict[str, Any], method: str) -> CellConfig:
    """The :class:`CellConfig` of one ``method`` run from flat option values (:func:`build_configs`)."""
    run, lofit, compute, method_configs = build_configs(values, [method])
    return CellConfig(run=run, lofit=lofit, compute=compute, method=method_configs[method])
