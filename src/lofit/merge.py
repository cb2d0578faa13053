"""Folding a LoFiT adapter into the model's own weights, and exporting the result.

With y = W x + b the attention output projection of a layer and x the concatenated
heads, the intervention x' = (1 + a) * x + v (a, v: A and v of that layer, flattened)
gives::

    W x' + b = (W diag(1 + a)) x + (b + W v)

so merging scales the columns of W by (1 + a) and adds W v to the bias (creating a
zero bias first when the projection has none). Only heads' own columns move:
``b += W[:, head] @ v[head]`` summed over heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .architectures import ARCHITECTURES, architecture_row, projection_weight

if TYPE_CHECKING:
    from .model import LofitModel


class NotExportableError(ValueError):
    """The architecture cannot express a bias on its attention output projection in a checkpoint."""


@torch.no_grad()
def merge_into_base(model: "LofitModel") -> PreTrainedModel:
    """Fold A and v into each layer's projection, remove the hooks, return the base model."""
    for layer, proj in enumerate(model.layout.out_projs):
        scale, bias = (t.flatten() for t in model.effective_params(layer))
        weight = projection_weight(proj)  # (out, in), a view of the stored weight
        shift = weight.double() @ bias.double()
        weight.mul_((1 + scale).to(weight.dtype))
        if proj.bias is None:
            proj.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device), requires_grad=False)
        proj.bias.add_(shift.to(proj.bias.dtype))
    model.remove_hooks()
    return model.base_model


def exportable_types() -> list[str]:
    return sorted(t for t, row in ARCHITECTURES.items() if row.bias_flag is not None)


@torch.no_grad()
def save_merged(merged: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, directory: str | Path) -> None:
    """Save a merged model as a checkpoint that plain ``transformers`` loads unchanged.

    The projection bias only survives a save/load round trip if the architecture builds
    that module with a bias; for rows with a ``bias_flag`` we switch the flag on and give
    every other module it adds (e.g. Llama's q/k/v biases) an explicit zero bias.
    """
    config = merged.config
    row = architecture_row(config.model_type)
    if row.bias_flag is None:
        raise NotExportableError(
            f"{config.model_type!r} models have no config switch for a bias on the attention output "
            f"projection, so a merged LoFiT adapter cannot be saved as a plain checkpoint. Use the "
            f"adapter with lofit (LofitModel.from_pretrained) or merge_and_unload() in memory. "
            f"Exportable model types: {', '.join(exportable_types())}."
        )
    if row.bias_flag != "always":
        setattr(config, row.bias_flag, True)
        _add_zero_biases_the_flag_expects(merged)
    merged.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def _add_zero_biases_the_flag_expects(merged: PreTrainedModel) -> None:
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(merged.config)
    have = dict(merged.named_parameters())
    modules = dict(merged.named_modules())
    for name, parameter in reference.named_parameters():
        if name in have:
            continue
        module_name, _, leaf = name.rpartition(".")
        if leaf != "bias" or module_name not in modules:
            raise NotExportableError(f"cannot export: the bias-enabled architecture also expects {name!r}")
        module = modules[module_name]
        weight = module.weight
        module.bias = nn.Parameter(torch.zeros(parameter.shape, dtype=weight.dtype, device=weight.device), requires_grad=False)
