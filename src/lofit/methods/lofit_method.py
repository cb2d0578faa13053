"""LoFiT itself: choose heads (``--heads``: LoFiT's L1-scaled selection by default), then tune their biases."""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from ..atomic import staged_folder
from ..head_selection import rank_heads
from ..model import LofitModel, get_lofit_model
from ..steps import tune_biases
from .base import FitContext, FitResult, Method, training_warnings, write_method_file


class HeadAdapterMethod(Method):
    """A method whose result is a LoFiT adapter (per-head scales and biases): saved, loaded
    and merged as one."""

    def save(self, result: FitResult, directory: Path, metrics: dict | None = None) -> None:
        with staged_folder(directory) as staging:  # all files appear together, none half-written
            result.model.save_pretrained(staging, metrics)
            write_method_file(staging, self, result.model.base_model, metrics)

    @classmethod
    def load(cls, model: PreTrainedModel, directory: Path) -> nn.Module:
        return LofitModel.from_pretrained(model, directory)


class Lofit(HeadAdapterMethod):
    """Step 1 (or another head selector), then step 2 on the top K heads; options in LofitConfig."""

    name = "lofit"

    def fit(self, context: FitContext) -> FitResult:
        config = context.lofit
        model = get_lofit_model(context.model, config)
        objective = context.objective(model)
        start = time.perf_counter()
        ranking, select_log = rank_heads(config.heads, model, context.tokenizer, context.examples, objective,
                                         config.heads_file, context.progress, context.setup)
        selected = time.perf_counter()
        heads = ranking.top(config.num_heads_to_tune(len(ranking.order)))
        log = tune_biases(model, objective, heads, context.progress, context.setup)
        tuned = time.perf_counter()
        return FitResult(model, model.num_adapter_parameters(), {
            "select_seconds": selected - start, "tune_seconds": tuned - selected,
            "select_losses": select_log.epoch_losses, "tune_losses": log.epoch_losses,
        } | training_warnings(select_log, log), ranking)
