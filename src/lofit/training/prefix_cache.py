"""Frozen-prefix cache: run the layers below the first trained layer once per training sequence.

When every trained tensor sits at layer L or above (LoFiT's step 2 on heads of upper
layers; LoReFT, RED or ITI on upper layers), the hidden state entering layer L is a
function of the tokens alone: nothing below L trains and the model is frozen. So the first
time a sequence is seen in training, its hidden state after layer L - 1 is kept, keyed by
its tokens; a later forward pass whose rows are all kept skips layers 0 .. L - 1 (their
``forward`` hands the kept states, zero-padded to the batch's width, to layer L) and runs
layers L and above only. Everything above layer L - 1 (masks, positions, the upper
layers, the loss) is computed as without the cache, and the gradient never reaches below
layer L either way, so the loss and gradients are those of the full forward pass.

Rows must be right-padded (as lofit's training batches are); padded positions carry zeros,
which no real position attends to. The states kept are bounded by a memory budget; rows
beyond it are simply run in full (the fallback), as is any batch with a row not kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lofit.models.architectures import decoder_layers
from lofit.models.wrapper import hidden_states_of, kv_cache_of, replace_hidden_states


class PrefixCache:
    """Hidden states after layer ``first_trained_layer - 1`` of each training sequence (see module docstring)."""

    def __init__(self, model: PreTrainedModel, first_trained_layer: int, budget_bytes: int):
        if first_trained_layer < 1:
            raise ValueError("a prefix cache needs at least one frozen layer below the first trained one")
        self.model = model
        self.prefix = decoder_layers(model)[:first_trained_layer]
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.store: dict[tuple[int, ...], torch.Tensor] = {}
        self.skipped_passes = 0
        self._keys: list[tuple[int, ...]] | None = None
        self._skip = False
        self._output_template: Any = None

    def _rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[int, ...]] | None:
        """Each row's real tokens, or None when the batch is not right-padded."""
        if attention_mask is None:
            return [tuple(row) for row in input_ids.tolist()]
        lengths = attention_mask.sum(dim=1)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
            return None
        return [tuple(row[:length]) for row, length in zip(input_ids.tolist(), lengths.tolist())]

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or kv_cache_of(kwargs) is not None or not torch.is_grad_enabled():
            self._keys, self._skip = None, False
            return
        self._keys = self._rows(input_ids, kwargs.get("attention_mask"))
        self._skip = (
            self._keys is not None and self._output_template is not None and all(k in self.store for k in self._keys)
        )
        if self._skip:
            self.skipped_passes += 1

    def _keep(self, module: nn.Module, args: tuple, output: Any) -> None:
        """After the last prefix layer ran in full: keep each row's states while the budget allows."""
        if self._skip or self._keys is None:
            return
        self._output_template = output
        hidden = hidden_states_of(output).detach()
        for row, key in enumerate(self._keys):
            if key in self.store:
                continue
            state = hidden[row, : len(key)].clone()
            size = state.numel() * state.element_size()
            if self.used_bytes + size > self.budget_bytes:
                return
            self.store[key] = state
            self.used_bytes += size

    def _cached_batch(self) -> torch.Tensor:
        states = [self.store[key] for key in self._keys]
        width = max(len(key) for key in self._keys)
        batch = states[0].new_zeros((len(states), width, states[0].shape[-1]))
        for row, state in enumerate(states):
            batch[row, : state.shape[0]] = state
        return batch

    def _skipping_forward(self, layer: nn.Module, is_last: bool):
        original = layer.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not self._skip:
                return original(*args, **kwargs)
            hidden = self._cached_batch() if is_last else kwargs.get("hidden_states", args[0] if args else None)
            return replace_hidden_states(self._output_template, hidden)

        return forward

    @contextlib.contextmanager
    def attached(self) -> Iterator[PrefixCache]:
        """Serve and fill the cache for the forward passes inside the block."""
        handles = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.prefix[-1].register_forward_hook(self._keep),
        ]
        # A layer may already carry an instance-level forward (accelerate's device-map hooks): keep it.
        own_forwards = [layer.__dict__.get("forward") for layer in self.prefix]
        for index, layer in enumerate(self.prefix):
            layer.forward = self._skipping_forward(layer, index == len(self.prefix) - 1)
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for layer, own in zip(self.prefix, own_forwards):
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own
