"""Where each architecture keeps its per-head attention output, as data.

LoFiT edits the output of every attention head *before* the heads are mixed by the
attention output projection. In every supported decoder that projection is one module
per layer whose input is the concatenation of the query heads' outputs,
``x = [z_0, z_1, ..., z_{H-1}]`` with ``z_h`` of size ``head_dim``. So an architecture is
described by one row: the path of that module (``{layer}`` marks the layer index), the
config flag that gives the projection a bias when a merged model is exported, and the
feed-forward block's path inside a layer (edited by the RED baseline). The decoder
layer itself (whose output is the residual stream, edited by RepE and ReFT) is the
module at the path's ``...{layer}`` prefix.

Adding an architecture is adding a row to :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ArchitectureRow:
    """How to find the attention output projection of one architecture.

    Attributes:
        out_proj: dotted module path of layer ``{layer}``'s attention output projection.
        bias_flag: config attribute that, when True, builds that projection with a bias
            (so a merged adapter can be saved as a plain checkpoint), or None when the
            architecture offers no such switch.
        mlp: path of the feed-forward block inside a decoder layer.
        lora_targets: module names the LoRA baseline adapts by default, or None to take
            ``peft``'s own default for the architecture.
    """

    out_proj: str
    bias_flag: str | None
    mlp: str = "mlp"
    lora_targets: tuple[str, ...] | None = None

    @property
    def layer(self) -> str:
        """Dotted path of decoder layer ``{layer}``: the out_proj path up to the layer index."""
        return self.out_proj.split("{layer}")[0] + "{layer}"


ARCHITECTURES: dict[str, ArchitectureRow] = {
    "llama": ArchitectureRow("model.layers.{layer}.self_attn.o_proj", "attention_bias"),
    "mistral": ArchitectureRow("model.layers.{layer}.self_attn.o_proj", None),
    "qwen2": ArchitectureRow("model.layers.{layer}.self_attn.o_proj", None),
    "qwen3": ArchitectureRow("model.layers.{layer}.self_attn.o_proj", "attention_bias"),
    "gemma": ArchitectureRow("model.layers.{layer}.self_attn.o_proj", "attention_bias"),
    "gemma2": ArchitectureRow("model.layers.{layer}.self_attn.o_proj", "attention_bias"),
    "gemma3_text": ArchitectureRow("model.layers.{layer}.self_attn.o_proj", "attention_bias"),
    "phi3": ArchitectureRow("model.layers.{layer}.self_attn.o_proj", None, lora_targets=("qkv_proj",)),
    "olmo2": ArchitectureRow("model.layers.{layer}.self_attn.o_proj", "attention_bias", lora_targets=("q_proj", "v_proj")),
    "gpt2": ArchitectureRow("transformer.h.{layer}.attn.c_proj", "always"),
    "gpt_neox": ArchitectureRow("gpt_neox.layers.{layer}.attention.dense", "attention_bias"),
}
"""model_type -> row. ``bias_flag="always"`` means the projection always has a bias."""


class UnsupportedModelError(ValueError):
    """The model's architecture has no row in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class HeadLayout:
    """The per-head geometry of one model, as LoFiT sees it.

    Attributes:
        model_type: the config's ``model_type``.
        out_projs: the attention output projection of each layer, in layer order.
        num_heads: query heads per layer (H).
        head_dim: size of one head's output (D); the projection's input has H * D features.
    """

    model_type: str
    out_projs: tuple[nn.Module, ...]
    num_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.out_projs)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(num_layers, num_heads, head_dim): the shape of LoFiT's scale and bias tensors."""
        return (self.num_layers, self.num_heads, self.head_dim)


def architecture_row(model_type: str) -> ArchitectureRow:
    """The table row for ``model_type``, or an error naming what is supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by lofit. Supported: {supported}. "
            "To add it, add one row to ARCHITECTURES in lofit/architectures.py naming the "
            "module path of its attention output projection."
        ) from None


def projection_weight(proj: nn.Module) -> torch.Tensor:
    """The projection's weight as an (out_features, in_features) matrix W, so y = W x + b.

    ``nn.Linear`` stores W directly; GPT-2's ``Conv1D`` stores its transpose.
    """
    if isinstance(proj, Conv1D):
        return proj.weight.T
    if isinstance(proj, nn.Linear):
        return proj.weight
    raise TypeError(f"unexpected attention output projection type {type(proj).__name__}")


def projection_in_features(proj: nn.Module) -> int:
    return projection_weight(proj).shape[1]


def _modules_at(model: PreTrainedModel, path: str) -> list[nn.Module]:
    """The module at ``path`` (with ``{layer}``) for every layer of ``model``."""
    modules = dict(model.named_modules())
    found = []
    for layer in range(model.config.num_hidden_layers):
        name = path.format(layer=layer)
        if name not in modules:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type {model.config.model_type!r}) has no module {name!r}; "
                "lofit expects a causal-LM model (AutoModelForCausalLM) whose module paths "
                "match the row for this model_type in lofit/architectures.py."
            )
        found.append(modules[name])
    return found


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """Every decoder layer of ``model``; a layer's output is the residual stream after it."""
    return _modules_at(model, architecture_row(model.config.model_type).layer)


def feed_forwards(model: PreTrainedModel) -> list[nn.Module]:
    """Every layer's feed-forward block of ``model``."""
    row = architecture_row(model.config.model_type)
    return _modules_at(model, f"{row.layer}.{row.mlp}")


def head_layout(model: PreTrainedModel) -> HeadLayout:
    """Find every layer's attention output projection and the head geometry of ``model``.

    ``num_heads`` is the number of *query* heads (``config.num_attention_heads``), so
    grouped-query models split correctly; ``head_dim`` is ``config.head_dim`` when the
    config has it (Gemma: heads x head_dim != hidden_size), else in_features / num_heads.
    """
    config = model.config
    model_type = config.model_type
    out_projs = _modules_at(model, architecture_row(model_type).out_proj)
    num_heads = config.num_attention_heads
    in_features = projection_in_features(out_projs[0])
    head_dim = getattr(config, "head_dim", None) or in_features // num_heads
    if num_heads * head_dim != in_features:
        raise UnsupportedModelError(
            f"{model_type!r}: {num_heads} heads x head_dim {head_dim} != {in_features}, the "
            "input size of the attention output projection; check config.head_dim."
        )
    return HeadLayout(model_type, tuple(out_projs), num_heads, head_dim)
