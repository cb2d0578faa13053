"""The jobs behind the command line: select, tune, run, evaluate, merge.

The unit of work is :func:`run_cell`: one resolved configuration
(:class:`~lofit.runs.config.CellConfig`)
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

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from torch import nn

from lofit.methods import METHODS, FitContext, FitResult, get_method, load_adapted, saved_method, saved_record
from lofit.methods.lofit.config import LofitConfig, head_count
from lofit.methods.lofit.merge import save_merged
from lofit.methods.lofit.method import HeadAdapterMethod, select_step, step_summary, tune_step
from lofit.methods.lofit.model import LofitModel, get_lofit_model
from lofit.methods.lofit.ranking import HeadRanking
from lofit.methods.lofit.selectors import ranking_from_file
from lofit.models.identity import portable_name
from lofit.models.loading import load_model, model_config
from lofit.models.wrapper import InterventionModel
from lofit.runs.config import (
    RESUME_IGNORES,
    CellConfig,
    RunConfig,
)
from lofit.runs.data import RunData
from lofit.runs.folder import RunFolder
from lofit.tasks import Evaluation
from lofit.training.loop import TrainingSetup, make_accelerator
from lofit.training.objectives import Objective, build_objective
from lofit.utils.compute import ComputeConfig
from lofit.utils.distributed import wait_for_everyone
from lofit.utils.options import unread_options

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


def check_against_model_config(
    run: RunConfig, lofit: LofitConfig, method_options: dict | None, ranking: HeadRanking | None
) -> None:
    """Refuse, before the model loads and before anything is written, what the model's
    configuration (:func:`~lofit.models.loading.model_config`, no weights) rules out: more heads
    to tune than the model has (LoFiT, ITI), a head ranking made for another shape."""
    config = model_config(run.model)
    if config is None:
        return
    text = config.get_text_config()
    shape = (text.num_hidden_layers, text.num_attention_heads)
    if ranking is not None and tuple(ranking.scores.shape) != shape:
        raise ValueError(
            f"{lofit.heads_file} ranks {tuple(ranking.scores.shape)} layers x heads, but this model has "
            f"{shape}: it was made for another model"
        )
    if run.method == "lofit":
        lofit.num_heads_to_tune(shape[0] * shape[1])
    elif run.method == "iti":
        amount = (method_options or {}).get("iti_num_heads")
        head_count(lofit.num_heads if amount is None else amount, shape[0] * shape[1])


class Job:
    """One run, checked: its data (:class:`~lofit.runs.data.RunData`), its options against the
    model's configuration and, on ``--resume``, against the folder's; its files go through its
    :class:`~lofit.runs.folder.RunFolder`, the one writer. :func:`opened_job` gives it its model.

    Every data row the job needs is read and validated (once: the task keeps the parsed rows)
    and the options are checked against the model's configuration before the model loads, so
    bad data or options fail in a second, not after a model load, and leave no folder behind.
    """

    model: nn.Module
    tokenizer: object

    def __init__(
        self,
        run: RunConfig,
        lofit: LofitConfig,
        compute: ComputeConfig | None = None,
        needs: tuple[str, ...] = ("train", "eval"),
        method_options: dict | None = None,
    ):
        self.run = run
        self.lofit = lofit
        self.compute = compute or ComputeConfig()
        self.method_options = method_options
        self.data = RunData(run, lofit.seed, needs)
        self.task = self.data.task
        self.folder = RunFolder(run.resolved_output_dir(), run.resume, run.save_steps)
        self.timings: dict[str, float] = {}
        ranking = HeadRanking.load(lofit.heads_file) if lofit.heads == "file" else None  # refused before loading
        check_against_model_config(run, lofit, method_options, ranking)
        if run.resume:  # options this run does not read may differ (a grid's select_bias_lr on lofit heads)
            unread = unread_options([RunConfig, LofitConfig], asdict(run) | lofit.to_dict())
            self.folder.check_resumable(self.resolved_config(), RESUME_IGNORES | unread.keys())
        self.attached: list[nn.Module] = []

    def use_model(self, model: nn.Module, tokenizer: object) -> None:
        self.model, self.tokenizer = model, tokenizer
        if self.run.chat_template:
            self.task.chat_tokenizer = tokenizer

    def attach(self, adapted: nn.Module) -> nn.Module:
        """``adapted`` (the model with an adapter on it), released when the job closes."""
        self.attached.append(adapted)
        return adapted

    def resolved_config(self) -> dict:
        return {"run": asdict(self.run), "lofit": self.lofit.to_dict(), "compute": asdict(self.compute)} | (
            {"method_options": self.method_options} if self.method_options else {}
        )

    def entries(self) -> dict:
        """What the job measured (times, training entries), its data's warnings first among its warnings."""
        if not self.data.warnings:
            return self.timings
        return self.timings | {"warnings": [*self.data.warnings, *self.timings.get("warnings", [])]}

    @property
    def output_dir(self) -> Path:
        return self.folder.path

    def train_examples(self) -> list:
        return self.data.train_examples()

    def eval_examples(self) -> list:
        return self.data.eval_examples()

    def objective(self, lofit_model: LofitModel) -> Objective:
        """The task's training examples as an SFT or DPO objective."""
        return build_objective(lofit_model, self.tokenizer, self.train_examples(), self.run.beta)

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
        self.timings |= step_summary(select=(log, seconds))
        self.folder.write_ranking(ranking, self.lofit.num_heads_to_tune(len(ranking.order)))
        return ranking

    def tune(self, lofit_model: LofitModel, objective: Objective, ranking: HeadRanking, setup: TrainingSetup) -> None:
        log, seconds = tune_step(lofit_model, self.context(self.train_examples(), setup), objective, ranking)
        self.timings |= step_summary(tune=(log, seconds))

    def evaluate(self, model) -> Evaluation:
        """Evaluate (split across processes when there are several), under the run's mixed precision."""
        start = time.perf_counter()
        with make_accelerator(self.compute.mixed_precision, model.get_input_embeddings().weight.device).autocast():
            evaluation = self.task.evaluate(
                model, self.tokenizer, self.eval_examples(), self.run.eval_batch_size, self.run.progress
            )
        self.timings["eval_seconds"] = time.perf_counter() - start
        self.folder.write_predictions(evaluation.records)
        return evaluation


@contextmanager
def opened_job(
    run: RunConfig,
    lofit: LofitConfig,
    compute: ComputeConfig | None = None,
    *,
    needs: tuple[str, ...] = ("train", "eval"),
    method_options: dict | None = None,
    models: ModelSource = load_fresh,
    trains: bool = True,
) -> Iterator[Job]:
    """The frame of every command (select, tune, run, eval): the checked :class:`Job`, then its
    model from ``models``; a training job's config.yaml written. On leaving, whatever the job
    attached (:meth:`Job.attach`) is taken off the model (:func:`release`), finished or not,
    and the processes wait for each other."""
    job = Job(run, lofit, compute, needs, method_options)
    job.use_model(*models(run.model, job.compute))
    if trains:
        job.folder.write_config(job.resolved_config())
    try:
        yield job
    finally:
        for adapted in reversed(job.attached):
            release(adapted)
    wait_for_everyone()


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
    return summary | job.entries()


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
    """Step 1 only: write head_ranking.json, heads.png and metrics.json (its time, losses,
    localization figures, warnings and, when it resumed, ``resumed_steps``)."""
    with opened_job(run, lofit, compute, needs=("train",), models=models) as job:
        setup = job.folder.training_setup(job.compute)
        lofit_model = job.attach(get_lofit_model(job.model, lofit))
        examples = job.train_examples()
        objective = build_objective(lofit_model, job.tokenizer, examples, run.beta)
        ranking = job.select(lofit_model, examples, objective, setup)
        job.folder.write_metrics(portable(job.entries()))
        return ranking


def run_tune(run: RunConfig, lofit: LofitConfig, ranking_path: Path, compute: ComputeConfig | None = None) -> dict:
    """Step 2 only, on the top heads of a saved ranking: write the adapter."""
    HeadRanking.load(ranking_path)  # refused before the model loads
    with opened_job(run, lofit, compute, needs=("train",)) as job:
        setup = job.folder.training_setup(job.compute)
        lofit_model = job.attach(get_lofit_model(job.model, lofit))
        ranking = ranking_from_file(ranking_path, lofit_model)
        job.tune(lofit_model, job.objective(lofit_model), ranking, setup)
        summary = _summary(job, None, lofit_model)
        job.folder.write_result(
            get_method("lofit"), FitResult(lofit_model, lofit_model.num_adapter_parameters()), portable(summary)
        )
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
    if warned := [
        f"fold {k}: {message}" for k, s in zip(folds, summaries, strict=True) for message in s.get("warnings", [])
    ]:
        summary["warnings"] = warned  # each fold's, named, so that the run's top level shows them too
    summary["metric_keys"] = [f"mean_{key}" for key in summaries[0].get("metric_keys", [])]
    RunFolder(base).write_metrics(summary)
    return summary


def run_cell(cell: CellConfig, models: ModelSource = load_fresh) -> dict:
    """Fit ``cell.run.method``, write the adapter, then evaluate: one run folder, its summary
    returned. A crash in evaluation loses no training. The adapter is taken off the model
    (:func:`release`) when the cell ends, finished or not."""
    run = cell.run
    if len(run.folds()) != 1:
        raise ValueError("a cell evaluates one fold; run_all runs --fold all fold by fold")
    start = time.perf_counter()
    method = get_method(run.method, cell.method)
    with opened_job(run, cell.lofit, cell.compute, method_options=method.options(), models=models) as job:
        setup = job.folder.training_setup(job.compute)
        fit_start = time.perf_counter()
        result = method.fit(job.context(job.train_examples(), setup))
        job.attach(result.model)
        job.timings["fit_seconds"] = time.perf_counter() - fit_start
        job.timings |= result.log
        if result.ranking is not None:  # methods that rank heads return a LofitModel
            job.folder.write_ranking(result.ranking, len(result.model.selected_heads))
        try:
            evaluation = job.evaluate(result.model)
        except BaseException:
            # a crash in evaluation loses no training: the adapter, without metrics
            job.folder.write_result(
                method, result, portable(_summary(job, None, result.model, result.trained_parameters))
            )
            raise
        job.timings["total_seconds"] = time.perf_counter() - start
        summary = _summary(job, evaluation, result.model, result.trained_parameters)
        job.folder.write_result(method, result, portable(summary))  # written once, with the evaluation's metrics
        job.folder.write_metrics(summary)
        return summary


def run_eval(
    run: RunConfig, adapter: Path | None, compute: ComputeConfig | None = None, models: ModelSource = load_fresh
) -> dict:
    """Evaluate the model, or the model with a saved adapter."""
    run = replace(run, method=saved_method(adapter) if adapter else "zero-shot")
    with opened_job(run, LofitConfig(), compute, needs=("eval",), trains=False, models=models) as job:
        if run.output_dir is None:
            job.folder = RunFolder((adapter.parent if adapter else job.output_dir) / f"eval-{run.eval_split}")
        model = job.attach(load_adapted(job.model, adapter)) if adapter else job.model
        evaluation = job.evaluate(model)
        trained = saved_record(adapter).get("metrics", {}).get("trained_parameters") if adapter else None
        summary = _summary(job, evaluation, model if adapter else None, trained) | {
            "adapter": str(adapter) if adapter else None
        }
        job.folder.write_metrics(summary)
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
