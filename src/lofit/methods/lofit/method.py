"""LoFiT itself: choose heads (``--heads``: LoFiT's L1-scaled selection by default), then tune their biases."""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from lofit.methods.base import FitContext, FitResult, Method, training_warnings, write_method_file
from lofit.methods.lofit.adapter_io import write_adapter
from lofit.methods.lofit.model import LofitModel, get_lofit_model
from lofit.methods.lofit.ranking import HeadRanking
from lofit.methods.lofit.selectors import rank_heads
from lofit.methods.lofit.steps import tune_biases
from lofit.models.identity import identity
from lofit.training.loop import TrainingLog
from lofit.training.objectives import Objective
from lofit.utils.atomic import staged_folder


class HeadAdapterMethod(Method):
    """A method whose result is a LoFiT adapter (per-head scales and biases): saved, loaded
    and merged as one."""

    def save(self, result: FitResult, directory: Path, metrics: dict | None = None) -> None:
        """The adapter's files and :data:`~lofit.methods.base.METHOD_FILE`, in one staging folder
        (all appear together, none half-written), the base model fingerprinted once."""
        base_identity = identity(result.model.base_model)
        with staged_folder(directory) as staging:
            write_adapter(result.model, staging, metrics, base_identity)
            write_method_file(staging, self, result.model.base_model, metrics, base_identity)

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
            {
                "select_seconds": select_seconds,
                "tune_seconds": tune_seconds,
                "select_losses": select_log.epoch_losses,
                "tune_losses": tune_log.epoch_losses,
            }
            | ({"localization": select_log.localization} if select_log.localization else {})
            | training_warnings(select_log, tune_log),
            ranking,
        )
