"""The jobs behind the command line: select, tune, run, evaluate, merge.

The unit of work is :func:`run_cell`: one resolved configuration (:class:`CellConfig`)
fitted and evaluated into one run folder, returning its summary. ``lofit run`` is one
cell per fold, ``lofit compare`` one per method, and ``lofit experiment`` one per grid
point. A cell may borrow an already loaded model (a :data:`ModelSource`); whatever it
attached to that model (hooks, LoRA layers) is removed when it ends, so the next cell
starts from the clean base model.

Each writes into a run folder:

- ``adapter/``: the method's result (LoFiT: safetensors + JSON config + model card);
- ``head_ranking.json``: every head with its score, best first (methods that rank heads);
- ``heads.png``: the layers x heads heatmap of those scores;
- ``metrics.json``: evaluation metrics, parameter count, wall times;
- ``predictions.jsonl``: one evaluated example per line;
- ``config.yaml``: the resolved configuration of the run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from lofit.data.files import resolve_data_dir
from lofit.methods import METHODS, FitContext, FitResult, get_method, load_adapted, saved_method
from lofit.methods.base import METHOD_FILE, read_method_file
from lofit.methods.lofit.config import LofitConfig, head_count
from lofit.methods.lofit.merge import save_merged
from lofit.methods.lofit.method import HeadAdapterMethod, select_step, tune_step
from lofit.methods.lofit.model import LofitModel, get_lofit_model
from lofit.methods.lofit.ranking import HeadRanking
from lofit.methods.lofit.selectors import ranking_from_file
from lofit.models.identity import portable_name
from lofit.models.loading import load_model, model_config
from lofit.models.wrapper import InterventionModel
from lofit.runs.plots import head_heatmap
from lofit.runs.recipes import RECIPES
from lofit.tasks import Evaluation, get_task
from lofit.training.loop import CheckpointPolicy, TrainingSetup, make_accelerator
from lofit.training.objectives import Objective, build_objective
from lofit.utils.atomic import write_json, write_text
from lofit.utils.compute import ComputeConfig
from lofit.utils.distributed import is_main_process, wait_for_everyone
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
            "help": "with your own data: the file or dataset to evaluate on (default: the training data)",
        },
    )
    match: str = field(
        default="exact",
        metadata={
            "step": 2,
            "help": "with a file task of prompt/completion rows: 'exact' or 'contains' (default: exact)",
        },
    )
    method: str = field(default="lofit", metadata={"step": 2, "help": "the method", "choices": METHODS})
    recipe: str | None = field(
        default=None,
        metadata={
            "step": 2,
            "help": "start from a preset of option values: 'paper' (the "
            "original code's settings for the task; see docs/method.md); "
            "options given explicitly override it",
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
        default=None, metadata={"help": "training examples sampled (default: the task's, 300 for CLUTRR)"}
    )
    eval_split: str = field(default="test", metadata={"step": 2, "help": "split to evaluate: val or test"})
    eval_batch_size: int = field(
        default=16, metadata={"resume": "may change", "hashed": False, "help": "prompts per generation batch"}
    )
    limit: int | None = field(
        default=None, metadata={"resume": "may change", "step": 2, "help": "evaluate only the first N examples"}
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
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of: {', '.join(RECIPES)}")
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

ModelSource = Callable[[str, ComputeConfig], tuple]
"""Gives the (model, tokenizer) of a model name under a compute config."""


def load_fresh(name: str, compute: ComputeConfig) -> tuple:
    """The :data:`ModelSource` of a single command: load the model from disk."""
    return load_model(name, compute.dtype, compute.device, compute.device_map)


def release(adapted: nn.Module) -> None:
    """Take ``adapted``'s adapter off its base model: hooks removed and ``requires_grad``
    restored (hook-based methods), LoRA layers replaced by the original modules (peft)."""
    if isinstance(adapted, InterventionModel):
        adapted.unload()
    elif hasattr(adapted, "peft_config") and hasattr(adapted, "unload"):
        adapted.unload()


class Job:
    """A task with its data checked, then a loaded model and tokenizer, and the run folder they write into.

    Every data row the job needs is read and validated before the model loads, so bad data
    fails in a second, not after a model load. Only the main process writes files.
    """

    def __init__(
        self,
        run: RunConfig,
        lofit: LofitConfig,
        compute: ComputeConfig | None = None,
        needs: tuple[str, ...] = ("train", "eval"),
        method_options: dict | None = None,
        models: ModelSource = load_fresh,
    ):
        self.run = run
        self.lofit = lofit
        self.compute = compute or ComputeConfig()
        self.method_options = method_options
        self.task = get_task(
            run.task, fold=run.folds()[0], all_pairs=run.all_pairs, eval_file=run.eval_file, match=run.match
        )
        self.data_dir = resolve_data_dir(run.data_dir) if self.task.needs_data_dir else None
        self.output_dir = run.resolved_output_dir()
        self.timings: dict[str, float] = {}
        if "train" in needs:
            self.train_examples()
        if "eval" in needs:
            self.eval_examples()
        ranking = HeadRanking.load(lofit.heads_file) if lofit.heads == "file" else None  # refused before loading
        self._check_against_model_config(ranking)
        if run.resume:
            self._check_resumable()
        self.model, self.tokenizer = models(run.model, self.compute)
        if run.chat_template:
            self.task.chat_tokenizer = self.tokenizer

    def _check_against_model_config(self, ranking: HeadRanking | None) -> None:
        """Refuse, before the model loads and before anything is written, what the model's
        configuration (:func:`~lofit.models.loading.model_config`, no weights) rules out: more
        heads to tune than the model has, a head ranking made for another shape."""
        config = model_config(self.run.model)
        if config is None:
            return
        text = config.get_text_config()
        shape = (text.num_hidden_layers, text.num_attention_heads)
        if ranking is not None and tuple(ranking.scores.shape) != shape:
            raise ValueError(
                f"{self.lofit.heads_file} ranks {tuple(ranking.scores.shape)} layers x heads, but this model has "
                f"{shape}: it was made for another model"
            )
        if self.run.method == "lofit":
            self.lofit.num_heads_to_tune(shape[0] * shape[1])
        elif self.run.method == "iti":
            amount = (self.method_options or {}).get("iti_num_heads")
            head_count(self.lofit.num_heads if amount is None else amount, shape[0] * shape[1])

    def resolved_config(self) -> dict:
        return {"run": asdict(self.run), "lofit": self.lofit.to_dict(), "compute": asdict(self.compute)} | (
            {"method_options": self.method_options} if self.method_options else {}
        )

    def write_config(self) -> None:
        if is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.output_dir / "config.yaml", yaml.safe_dump(self.resolved_config(), sort_keys=False))

    def training_setup(self) -> TrainingSetup:
        """Checkpoints in ``<run folder>/checkpoints``: resumed with ``--resume`` (the folder's run
        was checked to have the same settings), cleared otherwise."""
        folder = self.output_dir / "checkpoints"
        if not self.run.resume and is_main_process() and folder.exists():
            shutil.rmtree(folder)
        wait_for_everyone()
        return TrainingSetup(self.compute, CheckpointPolicy(folder, self.run.save_steps, self.run.resume))

    def _check_resumable(self) -> None:
        path = self.output_dir / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(
                f"--resume: {path} does not exist, so there is no run to continue in {self.output_dir}"
            )
        saved = yaml.safe_load(path.read_text()) or {}
        now = self.resolved_config()
        differences = []
        for section in ("run", "lofit", "method_options"):
            before, after = saved.get(section) or {}, now.get(section) or {}
            differences += [
                f"{key}: {before.get(key)!r} then, {after.get(key)!r} now"
                for key in sorted(set(before) | set(after))
                if key not in RESUME_IGNORES and before.get(key) != after.get(key)
            ]
        if differences:
            raise ValueError(
                f"--resume: the run in {self.output_dir} had other settings ({'; '.join(differences)}); "
                "resume with the same options, or start a new run without --resume"
            )

    def train_examples(self) -> list:
        size = self.run.train_size if self.run.train_size is not None else self.task.default_train_size
        return self.task.sample_train(self.data_dir, size, self.lofit.seed)

    def eval_examples(self) -> list:
        return self.task.eval_examples(self.data_dir, self.run.eval_split)[: self.run.limit]

    def objective(self, lofit_model: LofitModel) -> Objective:
        """The task's training examples as an SFT or DPO objective."""
        return build_objective(lofit_model, self.tokenizer, self.train_examples(), self.run.beta)

    def save_ranking(self, ranking: HeadRanking, k: int) -> None:
        if is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ranking.save(self.output_dir / "head_ranking.json", k)
            head_heatmap(ranking.scores, ranking.top(k), self.output_dir / "heads.png")

    def context(self, examples: list, setup: TrainingSetup) -> FitContext:
        return FitContext(
            model=self.model,
            tokenizer=self.tokenizer,
            examples=examples,
            lofit=self.lofit,
            beta=self.run.beta,
            progress=self.run.progress,
            setup=setup,
        )

    def select(
        self, lofit_model: LofitModel, examples: list, objective: Objective, setup: TrainingSetup
    ) -> HeadRanking:
        """Rank heads with the configured selector (``--heads``), as LoFiT's fit does."""
        ranking, log, seconds = select_step(lofit_model, self.context(examples, setup), objective)
        self.timings["select_seconds"] = seconds
        self.timings["select_losses"] = log.epoch_losses
        if log.localization is not None:
            self.timings["localization"] = log.localization
        if log.warnings:
            self.timings["warnings"] = log.warnings
        self.save_ranking(ranking, self.lofit.num_heads_to_tune(len(ranking.order)))
        return ranking

    def tune(self, lofit_model: LofitModel, objective: Objective, ranking: HeadRanking, setup: TrainingSetup) -> None:
        log, seconds = tune_step(lofit_model, self.context(self.train_examples(), setup), objective, ranking)
        self.timings["tune_seconds"] = seconds
        self.timings["tune_losses"] = log.epoch_losses

    def evaluate(self, model) -> Evaluation:
        """Evaluate (split across processes when there are several), under the run's mixed precision."""
        start = time.perf_counter()
        with make_accelerator(self.compute.mixed_precision, model.get_input_embeddings().weight.device).autocast():
            evaluation = self.task.evaluate(
                model, self.tokenizer, self.eval_examples(), self.run.eval_batch_size, self.run.progress
            )
        self.timings["eval_seconds"] = time.perf_counter() - start
        if is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text(
                self.output_dir / "predictions.jsonl",
                "".join(json.dumps(record) + "\n" for record in evaluation.records),
            )
        return evaluation

    def write_metrics(self, metrics: dict) -> None:
        if is_main_process():
            write_json(self.output_dir / "metrics.json", metrics)


def _summary(
    job: Job, evaluation: Evaluation | None, adapted: object | None, trained_parameters: int | None = None
) -> dict:
    summary = {
        "task": job.run.task,
        "model": job.run.model,
        "method": job.run.method,
        "run_folder": str(job.output_dir),
    }
    if evaluation is not None:
        summary |= {f"{job.run.eval_split}_{k}": v for k, v in evaluation.metrics.items()}
        summary["metric_keys"] = [f"{job.run.eval_split}_{name}" for name in evaluation.metric_names]
    if isinstance(adapted, LofitModel):
        summary["trained_parameters"] = adapted.num_adapter_parameters()
        summary["selected_heads"] = [list(h) for h in adapted.selected_heads]
    if trained_parameters is not None:
        summary["trained_parameters"] = trained_parameters
    return summary | job.timings


def portable(summary: dict) -> dict:
    """``summary`` as a saved adapter records it: no path of this machine (the task and the model
    by :func:`~lofit.models.identity.portable_name`, the run folder left out)."""
    return {
        key: portable_name(value) if key in ("task", "model") else value
        for key, value in summary.items()
        if key != "run_folder"
    }


def run_select(
    run: RunConfig, lofit: LofitConfig, compute: ComputeConfig | None = None, models: ModelSource = load_fresh
) -> HeadRanking:
    """Step 1 only: write head_ranking.json and heads.png."""
    job = Job(run, lofit, compute, needs=("train",), models=models)
    setup = job.training_setup()
    job.write_config()
    lofit_model = get_lofit_model(job.model, lofit)
    try:
        examples = job.train_examples()
        ranking = job.select(
            lofit_model, examples, build_objective(lofit_model, job.tokenizer, examples, run.beta), setup
        )
    finally:
        release(lofit_model)
    wait_for_everyone()
    return ranking


def run_tune(run: RunConfig, lofit: LofitConfig, ranking_path: Path, compute: ComputeConfig | None = None) -> dict:
    """Step 2 only, on the top heads of a saved ranking: write the adapter."""
    HeadRanking.load(ranking_path)  # refused before the model loads
    job = Job(run, lofit, compute, needs=("train",))
    setup = job.training_setup()
    job.write_config()
    lofit_model = get_lofit_model(job.model, lofit)
    ranking = ranking_from_file(ranking_path, lofit_model)
    job.tune(lofit_model, job.objective(lofit_model), ranking, setup)
    summary = _summary(job, None, lofit_model)
    if is_main_process():
        get_method("lofit").save(
            FitResult(lofit_model, lofit_model.num_adapter_parameters()), job.output_dir / "adapter", portable(summary)
        )
    wait_for_everyone()
    return summary


def run_all(
    run: RunConfig,
    lofit: LofitConfig,
    method_config: object | None = None,
    compute: ComputeConfig | None = None,
    models: ModelSource = load_fresh,
) -> dict:
    """Fit ``run.method`` (LoFiT's two steps by default), then evaluate: write the whole run
    folder; return the metrics.

    With ``fold="all"`` each fold runs in its own sub-folder and the summary reports the
    mean of each metric over the folds, as the paper does for TruthfulQA.
    """
    compute = compute or ComputeConfig()
    folds = run.folds()
    if len(folds) == 1:
        return run_cell(CellConfig(run=run, lofit=lofit, compute=compute, method=method_config), models)
    base = run.resolved_output_dir()
    summaries = [
        run_cell(
            CellConfig(
                run=replace(run, fold=str(k), output_dir=str(base / f"fold_{k}")),
                lofit=lofit,
                compute=compute,
                method=method_config,
            ),
            models,
        )
        for k in folds
    ]
    mean = {
        key: sum(s[key] for s in summaries) / len(summaries)
        for key, value in summaries[0].items()
        if key.startswith(f"{run.eval_split}_") and isinstance(value, float)
    }
    summary = {"task": run.task, "model": run.model, "method": run.method, "run_folder": str(base), "folds": summaries}
    summary |= {f"mean_{k}": v for k, v in mean.items()}
    summary["metric_keys"] = [f"mean_{key}" for key in summaries[0].get("metric_keys", [])]
    if is_main_process():
        write_json(base / "metrics.json", summary)
    return summary


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


def run_cell(cell: CellConfig, models: ModelSource = load_fresh) -> dict:
    """Fit ``cell.run.method``, write the adapter, then evaluate: one run folder, its summary
    returned. A crash in evaluation loses no training. The adapter is taken off the model
    (:func:`release`) when the cell ends, finished or not."""
    run, lofit, compute = cell.run, cell.lofit, cell.compute
    if len(run.folds()) != 1:
        raise ValueError("a cell evaluates one fold; run_all runs --fold all fold by fold")
    start = time.perf_counter()
    method = get_method(run.method, cell.method)
    job = Job(run, lofit, compute, method_options=method.options(), models=models)
    setup = job.training_setup()
    job.write_config()
    fit_start = time.perf_counter()
    result: FitResult | None = None
    try:
        result = method.fit(job.context(job.train_examples(), setup))
        job.timings["fit_seconds"] = time.perf_counter() - fit_start
        job.timings |= result.log
        if result.ranking is not None:  # methods that rank heads return a LofitModel
            job.save_ranking(result.ranking, len(result.model.selected_heads))
        try:
            evaluation = job.evaluate(result.model)
        except BaseException:
            if is_main_process():  # a crash in evaluation loses no training: the adapter, without metrics
                method.save(
                    result,
                    job.output_dir / "adapter",
                    portable(_summary(job, None, result.model, result.trained_parameters)),
                )
            raise
        job.timings["total_seconds"] = time.perf_counter() - start
        summary = _summary(job, evaluation, result.model, result.trained_parameters)
        if is_main_process():  # written once, with the evaluation's metrics
            method.save(result, job.output_dir / "adapter", portable(summary))
        job.write_metrics(summary)
    finally:
        if result is not None:
            release(result.model)
    wait_for_everyone()
    return summary


def run_eval(run: RunConfig, adapter: Path | None, compute: ComputeConfig | None = None) -> dict:
    """Evaluate the model, or the model with a saved adapter."""
    job = Job(
        replace(run, method=saved_method(adapter) if adapter else "zero-shot"), LofitConfig(), compute, needs=("eval",)
    )
    if run.output_dir is None:
        job.output_dir = (adapter.parent if adapter else job.output_dir) / f"eval-{run.eval_split}"
    model = load_adapted(job.model, adapter) if adapter else job.model
    evaluation = job.evaluate(model)
    trained = None
    if adapter and (adapter / METHOD_FILE).is_file():
        trained = read_method_file(adapter).get("metrics", {}).get("trained_parameters")
    summary = _summary(job, evaluation, model if adapter else None, trained) | {
        "adapter": str(adapter) if adapter else None
    }
    job.write_metrics(summary)
    wait_for_everyone()
    return summary


def run_merge(model_name: str, adapter: Path, output_dir: Path, compute: ComputeConfig | None = None) -> None:
    """Fold an adapter into the model and save a plain transformers checkpoint."""
    method = saved_method(adapter)
    if not issubclass(METHODS[method], HeadAdapterMethod):
        mergeable = ", ".join(name for name, cls in METHODS.items() if issubclass(cls, HeadAdapterMethod))
        raise ValueError(
            f"{adapter} holds a {method} result; only per-head bias adapters ({mergeable}) fold into the model"
        )
    compute = compute or ComputeConfig()
    model, tokenizer = load_fresh(model_name, compute)
    merged = LofitModel.from_pretrained(model, adapter).merge_and_unload()
    save_merged(merged, tokenizer, output_dir)
