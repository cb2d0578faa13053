"""LofitModel: a frozen Hugging Face decoder with LoFiT's per-head scales and biases."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lofit.methods.lofit.adapter_io import read_adapter, save_adapter
from lofit.methods.lofit.config import LofitConfig
from lofit.methods.lofit.intervention import HeadIntervention
from lofit.methods.lofit.merge import ProjectionBackup, fold_adapter, restore_projections
from lofit.models.architectures import HeadLayout, head_layout
from lofit.models.hub import adapter_folder, upload_folder
from lofit.models.wrapper import AdapterStateError, InterventionModel


class LofitModel(InterventionModel):
    """A causal LM whose attention heads are rewritten as z' = (1 + A) z + v.

    Attributes:
        base_model: the wrapped model; all of its parameters are frozen.
        lofit_scale: A, shape (num_layers, num_heads, head_dim).
        lofit_bias: v, same shape.
        active_heads: bool (num_layers, num_heads); heads outside it act as A = v = 0.
        lofit_config: the hyper-parameters.
        layout: where the heads are (see :mod:`lofit.models.architectures`).

    Attribute access falls through to the base model, so a LofitModel is used like the
    model it wraps: ``forward``, ``generate``, ``config``, ``transformers.Trainer``.

    ``state_dict()`` is the adapter alone (``lofit_scale``, ``lofit_bias``,
    ``active_heads``): the frozen base model's weights are not part of a LofitModel's state,
    and ``load_state_dict`` does not report them missing. ``transformers.Trainer`` saves a
    model that is not a ``PreTrainedModel`` by its state dict and resumes with
    ``load_state_dict``, so its checkpoints hold the adapter only (docs/trainer.md).
    """

    def __init__(self, base_model: PreTrainedModel, config: LofitConfig | None = None):
        layout = head_layout(base_model)
        if any(
            isinstance(hook, HeadIntervention) for proj in layout.out_projs for hook in proj._forward_pre_hooks.values()
        ):
            raise ValueError(
                "this model already carries a LoFiT adapter; call unload() or merge_and_unload() on the "
                "existing LofitModel, or load a fresh base model, before wrapping it again"
            )
        super().__init__(base_model)
        self.lofit_config = config or LofitConfig()
        self.layout: HeadLayout = layout
        shape = self.layout.shape
        self.lofit_scale = nn.Parameter(torch.zeros(shape, device=self.device), requires_grad=False)
        self.lofit_bias = nn.Parameter(torch.zeros(shape, device=self.device), requires_grad=False)
        self.register_buffer("active_heads", torch.ones(shape[:2], dtype=torch.bool, device=self.device))
        self.head_ranking: list[tuple[int, int]] | None = None
        self._merge_backups: list[ProjectionBackup] | None = None
        self._hooks = [
            proj.register_forward_pre_hook(
                HeadIntervention(
                    layer, self.layout.num_heads, self.layout.head_dim, self.effective_params, self._is_enabled
                )
            )
            for layer, proj in enumerate(self.layout.out_projs)
        ]
        self.register_state_dict_post_hook(_drop_base_weights)
        self.register_load_state_dict_post_hook(_base_weights_not_missing)

    # -- the intervention -------------------------------------------------------------
    def effective_params(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[l], v[l]) with inactive heads zeroed, each of shape (num_heads, head_dim)."""
        mask = self.active_heads[layer, :, None]
        return self.lofit_scale[layer] * mask, self.lofit_bias[layer] * mask

    @property
    def selected_heads(self) -> list[tuple[int, int]]:
        """The active heads as (layer, head) pairs, in ranking order when a ranking is known."""
        active = {tuple(pair) for pair in self.active_heads.nonzero().tolist()}
        if self.head_ranking is not None:
            ranked = [pair for pair in self.head_ranking if pair in active]
            if len(ranked) == len(active):
                return ranked
        return sorted(active)

    def set_active_heads(self, heads: list[tuple[int, int]] | None) -> None:
        """Restrict the intervention to ``heads`` (all heads when None)."""
        num_layers, num_heads, _ = self.layout.shape
        mask = torch.zeros_like(self.active_heads)
        heads = None if heads is None else [(int(layer), int(head)) for layer, head in heads]
        if heads is None:
            mask[:] = True
        else:
            for layer, head in heads:
                if not (0 <= layer < num_layers and 0 <= head < num_heads):
                    raise ValueError(
                        f"head ({layer}, {head}) does not exist: the model has {num_layers} layers "
                        f"x {num_heads} heads (indices from 0)"
                    )
                mask[layer, head] = True
            if len(heads) != int(mask.sum()):
                raise ValueError(f"duplicate heads in {heads}")
        self.active_heads.copy_(mask)

    def l1_penalty(self) -> torch.Tensor:
        """lambda * sum |A| over active heads: the sparsity term of head selection."""
        return self.lofit_config.l1_lambda * (self.lofit_scale * self.active_heads[..., None]).abs().sum()

    # -- behaving as the wrapped model ----------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward; in training with labels, adds the L1 term when A trains."""
        outputs = self.base_model(*args, **kwargs)
        if self.training and self.lofit_scale.requires_grad and getattr(outputs, "loss", None) is not None:
            outputs.loss = outputs.loss + self.l1_penalty()
        return outputs

    # -- parameters -----------------------------------------------------------------------
    def num_trainable_parameters(self) -> int:
        """Numbers that training changes: head_dim per active head for each trainable tensor."""
        per_tensor = int(self.active_heads.sum()) * self.layout.head_dim
        return per_tensor * (int(self.lofit_scale.requires_grad) + int(self.lofit_bias.requires_grad))

    def num_adapter_parameters(self) -> int:
        """Numbers the saved adapter holds that are not zero-by-construction: K x head_dim per used tensor."""
        per_tensor = int(self.active_heads.sum()) * self.layout.head_dim
        used = int(bool(self.lofit_scale.detach().any())) + int(bool(self.lofit_bias.detach().any()))
        return per_tensor * used

    def train_only(self, tensor: str) -> None:
        """Make only ``"scale"`` (A), ``"bias"`` (v), ``"both"`` or ``"none"`` trainable."""
        if tensor not in ("scale", "bias", "both", "none"):
            raise ValueError(f"train_only takes 'scale', 'bias', 'both' or 'none', not {tensor!r}")
        self.lofit_scale.requires_grad_(tensor in ("scale", "both"))
        self.lofit_bias.requires_grad_(tensor in ("bias", "both"))

    # -- saving, loading, merging -----------------------------------------------------------
    def save_pretrained(self, directory: str | Path, metrics: dict | None = None) -> None:
        """Write the adapter: safetensors tensors, a JSON config and a model card."""
        save_adapter(self, Path(directory), metrics)

    def push_to_hub(self, repo_id: str, metrics: dict | None = None, **hub_options: Any) -> str:
        """Save the adapter into a temporary folder and upload it to the hub repository
        ``repo_id``; ``hub_options`` and the return value are :func:`lofit.models.hub.upload_folder`'s."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, metrics)
            return upload_folder(folder, repo_id, "lofit", **hub_options)

    @classmethod
    def from_pretrained(
        cls, base_model: PreTrainedModel, directory: str | Path, revision: str | None = None, token: str | None = None
    ) -> LofitModel:
        """Wrap ``base_model`` and load the adapter saved in ``directory``, a local folder or a
        hub id (downloaded, see :func:`lofit.models.hub.adapter_folder`); no unpickling."""
        return load_adapter(base_model, adapter_folder(directory, revision=revision, token=token))

    # Merging: merge() folds the adapter into the attention output projections in place and
    # keeps what unmerge() needs to restore them exactly (the original scaled columns and
    # biases); while merged the hooks stand by and disable_adapter() is refused.
    # merge_and_unload() is merge() then unload() without keeping the backups: the base model
    # comes back with the adapter in its weights for good (as PEFT's merge_and_unload), and
    # this LofitModel refuses any further merge, unmerge or disable_adapter.
    def merge(self) -> None:
        """Fold the adapter into the base model's weights in place (see :mod:`lofit.methods.lofit.merge`);
        refused when already merged or unloaded; a MergeError, with nothing changed, when a
        merged weight would not be finite."""
        self._require_attached("merge")
        if self._merged:
            raise AdapterStateError(
                "the adapter is already merged into the base weights; merging it again would apply it twice"
            )
        self._merge_backups = fold_adapter(self)
        self._merged = True

    def unmerge(self) -> None:
        """Restore the base weights that merge() changed, bit for bit, and switch the hooks back on."""
        self._require_attached("unmerge")
        if not self._merged:
            raise AdapterStateError("the adapter is not merged, so there is nothing to unmerge")
        restore_projections(self, self._merge_backups)
        self._merge_backups = None
        self._merged = False

    def merge_and_unload(self) -> PreTrainedModel:
        """Fold the adapter into the attention output projections for good and return the
        plain base model (hooks removed, ``requires_grad`` as it was before wrapping)."""
        self._require_attached("merge_and_unload")
        self.merge()
        self._merge_backups = None
        return super().unload()

    def unload(self) -> PreTrainedModel:
        """The base model without the adapter: unmerged first when merged, then hooks removed
        and ``requires_grad`` restored."""
        if self._merged and not self._unloaded:
            self.unmerge()
        return super().unload()

    def _require_attached(self, action: str) -> None:
        if self._unloaded:
            raise AdapterStateError(
                f"{action}() is refused: this LofitModel already gave its base model back (merge_and_unload() or "
                f"unload()); wrap the model again or load the adapter again to {action}"
            )


def _drop_base_weights(module: LofitModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: leave the frozen base model's tensors out."""
    for key in [key for key in state_dict if key.startswith(prefix + "base_model.")]:
        del state_dict[key]


def _base_weights_not_missing(module: LofitModel, incompatible_keys: Any) -> None:
    """Load post-hook: the base model's tensors are not expected in a LofitModel's state dict."""
    base_keys = {f"base_model.{name}" for name in module.base_model.state_dict()}

    def is_base(key: str) -> bool:
        return key in base_keys or any(key[i + 1 :] in base_keys for i, char in enumerate(key) if char == ".")

    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if not is_base(key)]


def get_lofit_model(model: PreTrainedModel, config: LofitConfig | None = None) -> LofitModel:
    """Freeze ``model`` and attach LoFiT's scales and biases (both zero: the identity)."""
    return LofitModel(model, config)


def load_adapter(base_model: PreTrainedModel, directory: Path) -> LofitModel:
    """``base_model`` wrapped with the adapter in ``directory``; every file is read and
    checked before the model is touched (:func:`lofit.methods.lofit.adapter_io.read_adapter`)."""
    lofit_config, heads, scale, bias = read_adapter(base_model, directory)
    model = LofitModel(base_model, lofit_config)
    model.set_active_heads(heads)
    if heads:
        layers, head_ids = torch.tensor(heads).T
        with torch.no_grad():
            model.lofit_scale[layers, head_ids] = scale.to(model.lofit_scale)
            model.lofit_bias[layers, head_ids] = bias.to(model.lofit_bias)
    model.head_ranking = heads
    return model
