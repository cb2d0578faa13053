"""The frozen model, unchanged: the 0-shot baseline."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from lofit.methods.base import FitContext, FitResult, Method, write_method_file


class ZeroShot(Method):
    """No training: evaluates the base model as it is (0 trained parameters)."""

    name = "zero-shot"
    trains = False

    def fit(self, context: FitContext) -> FitResult:
        return FitResult(context.model, 0)

    def save(self, result: FitResult, directory: Path, metrics: dict | None = None) -> None:
        write_method_file(directory, self, result.model, metrics)

    @classmethod
    def load(cls, model: PreTrainedModel, directory: Path) -> nn.Module:
        return model
