"""A frozen Hugging Face model plus hooks that edit its representations.

Every intervention method in lofit (LoFiT, ITI, RepE, RED, ReFT) is the same object: the
base model, frozen, with forward hooks registered on some of its modules and a few tensors
of its own. :class:`InterventionModel` holds what they share: freezing, behaving as the
wrapped model (``forward``, ``generate``, attribute fall-through, the base ``forward``
signature that ``transformers.Trainer`` reads), switching the hooks off with
``disable_adapter()``, removing them, and giving the base model back with ``unload()``.

Wrapping freezes the base model (``requires_grad`` off on all of its parameters); a
constructor that raises, and ``unload()``, restore every parameter's ``requires_grad`` as
it was and remove the hooks, so a refused wrap leaves the base model as it found it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


class AdapterStateError(RuntimeError):
    """An operation the adapter's current state does not allow (e.g. disabling a merged
    adapter, merging twice, using an adapter after ``merge_and_unload()``)."""


def _restoring_on_failure(init: Callable) -> Callable:
    @functools.wraps(init)
    def guarded(self: InterventionModel, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if "_base_requires_grad" in self.__dict__:
                self.unload()
            raise

    return guarded


class InterventionModel(nn.Module):
    """Base class of hook-based adapters over a frozen causal LM (see module docstring)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass constructor that raises gives the base model back as it was."""
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = _restoring_on_failure(vars(cls)["__init__"])

    def __init__(self, base_model: PreTrainedModel):
        super().__init__()
        self.base_model = base_model
        self._base_requires_grad = [(parameter, parameter.requires_grad) for parameter in base_model.parameters()]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._adapter_enabled = True
        self._merged = False
        self._unloaded = False
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        forward = functools.partial(type(self).forward, self)
        forward.__signature__ = inspect.signature(base_model.forward)
        self.forward = forward

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    def _is_enabled(self) -> bool:
        """Whether the hooks act: not while disabled, nor once the adapter is merged into the weights."""
        return self._adapter_enabled and not self._merged

    def _hook(self, module: nn.Module, hook: Callable, pre: bool = False, with_kwargs: bool = False) -> None:
        """Register ``hook`` on ``module``, skipped while the adapter is disabled."""

        @functools.wraps(hook)
        def guarded(*args: Any) -> Any:
            return hook(*args) if self._is_enabled() else None

        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._hooks.append(register(guarded, with_kwargs=with_kwargs))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model without the intervention inside the ``with`` block; refused
        (AdapterStateError) once the adapter is merged into the base weights."""
        if self._merged:
            how = "merge_and_unload() made that permanent" if self._unloaded else "call unmerge() first"
            raise AdapterStateError(
                f"the adapter is merged into the base model's weights, so disable_adapter() cannot switch it off; {how}"
            )
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
        """Detach the hooks from the base model (the adapter's tensors stay)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def unload(self) -> PreTrainedModel:
        """The base model as it was given: hooks removed, every parameter's ``requires_grad`` restored."""
        self.remove_hooks()
        for parameter, requires_grad in self._base_requires_grad:
            parameter.requires_grad_(requires_grad)
        self._unloaded = True
        return self.base_model


@contextlib.contextmanager
def restored_on_failure(model: nn.Module) -> Iterator[None]:
    """When the block raises, put ``model`` back as it was on entry (its module tree, every
    parameter's ``requires_grad``, the attributes of its root module) and re-raise: for
    libraries such as ``peft`` that edit a model in place and may fail half-way."""
    children = {module: dict(module._modules) for module in model.modules()}
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    attributes = set(vars(model))
    try:
        yield
    except BaseException:
        for module, kept in children.items():
            module._modules.clear()
            module._modules.update(kept)
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)
        for name in set(vars(model)) - attributes:
            delattr(model, name)
        raise


def hidden_states_of(output: Any) -> torch.Tensor:
    """The hidden states in a decoder layer's output (a tensor, or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple) else output


def kv_cache_of(forward_kwargs: dict) -> Any:
    """The KV cache a model's forward was given, or None (transformers 5.24 renamed `past_key_values` to `cache`)."""
    return forward_kwargs.get("cache", forward_kwargs.get("past_key_values"))


def replace_hidden_states(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
