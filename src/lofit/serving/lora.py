"""LoRA adapters in mixed batches: every loaded LoRA at once in one peft model over the served model.

peft's mixed-adapter batches (``generate(..., adapter_names=[...])``, one name per batch row,
``"__base__"`` for a row without LoRA): each LoRA layer computes its base layer's output for the
whole batch, then adds each LoRA's delta (B A x, scaled) to the rows named for it only. So a
batch may hold rows of several LoRA adapters, of the table kinds (LoFiT, ITI, RED, RepE: their
rows are ``"__base__"`` here, and LoRA rows get zeros from the tables) and of the base model.

The stack injects every loaded LoRA, under a peft adapter name of its own (``lora0``,
``lora1``, ...; the served names may hold characters peft's module keys may not), into the
served model's modules in place. While the stack holds any LoRA, every forward pass of a mixed
batch must name each row's LoRA (else peft would apply its active adapter to all rows); and
whatever else is done with the model (reading a new adapter with
:func:`lofit.methods.load_adapted`, a batch of an exclusive adapter) runs inside
:meth:`LoraStack.detached`, which puts the base layers back in place of peft's LoRA layers for
that time, so lofit's own load and checks see the plain model, as they do without serving.

What peft's mixed batches cannot do is served in batches of its own (``exclusive``), with the
reason given by :func:`mixing_refusal` (and logged by the registry): a LoRA variant (DoRA: peft
refuses ``adapter_names`` with it), layer types other than linear and embedding layers (peft
refuses some, e.g. ``MultiheadAttention``; the server mixes only the layer types a decoder
LoRA uses), merged weights, and what edits modules shared by every row (trained base-layer
biases, ``modules_to_save``, trainable tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from lofit.models.wrapper import restored_on_failure

BASE_ROW = "__base__"
"""peft's name for a batch row that gets no LoRA delta."""
MIXABLE_LAYERS = (LoraLinear, LoraEmbedding)


@dataclass
class SavedLora:
    """A LoRA read by lofit's load: its peft config and its weights (by peft's state-dict keys,
    without an adapter name)."""

    config: LoraConfig
    state: dict[str, torch.Tensor]

    @property
    def numbers(self) -> int:
        return sum(tensor.numel() for tensor in self.state.values())

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.state.values())


def read_lora(wrapped: PeftModel) -> SavedLora:
    """The LoRA that :func:`lofit.methods.load_adapted` applied in ``wrapped`` (its active adapter)."""
    name = wrapped.active_adapter
    state = get_peft_model_state_dict(wrapped, adapter_name=name)
    state = {key: tensor.detach().clone() for key, tensor in state.items()}
    return SavedLora(wrapped.peft_config[name], state)


def mixing_refusal(wrapped: PeftModel) -> str | None:
    """Why the LoRA applied in ``wrapped`` cannot join peft's mixed batches; None when it can."""
    config = wrapped.peft_config[wrapped.active_adapter]
    if config.bias != "none":
        return f"it trains the base layers' biases (bias={config.bias!r}), which every row of a batch shares"
    if config.modules_to_save or getattr(config, "trainable_token_indices", None):
        return (
            "it retrains whole modules or token embeddings (modules_to_save, trainable_token_indices), "
            "which every row of a batch shares"
        )
    for path, module in wrapped.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, MIXABLE_LAYERS):
            return (
                f"its layer {path} is a peft {type(module).__name__}: peft mixes batches in linear and embedding layers"
            )
        if module.merged:
            return f"its layer {path} is merged into the base weights, which peft's mixed batches refuse"
        if module.lora_variant:
            variants = ", ".join(sorted({type(v).__name__ for v in module.lora_variant.values()}))
            return f"it is a LoRA variant ({variants}; DoRA if use_dora), which peft's mixed batches refuse"
    return None


class LoraStack:
    """Every mixable LoRA the server holds, as adapters of one peft model over ``model`` (see the module docstring).

    Used from the engine's worker thread only (or before it starts)."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.peft: PeftModel | None = None
        self._next = 0

    def names(self) -> list[str]:
        """The peft adapter names loaded now."""
        return list(self.peft.peft_config) if self.peft is not None else []

    def add(self, lora: SavedLora) -> str:
        """Inject ``lora`` beside the loaded ones under a new peft adapter name, load its weights,
        and return that name. When peft refuses (ValueError and the like), the model is put back
        as it was and the error raised."""
        name = f"lora{self._next}"
        self._next += 1
        with restored_on_failure(self.model):
            if self.peft is None:
                peft = get_peft_model(self.model, lora.config, adapter_name=name)
            else:
                peft = self.peft
                peft.add_adapter(name, lora.config)
            try:
                result = set_peft_model_state_dict(peft, lora.state, adapter_name=name)
                if result.unexpected_keys:
                    raise ValueError(f"peft did not place these LoRA weights: {', '.join(result.unexpected_keys[:5])}")
            except BaseException:
                if peft is self.peft:
                    peft.delete_adapter(name)
                raise
        self.peft = peft.eval()
        return name

    def remove(self, name: str) -> None:
        """Take the LoRA ``name`` out of the model; with the last one, every peft layer goes."""
        if self.names() == [name]:
            self.peft.unload()
            self.peft = None
        else:
            self.peft.delete_adapter(name)

    def nbytes(self) -> int:
        """Bytes of the LoRA weights the stack holds."""
        if self.peft is None:
            return 0
        return sum(p.numel() * p.element_size() for n, p in self.peft.named_parameters() if "lora_" in n)

    def generate(self, adapter_names: list[str]) -> Callable[..., torch.Tensor] | None:
        """``generate`` of the model with each batch row's peft adapter name (``BASE_ROW`` for none)
        passed on every forward pass; None when the stack holds no LoRA (the model's own ``generate`` serves)."""
        if self.peft is None:
            return None
        peft = self.peft

        def generate(**kwargs: object) -> torch.Tensor:
            return peft.generate(adapter_names=adapter_names, **kwargs)

        return generate

    @contextmanager
    def detached(self) -> Iterator[None]:
        """The model without the stack's LoRA layers (their base layers back in place, peft's
        ``peft_config`` attribute off the model) for the block; all put back after it."""
        if self.peft is None:
            yield
            return
        layers = []
        for path, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                parent, _, child = path.rpartition(".")
                layers.append((self.model.get_submodule(parent), child, module))
        config = self.model.__dict__.pop("peft_config", None)
        for parent, child, module in layers:
            setattr(parent, child, module.get_base_layer())
        try:
            yield
        finally:
            for parent, child, module in layers:
                setattr(parent, child, module)
            if config is not None:
                self.model.peft_config = config
