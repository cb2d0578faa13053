"""Representation Engineering (Zou et al., 2023): reading vectors added to the residual stream.

On contrast pairs built from the training data (see :mod:`lofit.methods.probing`), with
r[l] the output of decoder layer l at a text's last token:

1. per layer, the reading vector u[l] is the first principal component of the paired
   differences d = r_pos[l] - r_neg[l] (unit length, signed so that mean(d . u) > 0);
2. each layer is scored by how often a held-out pair's positive text projects higher on
   u[l] than its negative text; the best ``repe_num_layers`` layers are kept;
3. sigma[l] = std over all texts of r[l] . u[l];
4. at inference each kept layer's output becomes r + coefficient * sigma[l] * u[l], at
   every position.
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
    load_tensors,
    read_method_file,
    save_tensors,
    write_method_file,
)
from lofit.methods.probing import collect_activations, contrast_pairs, split_pairs
from lofit.models.architectures import decoder_layers
from lofit.models.wrapper import InterventionModel, hidden_states_of, replace_hidden_states
from lofit.utils.atomic import staged_folder

WEIGHTS = "repe_shift.safetensors"


@dataclass
class RepeConfig:
    repe_num_layers: int = field(
        default=4, metadata={"help": "RepE: layers to steer, those whose reading vector separates held-out pairs best"}
    )
    repe_coefficient: float = field(
        default=4.0, metadata={"help": "RepE: steering strength (in units of each layer's sigma)"}
    )

    def __post_init__(self) -> None:
        if self.repe_num_layers < 1:
            raise ValueError(f"repe_num_layers must be >= 1; got {self.repe_num_layers}")
        if self.repe_coefficient == 0:
            raise ValueError("repe_coefficient 0 would steer nothing; use --method zero-shot for the frozen model")


class ResidualShiftModel(InterventionModel):
    """A frozen model whose decoder layer l outputs r + shift[l] (shift: (num_layers, hidden))."""

    def __init__(self, base_model: PreTrainedModel):
        super().__init__(base_model)
        layers = decoder_layers(base_model)
        self.shift = nn.Parameter(
            torch.zeros(len(layers), base_model.config.get_text_config().hidden_size, device=self.device),
            requires_grad=False,
        )
        for index, layer in enumerate(layers):
            self._hook(layer, self._shifter(index))

    def _shifter(self, index: int):
        def shift(module: nn.Module, args: tuple, output):
            hidden = hidden_states_of(output)
            return replace_hidden_states(output, hidden + self.shift[index].to(hidden.device, hidden.dtype))

        return shift

    def num_adapter_parameters(self) -> int:
        """Numbers fitted: hidden per steered layer."""
        return int(self.shift.detach().any(dim=1).sum()) * self.shift.shape[1]


@dataclass
class ReadingVectors:
    """Per layer: the unit reading vector (L, d), its held-out pair accuracy and mean
    normalised margin (L,), and sigma (L,), the std of all texts' projections on it."""

    vectors: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor
    sigma: torch.Tensor

    def best_layers(self, count: int) -> torch.Tensor:
        """The ``count`` layers of highest held-out accuracy (ties: larger margin)."""
        key = self.accuracy.double() + 1e-6 * torch.tanh(self.margin).double()
        return torch.sort(-key, stable=True).indices[:count]


def reading_vectors(residual: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, seed: int) -> ReadingVectors:
    """RepE's reading vectors from (N, L, d) activations of paired positive/negative texts.

    As in RepE, each training pair's difference is given a random sign (seeded) before the
    differences are centred, so that the first principal component is the axis along which
    positives and negatives differ, not the spread around their mean difference.
    """
    positive, negative = residual[labels == 1], residual[labels == 0]  # pairs in the same order
    if len(positive) < 3:
        raise ValueError(f"RepE needs at least 3 contrast pairs (2 to read, 1 to check); got {len(positive)}")
    train_texts, val_texts = split_pairs(groups, 0.2, seed)
    train_pairs, val_pairs = train_texts[labels == 1], val_texts[labels == 1]
    differences = (positive - negative)[train_pairs].transpose(0, 1)  # (L, P, d)
    signs = torch.randint(0, 2, (differences.shape[1],), generator=torch.Generator().manual_seed(seed)) * 2.0 - 1.0
    flipped = differences * signs[None, :, None]
    _, _, v = torch.linalg.svd(flipped - flipped.mean(dim=1, keepdim=True), full_matrices=False)
    vectors = v[:, 0]  # (L, d): first principal component of each layer's signed differences
    mean_projection = torch.einsum("lpd,ld->lp", differences, vectors).mean(dim=1)
    vectors = vectors * torch.where(mean_projection < 0, -1.0, 1.0)[:, None]
    sigma = torch.einsum("nld,ld->nl", residual, vectors).std(dim=0)
    held_out = torch.einsum("pld,ld->pl", (positive - negative)[val_pairs], vectors)
    return ReadingVectors(
        vectors, (held_out > 0).float().mean(dim=0), (held_out / sigma.clamp_min(1e-12)).mean(dim=0), sigma
    )


class Repe(Method):
    """Learning-free steering of the residual stream of the best-reading layers."""

    name = "repe"
    config_class = RepeConfig

    def fit(self, context: FitContext) -> FitResult:
        seed = context.lofit.seed
        num_layers = context.model.config.num_hidden_layers
        if self.config.repe_num_layers > num_layers:
            raise ValueError(f"repe_num_layers is {self.config.repe_num_layers} but the model has {num_layers} layers")
        pairs = contrast_pairs(context.tokenizer, context.examples, seed)
        activations = collect_activations(
            context.model, pairs, context.tokenizer.pad_token_id, progress=context.progress
        )
        reading = reading_vectors(activations.residual, activations.labels, activations.groups, seed)
        chosen = reading.best_layers(self.config.repe_num_layers)
        model = ResidualShiftModel(context.model)
        with torch.no_grad():
            shift = self.config.repe_coefficient * reading.sigma[chosen, None] * reading.vectors[chosen]
            model.shift[chosen] = shift.to(model.shift)
        log = {"repe_layers": sorted(chosen.tolist()), "repe_layer_accuracy": reading.accuracy.tolist()}
        return FitResult(model, model.num_adapter_parameters(), log)

    def save(self, result: FitResult, directory: Path, metrics: dict | None = None) -> None:
        with staged_folder(directory) as staging:  # all files appear together, none half-written
            save_tensors(staging, WEIGHTS, {"shift": result.model.shift})
            write_method_file(staging, self, result.model.base_model, metrics)

    @classmethod
    def load(cls, model: PreTrainedModel, directory: Path) -> nn.Module:
        """Files read and checked first; the model is wrapped only when they fit it."""
        check_geometry(read_method_file(directory), model, directory)
        shift = load_tensors(
            directory, WEIGHTS, {"shift": (len(decoder_layers(model)), model.config.get_text_config().hidden_size)}
        )["shift"]
        shifted = ResidualShiftModel(model)
        with torch.no_grad():
            shifted.shift.copy_(shift)
        return shifted
