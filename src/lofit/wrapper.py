"""A frozen Hugging Face model plus hooks that edit its representations.

Every intervention method in lofit (LoFiT, ITI, RepE, RED, ReFT) is the same object: the
base model, frozen, with forward hooks registered on some of its modules and a few tensors
of its own. :class:`InterventionModel` holds what they share: freezing, behaving as the
wrapped model (``forward``, ``generate``, attribute fall-through, the base ``forward``
signature that ``transformers.Trainer`` reads), switching the hooks off with
``disable_adapter()`` and removing them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel


class InterventionModel(nn.Module):
    """Base class of hook-based adapters over a frozen causal LM (see module docstring)."""

    def __init__(self, base_model: PreTrainedModel):
        super().__init__()
        self.base_model = base_model
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        forward = functools.partial(type(self).forward, self)
        forward.__signature__ = inspect.signature(base_model.forward)
        self.forward = forward
        self._adapter_enabled = True
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    def _is_enabled(self) -> bool:
        return self._adapter_enabled

    def _hook(self, module: nn.Module, hook: Callable, pre: bool = False, with_kwargs: bool = False) -> None:
        """Register ``hook`` on ``module``, skipped while the adapter is disabled."""

        @functools.wraps(hook)
        def guarded(*args: Any) -> Any:
            return hook(*args) if self._adapter_enabled else None

        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._hooks.append(register(guarded, with_kwargs=with_kwargs))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model without the intervention inside the ``with`` block."""
        previous = self._adapter_enabled
        self._adapter_enabled = False
        try:
            yield
        finally:
            self._adapter_enabled = previous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's own parameters that training changes (the base model's are frozen)."""
        return [p for name, p in self.named_parameters() if not name.startswith("base_model.") and p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def print_trainable_parameters(self) -> None:
        trainable = self.num_trainable_parameters()
        total = sum(p.numel() for p in self.base_model.parameters()) + trainable
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def hidden_states_of(output: Any) -> torch.Tensor:
    """The hidden states in a decoder layer's output (a tensor, or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden_states(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
