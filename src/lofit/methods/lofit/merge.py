"""Folding a LoFiT adapter into the model's own weights, and exporting the result.

With y = W x + b the attention output projection of a layer and x the concatenated
heads, the intervention x' = (1 + a) * x + v (a, v: A and v of that layer, flattened)
gives::

    W x' + b = (W diag(1 + a)) x + (b + W v)

so merging scales the columns of W by (1 + a) and adds W v to the bias (creating a
zero bias first when the projection has none). Only heads' own columns move:
``b += W[:, head] @ v[head]`` summed over heads.

Merging is checked before anything changes: when a merged weight or bias would not be
finite (in the model's dtype), :class:`MergeError` is raised and the model is left as it
was. :func:`fold_adapter` returns a :class:`ProjectionBackup` per layer (the original
columns it scaled, the original bias or None), and :func:`restore_projections` puts them
back, so an unmerge restores the base weights bit for bit. How ``LofitModel.merge()``,
``unmerge()`` and ``merge_and_unload()`` use them is described on those methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lofit.methods.lofit.intervention import HeadAdapter
from lofit.models.architectures import architecture_row, family_support, projection_weight, text_config
from lofit.utils.atomic import staged_folder


class NotExportableError(ValueError):
    """The architecture cannot express a bias on its attention output projection in a checkpoint."""


class MergeError(ValueError):
    """Merging the adapter would put non-finite numbers (inf or nan) into the model's weights."""


@dataclass
class ProjectionBackup:
    """What merging changes in one attention output projection: the indices of the input
    columns it scales, their original values (out, len(columns)), and the original bias
    (None when the projection had none)."""

    columns: torch.Tensor
    weight_columns: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class _MergedProjection:
    columns: torch.Tensor
    weight_columns: torch.Tensor
    bias: torch.Tensor


def _merged_projection(model: HeadAdapter, layer: int) -> _MergedProjection:
    """The new scaled columns and bias of ``layer``'s projection, computed without changing it."""
    proj = model.layout.out_projs[layer]
    scale, bias = (t.flatten() for t in model.effective_params(layer))
    weight = projection_weight(proj)  # (out, in), a view of the stored weight
    columns = scale.nonzero().flatten().to(weight.device)
    shift = weight.double() @ bias.to(weight.device).double()
    old_bias = (
        proj.bias if proj.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    )
    scaled = weight[:, columns] * (1 + scale.to(weight.device)[columns]).to(weight.dtype)
    merged = _MergedProjection(columns, scaled, old_bias + shift.to(old_bias.dtype))
    if not (torch.isfinite(merged.weight_columns).all() and torch.isfinite(merged.bias).all()):
        raise MergeError(
            f"merging the adapter would put inf or nan into layer {layer}'s attention output projection "
            f"(its scales or biases are too large for {weight.dtype}); the model was left unmerged"
        )
    return merged


@torch.no_grad()
def fold_adapter(model: HeadAdapter) -> list[ProjectionBackup]:
    """Fold A and v into every layer's projection in place and return what restores them;
    a MergeError, with nothing changed, when a merged number would not be finite."""
    plans = [_merged_projection(model, layer) for layer in range(len(model.layout.out_projs))]
    backups = []
    for proj, plan in zip(model.layout.out_projs, plans):
        weight = projection_weight(proj)
        backups.append(
            ProjectionBackup(
                plan.columns, weight[:, plan.columns].clone(), None if proj.bias is None else proj.bias.detach().clone()
            )
        )
        weight[:, plan.columns] = plan.weight_columns
        if proj.bias is None:
            proj.bias = nn.Parameter(plan.bias, requires_grad=False)
        else:
            proj.bias.copy_(plan.bias)
    return backups


@torch.no_grad()
def restore_projections(model: HeadAdapter, backups: list[ProjectionBackup]) -> None:
    """Undo :func:`fold_adapter`: the scaled columns and the biases as they were."""
    for proj, backup in zip(model.layout.out_projs, backups):
        projection_weight(proj)[:, backup.columns] = backup.weight_columns
        if backup.bias is None:
            proj.bias = None
        else:
            proj.bias.copy_(backup.bias)


def exportable_types(model_types: list[str]) -> list[str]:
    """Those of ``model_types`` whose merged models save as plain checkpoints, judged on each
    family's default config (:func:`lofit.models.architectures.family_support`; docs/export.md)."""
    return sorted(t for t in model_types if family_support(t).exportable)


@torch.no_grad()
def save_merged(merged: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, directory: str | Path) -> None:
    """Save a merged model as a checkpoint that plain ``transformers`` loads unchanged.

    The projection bias only survives a save/load round trip if the architecture builds
    that module with a bias; for rows with a ``bias_flag`` we switch the flag on and give
    every other module it adds (e.g. Llama's q/k/v biases) an explicit zero bias.
    """
    config = merged.config
    row = architecture_row(merged)
    if row.bias_flag is None:
        raise NotExportableError(
            f"{config.model_type!r} models have no config switch for a bias on the attention output "
            f"projection, so a merged LoFiT adapter cannot be saved as a plain checkpoint. Use the "
            f"adapter with lofit (LofitModel.from_pretrained) or merge_and_unload() in memory. "
            "Exportable model types are listed in docs/export.md."
        )
    if row.bias_flag != "always":
        setattr(text_config(config), row.bias_flag, True)
        _add_zero_biases_the_flag_expects(merged)
    with staged_folder(directory) as staging:  # the checkpoint appears whole, or not at all
        merged.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))


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
        module.bias = nn.Parameter(
            torch.zeros(parameter.shape, dtype=weight.dtype, device=weight.device), requires_grad=False
        )
