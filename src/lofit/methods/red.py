"""RED, Representation Editing (Wu et al., 2024): a learned scale and bias on every feed-forward output.

For the output f of layer l's feed-forward block, RED trains s[l] and b[l] (size hidden)::

    f' = (1 + s[l]) * f + b[l]        (s = b = 0 at the start: the identity)

on all layers, everything else frozen: 2 x num_layers x hidden trained numbers. With
``red_train_scale: false`` s stays 0 and only b trains (one bias vector per layer,
num_layers x hidden numbers): the capacity test that sets RED's budget beside LoFiT's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from lofit.methods.base import (
    FitContext,
    FitResult,
    Method,
    check_geometry,
    check_training_options,
    load_tensors,
    read_method_file,
    save_tensors,
    train_adapter,
    write_method_file,
)
from lofit.models.architectures import feed_forwards
from lofit.models.wrapper import InterventionModel
from lofit.utils.atomic import staged_folder

WEIGHTS = "red.safetensors"


@dataclass
class RedConfig:
    red_lr: float = field(default=1e-2, metadata={"help": "RED: learning rate"})
    red_epochs: int | None = field(
        default=None, metadata={"help": "RED: epochs (default: LoFiT's select + tune epochs, an equal budget)"}
    )
    red_train_scale: bool = field(
        default=True,
        metadata={"help": "RED: train the scale s as well as the bias b (false: bias only, one vector per layer)"},
    )

    def __post_init__(self) -> None:
        check_training_options("red", self.red_lr, self.red_epochs)


class RedModel(InterventionModel):
    """A frozen model whose feed-forward outputs are edited as f + s * f + b, per layer."""

    def __init__(self, base_model: PreTrainedModel):
        super().__init__(base_model)
        blocks = feed_forwards(base_model)
        shape = (len(blocks), base_model.config.get_text_config().hidden_size)
        self.red_scale = nn.Parameter(torch.zeros(shape, device=self.device))
        self.red_bias = nn.Parameter(torch.zeros(shape, device=self.device))
        for index, block in enumerate(blocks):
            self._hook(block, self._editor(index))

    def _editor(self, index: int):
        def edit(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            scale, bias = (t[index].to(output.device, output.dtype) for t in (self.red_scale, self.red_bias))
            return output + output * scale + bias

        return edit


class Red(Method):
    """Per-dimension scale and bias on every layer's feed-forward output, trained on the task loss."""

    name = "red"
    config_class = RedConfig

    def fit(self, context: FitContext) -> FitResult:
        model = RedModel(context.model)  # s = b = 0: nothing random
        parameters = [model.red_scale, model.red_bias] if self.config.red_train_scale else [model.red_bias]
        model.red_scale.requires_grad_(self.config.red_train_scale)
        return train_adapter(
            model, parameters, self.config.red_lr, self.config.red_epochs, context, "RED: training edits", "red"
        )

    def save(self, result: FitResult, directory: Path, metrics: dict | None = None) -> None:
        with staged_folder(directory) as staging:  # all files appear together, none half-written
            save_tensors(staging, WEIGHTS, {"red_scale": result.model.red_scale, "red_bias": result.model.red_bias})
            write_method_file(staging, self, result.model.base_model, metrics)

    @classmethod
    def load(cls, model: PreTrainedModel, directory: Path) -> nn.Module:
        """Files read and checked first; the model is wrapped only when they fit it."""
        check_geometry(read_method_file(directory), model, directory)
        shape = (len(feed_forwards(model)), model.config.get_text_config().hidden_size)
        tensors = load_tensors(directory, WEIGHTS, {"red_scale": shape, "red_bias": shape})
        edited = RedModel(model)
        with torch.no_grad():
            edited.red_scale.copy_(tensors["red_scale"])
            edited.red_bias.copy_(tensors["red_bias"])
        return edited
