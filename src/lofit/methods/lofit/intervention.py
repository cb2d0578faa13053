"""The LoFiT intervention on one layer's attention heads, as a forward pre-hook.

For layer l the attention output projection receives x = [z_0, ..., z_{H-1}], the
concatenated outputs of its H query heads (each of size D). The hook rewrites every
head at once::

    z'_h = (1 + A[l, h]) * z_h + v[l, h]        (elementwise, for all h in one op)

where A and v are (num_layers, num_heads, head_dim) float32 tensors owned by the LofitModel
(applied in the activation's dtype, on the activation's device) and
``active[l, h]`` masks heads that are not being tuned (their A and v act as 0).
The hook runs on every forward call, so it applies to every token, including each new
token of ``generate`` with a KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from lofit.methods.lofit.config import LofitConfig
from lofit.models.architectures import HeadLayout

EffectiveParams = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class HeadIntervention:
    """Pre-hook on layer ``layer``'s attention output projection applying z' = (1 + A) z + v."""

    def __init__(self, layer: int, num_heads: int, head_dim: int, params: EffectiveParams, enabled: Callable[[], bool]):
        self.layer = layer
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.params = params
        self.enabled = enabled

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self.enabled():
            return None
        x = args[0]
        scale, bias = self.params(self.layer)  # (H, D) each
        heads = x.unflatten(-1, (self.num_heads, self.head_dim))
        # A and v are float32 master weights, applied in the activation's dtype on its device (a
        # model spread over devices by a device map keeps each layer where it is).
        scale, bias = scale.to(x.device, x.dtype), bias.to(x.device, x.dtype)
        heads = heads + heads * scale + bias  # not (1 + A): 1 + 1e-3 rounds in bf16
        return (heads.flatten(-2), *args[1:])


class HeadAdapter(Protocol):
    """What merging (:mod:`.merge`) and saving (:mod:`.adapter_io`) read of a
    :class:`~lofit.methods.lofit.model.LofitModel`: typed by this protocol, those modules
    need not import the model's module, which imports them."""

    base_model: PreTrainedModel
    layout: HeadLayout
    lofit_config: LofitConfig
    lofit_scale: torch.Tensor
    lofit_bias: torch.Tensor

    @property
    def selected_heads(self) -> list[tuple[int, int]]: ...

    def effective_params(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...
