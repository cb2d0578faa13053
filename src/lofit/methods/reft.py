"""LoReFT (Wu et al., 2024): a low-rank edit of the residual stream at chosen prompt positions.

For the output h of a chosen decoder layer at a chosen position::

    h' = h + R^T (W h + b - R h)

with R (rank x hidden) having orthonormal rows (kept so by ``torch``'s orthogonal
parametrisation), W (rank x hidden) and b (rank). W starts equal to R and b at 0, so an
untrained LoReFT is the identity. Positions, in every forward that starts a sequence:

- ``last``: the last prompt token. With a boolean ``logits_to_keep`` mask (how lofit
  scores completions) it is the position predicting the first completion token; otherwise
  the last attended position (the end of a left-padded generation prompt).
- ``first+last``: also the first attended position.

A forward that continues a KV cache (one generated token at a time) is not edited: the
edit reaches later tokens through the cached keys and values, as in pyreft.

The last prompt position is known to lofit's own training and scoring (they pass the
boolean mask) and to generation (left padding). A plain ``model(input_ids, labels=...)``
call, as ``transformers.Trainer`` makes, has no such mask: the edit then falls on the last
attended token of the whole sequence, so train LoReFT with ``lofit`` or pass the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal
from transformers import PreTrainedModel

from lofit.methods.base import (
    METHOD_FILE,
    FitContext,
    FitResult,
    Method,
    check_geometry,
    check_training_options,
    load_tensors,
    read_method_file,
    save_tensors,
    seeded,
    train_adapter,
    write_method_file,
)
from lofit.methods.lofit.adapter_io import AdapterError, options_from_json
from lofit.models.architectures import decoder_layers
from lofit.models.wrapper import InterventionModel, hidden_states_of, kv_cache_of, replace_hidden_states
from lofit.utils.atomic import staged_folder

WEIGHTS = "reft.safetensors"
POSITIONS = ("last", "first+last")


@dataclass
class ReftConfig:
    reft_rank: int = field(default=4, metadata={"help": "LoReFT: rank of R and W"})
    reft_layers: str = field(default="all", metadata={"help": "LoReFT: comma-separated layer indices, or all"})
    reft_positions: str = field(
        default="last", metadata={"help": "LoReFT: prompt positions to edit, last or first+last"}
    )
    reft_lr: float = field(default=2e-3, metadata={"help": "LoReFT: learning rate"})
    reft_epochs: int | None = field(
        default=None, metadata={"help": "LoReFT: epochs (default: LoFiT's select + tune epochs, an equal budget)"}
    )

    def __post_init__(self) -> None:
        check_training_options("reft", self.reft_lr, self.reft_epochs)
        if self.reft_positions not in POSITIONS:
            raise ValueError(f"reft_positions must be one of {', '.join(POSITIONS)}; got {self.reft_positions!r}")
        if self.reft_rank < 1:
            raise ValueError(f"reft_rank must be >= 1; got {self.reft_rank}")

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.reft_layers == "all":
            return list(range(num_layers))
        try:
            layers = sorted({int(x) for x in self.reft_layers.split(",")})
        except ValueError:
            raise ValueError(
                f"reft_layers must be 'all' or comma-separated integers; got {self.reft_layers!r}"
            ) from None
        if not layers or layers[0] < 0 or layers[-1] >= num_layers:
            raise ValueError(f"reft_layers {self.reft_layers!r}: the model has layers 0 to {num_layers - 1}")
        return layers


class LowRankEdit(nn.Module):
    """h + R^T (W h + b - R h) on the last dimension of h."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        if rank > hidden_size:
            raise ValueError(f"LoReFT rank {rank} exceeds the hidden size {hidden_size}")
        self.rotation = orthogonal(nn.Linear(hidden_size, rank, bias=False))
        self.source = nn.Linear(hidden_size, rank)
        with torch.no_grad():
            self.source.weight.copy_(self.rotation.weight)
            self.source.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Computed in the edit's own precision (float32), so that it is exactly the identity at
        the start even on a bf16 model; only the difference is cast back to ``h``'s dtype."""
        rotation = self.rotation.weight
        x = h.to(rotation.device, rotation.dtype)
        delta = (self.source(x) - x @ rotation.T) @ rotation
        return h + delta.to(h.device, h.dtype)


def prompt_positions(
    batch_shape: tuple[int, int],
    attention_mask: torch.Tensor | None,
    logits_to_keep: Any,
    which: str,
    device: torch.device,
) -> torch.Tensor:
    """(B, P) positions to edit in a forward that starts its sequences (see module docstring)."""
    batch, length = batch_shape
    mask = (
        attention_mask[:, -length:]
        if attention_mask is not None
        else torch.ones(batch_shape, dtype=torch.long, device=device)
    )
    last_attended = length - 1 - mask.flip(1).argmax(dim=1)
    if (
        isinstance(logits_to_keep, torch.Tensor)
        and logits_to_keep.dtype == torch.bool
        and logits_to_keep.shape == batch_shape
    ):
        scored = logits_to_keep.any(dim=1)
        last = torch.where(scored, logits_to_keep.float().argmax(dim=1), last_attended)
    else:
        last = last_attended
    if which == "last":
        return last[:, None]
    return torch.stack([mask.argmax(dim=1), last], dim=1)


class ReftModel(InterventionModel):
    """A frozen model with a LoReFT edit on chosen layers' outputs at prompt positions."""

    edits_prompt_positions = True

    def __init__(self, base_model: PreTrainedModel, config: ReftConfig):
        super().__init__(base_model)
        self.reft_config = config
        layers = decoder_layers(base_model)
        self.layer_indices = config.layer_indices(len(layers))
        hidden = base_model.config.get_text_config().hidden_size
        self.edits = nn.ModuleList(LowRankEdit(hidden, config.reft_rank) for _ in self.layer_indices).to(self.device)
        self._positions: torch.Tensor | None = None
        self._hook(base_model, self._locate, pre=True, with_kwargs=True)
        for edit, index in zip(self.edits, self.layer_indices):
            self._hook(layers[index], self._editor(edit))

    def _locate(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before each forward of the base model: the positions its layers will edit, or None."""
        past = kv_cache_of(kwargs)
        if past is not None and past.get_seq_length() > 0:
            self._positions = None
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        shape = tuple(tokens.shape[:2]) if tokens is not None else tuple(kwargs["inputs_embeds"].shape[:2])
        self._positions = prompt_positions(
            shape,
            kwargs.get("attention_mask"),
            kwargs.get("logits_to_keep"),
            self.reft_config.reft_positions,
            self.device,
        )

    def _editor(self, edit: LowRankEdit):
        def apply(module: nn.Module, args: tuple, output: Any) -> Any:
            if self._positions is None:
                return None
            hidden = hidden_states_of(output)
            positions = self._positions.to(hidden.device)  # layers of a device-mapped model sit on several devices
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(positions)
            edited = hidden.index_put((rows, positions), edit(hidden[rows, positions]))
            return replace_hidden_states(output, edited)

        return apply


class Reft(Method):
    """LoReFT on the chosen layers and prompt positions, trained on the task loss."""

    name = "reft"
    config_class = ReftConfig

    def fit(self, context: FitContext) -> FitResult:
        with seeded(context.lofit.seed):  # R starts as a random orthonormal matrix
            model = ReftModel(context.model, self.config)
        return train_adapter(
            model,
            model.trainable_parameters(),
            self.config.reft_lr,
            self.config.reft_epochs,
            context,
            "LoReFT: training",
            "reft",
            first_trained_layer=min(model.layer_indices),
        )

    def save(self, result: FitResult, directory: Path, metrics: dict | None = None) -> None:
        with staged_folder(directory) as staging:  # all files appear together, none half-written
            save_tensors(staging, WEIGHTS, result.model.edits.state_dict())
            write_method_file(staging, self, result.model.base_model, metrics)

    @classmethod
    def load(cls, model: PreTrainedModel, directory: Path) -> nn.Module:
        """The options are checked before wrapping; the tensors, whose shapes the edits define,
        after it, and a refused load gives the model back as it was (``unload``)."""
        record = read_method_file(directory)
        check_geometry(record, model, directory)
        config = options_from_json(ReftConfig, record.get("options"), directory / METHOD_FILE, "options")
        try:
            edited = ReftModel(model, config)
        except ValueError as error:
            raise AdapterError(
                f"{directory / METHOD_FILE}: the LoReFT options do not fit this model ({error})"
            ) from None
        try:
            shapes = {name: tuple(t.shape) for name, t in edited.edits.state_dict().items()}
            edited.edits.load_state_dict(load_tensors(directory, WEIGHTS, shapes))
        except BaseException:
            edited.unload()
            raise
        return edited
