"""LoFiT itself: choose heads (``--heads``: LoFiT's L1-scaled selection by default), then tune their biases."""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from lofit.methods.base import FitContext, FitResult, Method, training_entries
from lofit.methods.lofit.adapter_io import write_adapter
from lofit.methods.lofit.model import LofitModel, get_lofit_model
from lofit.methods.lofit.ranking import HeadRanking
from lofit.methods.lofit.selectors import rank_heads
from lofit.methods.lofit.steps import tune_biases
from lofit.training.loop import TrainingLog
from lofit.training.objectives import Objective
from lofit.utils.atomic import staged_folder


class HeadAdapterMethod(Method):
    """A method whose result is a LoFiT adapter (per-head scales and biases): saved, loaded
    and merged as one."""

    def save(self, result: FitResult, directory: Path, metrics: dict | None = None) -> None:
        """The adapter's files, adapter_config.json naming this method and its options (the one
        metadata record), in one staging folder: all appear together, none half-written."""
        with staged_folder(directory) as staging:
            write_adapter(result.model, staging, metrics, method=self.name, options=self.options())

    @classmethod
    def load(cls, model: PreTrainedModel, directory: Path) -> nn.Module:
        return LofitModel.from_pretrained(model, directory)


def select_step(model: LofitModel, context: FitContext, objective: Objective) -> tuple[HeadRanking, TrainingLog, float]:
    """Rank ``model``'s heads with the selector ``context.lofit.heads`` (step 1 by default):
    the ranking, the log of the training it took, and its wall time in seconds."""
    config = context.lofit
    start = time.perf_counter()
    ranking, log = rank_heads(
        config.heads,
        model,
        context.tokenizer,
        context.examples,
        objective,
        config.heads_file,
        context.progress,
        context.setup,
    )
    return ranking, log, time.perf_counter() - start


def tune_step(
    model: LofitModel, context: FitContext, objective: Objective, ranking: HeadRanking
) -> tuple[TrainingLog, float]:
    """Step 2 on the top K = ``num_heads_to_tune`` heads of ``ranking``: its log and wall time in seconds."""
    start = time.perf_counter()
    heads = ranking.top(context.lofit.num_heads_to_tune(len(ranking.order)))
    log = tune_biases(model, objective, heads, context.progress, context.setup)
    return log, time.perf_counter() - start


def step_summary(
    select: tuple[TrainingLog, float] | None = None, tune: tuple[TrainingLog, float] | None = None
) -> dict:
    """The summary entries of step 1 and/or step 2, each given as (log, wall seconds): their
    times, per-epoch losses, step 1's localization figures, every training warning and the
    steps a resumed step ran before this process (:func:`training_entries`)."""
    entries: dict = {}
    if select is not None:
        log, seconds = select
        entries |= {"select_seconds": seconds, "select_losses": log.epoch_losses}
        entries |= {"localization": log.localization} if log.localization is not None else {}
    if tune is not None:
        log, seconds = tune
        entries |= {"tune_seconds": seconds, "tune_losses": log.epoch_losses}
    return entries | training_entries(*(step[0] for step in (select, tune) if step is not None))


class Lofit(HeadAdapterMethod):
    """Step 1 (or another head selector), then step 2 on the top K heads; options in LofitConfig."""

    name = "lofit"

    def fit(self, context: FitContext) -> FitResult:
        model = get_lofit_model(context.model, context.lofit)
        objective = context.objective(model)
        ranking, select_log, select_seconds = select_step(model, context, objective)
        tune_log, tune_seconds = tune_step(model, context, objective, ranking)
        return FitResult(
            model,
            model.num_adapter_parameters(),
            step_summary((select_log, select_seconds), (tune_log, tune_seconds)),
            ranking,
        )
