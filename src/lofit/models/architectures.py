"""Where each architecture keeps its per-head attention output, as data.

LoFiT edits the output of every attention head *before* the heads are mixed by the
attention output projection. In every supported decoder that projection is one module
per layer whose input is the concatenation of the query heads' outputs,
``x = [z_0, z_1, ..., z_{H-1}]`` with ``z_h`` of size ``head_dim``. So an architecture is
described by one row (:class:`ArchitectureRow`): the path of that module (``{layer}``
marks the layer index), the config flag that gives the projection a bias when a merged
model is exported, and the feed-forward block's path inside a layer (edited by the RED
baseline). The decoder layer itself (whose output is the residual stream, edited by RepE
and ReFT) is the module at the path's ``...{layer}`` prefix.

There is one registry and a row is data. Most rows are not written down: for a model type
without a row in :data:`ARCHITECTURES`, :func:`locate_row` reads the row off the model's
module tree (the rules are in its docstring). :data:`ARCHITECTURES` keeps only the
exceptions, where the located row would be wrong or a choice differs from the rule's;
adding an architecture that the rules miss is adding a row there.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging


@dataclass(frozen=True)
class ArchitectureRow:
    """How to find the attention output projection of one architecture.

    Attributes:
        out_proj: dotted module path of layer ``{layer}``'s attention output projection.
        bias_flag: config attribute that, when True, builds that projection with a bias
            (so a merged adapter can be saved as a plain checkpoint); ``"always"`` when the
            config builds it with a bias as it is; None when the architecture offers no way.
        mlp: path of the feed-forward block inside a decoder layer, or None if it has none.
        lora_targets: module names the LoRA baseline adapts by default, or None to take
            ``peft``'s own default for the architecture (see :mod:`lofit.methods.lora`).
        head_dim: config attribute holding one head's output size D, when the config has
            it; else D = in_features / num_heads.
    """

    out_proj: str
    bias_flag: str | None
    mlp: str | None = "mlp"
    lora_targets: tuple[str, ...] | None = None
    head_dim: str = "head_dim"

    @property
    def layer(self) -> str:
        """Dotted path of decoder layer ``{layer}``: the out_proj path up to the layer index."""
        return self.out_proj.split("{layer}")[0] + "{layer}"


_MLA = ArchitectureRow("model.layers.{layer}.self_attn.o_proj", "attention_bias", head_dim="v_head_dim")

ARCHITECTURES: dict[str, ArchitectureRow] = {
    # LoRA on the query and value projections only (the LoRA paper's choice), not on k_proj too.
    "olmo2": ArchitectureRow(
        "model.layers.{layer}.self_attn.o_proj", "attention_bias", lora_targets=("q_proj", "v_proj")
    ),
    # Multi-head latent attention: config.head_dim is the rotary query/key part; o_proj reads
    # num_heads x v_head_dim values.
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
}
"""model_type -> row, for the exceptions to :func:`locate_row` only (every row is checked to
differ from the located one in ``tests/test_head_location.py``)."""

ATTENTION_WORDS = ("attn", "attention")
"""A decoder layer's child whose name contains one of these is (part of) its attention."""

OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj")
"""The names transformers gives attention output projections."""

BIAS_SWITCHES = ("attention_bias", "bias", "use_bias", "add_bias_linear", "enable_bias")
"""Config attributes that may give the attention output projection a bias."""


class UnsupportedModelError(ValueError):
    """Neither a row of :data:`ARCHITECTURES` nor :func:`locate_row` finds the model's heads."""


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


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config of the decoder: ``config`` itself, or its text part for multimodal configs."""
    return config.get_text_config()


def architecture_row(model: PreTrainedModel) -> ArchitectureRow:
    """The registry row of ``model``: its exception row if it has one, else the located row."""
    row = ARCHITECTURES.get(model.config.model_type)
    return row if row is not None else locate_row(model)


def locate_row(model: PreTrainedModel) -> ArchitectureRow:
    """Read ``model``'s row off its module tree.

    With H = ``num_attention_heads``, D = ``head_dim`` and ``hidden_size`` from the
    (text) config:

    1. Decoder layers: the shallowest ``nn.ModuleList`` with ``num_hidden_layers``
       entries (the first such list in registration order on a tie).
    2. Attention: the children of layer 0 whose name contains "attn" or "attention" and
       that hold a weight matrix (so ``self_attn_layer_norm`` is not one).
    3. Output projection: the ``nn.Linear``/``Conv1D`` modules inside the attention that map
       H x D features (any multiple of H when the config has no ``head_dim``) to
       ``hidden_size``. In multi-head attention q/k/v projections match too, so among the
       matches those named like an output projection (:data:`OUTPUT_NAMES`) win, and of
       the remaining matches the last registered one is taken (modules are registered in
       data-flow order).
    4. Feed-forward block: of layer 0's other children that hold a weight matrix (norms,
       dropouts and activations hold none), the last registered: ``mlp``,
       ``block_sparse_moe``, or ``fc2`` where the layer keeps fc1 and fc2 itself.
    5. ``bias_flag`` as :func:`bias_flag` finds it; ``lora_targets`` None.

    Raises UnsupportedModelError, naming what was searched, when step 1, 2 or 3 finds nothing.
    """
    config = text_config(model.config)
    layers_path, layers = _layer_list(model)
    attention = [
        (name, child)
        for name, child in layers[0].named_children()
        if any(word in name.lower() for word in ATTENTION_WORDS) and _holds_matrix(child)
    ]
    out_proj = _output_projection(attention, config)
    if out_proj is None:
        raise _not_found(model, f"decoder layers {layers_path!r}, {_describe_attention(attention, config)}")
    attention_names = {name for name, _ in attention}
    others = [
        name for name, child in layers[0].named_children() if name not in attention_names and _holds_matrix(child)
    ]
    path = f"{layers_path}.{{layer}}.{out_proj}"
    return ArchitectureRow(path, bias_flag(model.config, path), mlp=others[-1] if others else None)


def _layer_list(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    count = text_config(model.config).num_hidden_layers
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if not lists:
        raise _not_found(model, f"no nn.ModuleList of num_hidden_layers = {count} decoder layers")
    return min(lists, key=lambda item: item[0].count("."))  # min keeps the first of equals


def _holds_matrix(module: nn.Module) -> bool:
    return any(parameter.dim() >= 2 for parameter in module.parameters())


def _maps_heads_to_hidden(module: nn.Module, config: PretrainedConfig) -> bool:
    if not isinstance(module, (nn.Linear, Conv1D)):
        return False
    out_features, in_features = projection_weight(module).shape
    head_dim = getattr(config, "head_dim", None)
    width_ok = (
        in_features == config.num_attention_heads * head_dim
        if head_dim
        else in_features % config.num_attention_heads == 0
    )
    return width_ok and out_features == config.hidden_size


def _output_projection(attention: list[tuple[str, nn.Module]], config: PretrainedConfig) -> str | None:
    """Path (below the layer) of the output projection among ``attention``'s modules (rule 3 of locate_row)."""
    matches = [
        f"{child_name}.{name}".rstrip(".")
        for child_name, child in attention
        for name, module in child.named_modules()
        if _maps_heads_to_hidden(module, config)
    ]
    named = [path for path in matches if path.rsplit(".", 1)[-1] in OUTPUT_NAMES]
    return (named or matches or [None])[-1]


def _describe_attention(attention: list[tuple[str, nn.Module]], config: PretrainedConfig) -> str:
    if not attention:
        return f"no child of layer 0 named like {' or '.join(ATTENTION_WORDS)} holding weights"
    linears = [
        f"{child_name}.{name}".rstrip(".") + f" {tuple(projection_weight(module).shape[::-1])}"
        for child_name, child in attention
        for name, module in child.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    ]
    head_dim = getattr(config, "head_dim", None) or "D"
    return (
        f"attention {', '.join(name for name, _ in attention)} with linear layers (in, out) "
        f"[{', '.join(linears)}], none mapping {config.num_attention_heads} heads x {head_dim} "
        f"to hidden_size {config.hidden_size}"
    )


def _not_found(model: PreTrainedModel, searched: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"model_type {model.config.model_type!r} ({type(model).__name__}) is not supported by lofit: no "
        f"attention output projection was found. Searched: {searched}. To add it, add one row to "
        "ARCHITECTURES in lofit/models/architectures.py naming the module path of its attention output projection."
    )


def bias_flag(config: PretrainedConfig, out_proj: str) -> str | None:
    """How a checkpoint of this config can hold a bias on the projection at ``out_proj``.

    The first of :data:`BIAS_SWITCHES` that the (text) config has as a bool and that,
    set to True, builds the projection with a bias; else ``"always"`` if the config as it
    is builds it with one; else None. Each answer is checked by building the model from
    the config with ``AutoModelForCausalLM.from_config`` (on the meta device: no memory),
    as plain transformers does when loading the exported checkpoint.
    """
    switches = [name for name in BIAS_SWITCHES if isinstance(getattr(text_config(config), name, None), bool)]
    for switch in switches:
        if _builds_bias(config, out_proj, switch):
            return switch
    return "always" if _builds_bias(config, out_proj, None) else None


def _builds_bias(config: PretrainedConfig, out_proj: str, switch: str | None) -> bool:
    config = copy.deepcopy(config)
    if switch is not None:
        setattr(text_config(config), switch, True)
    try:
        with _quiet_on_meta():
            model = AutoModelForCausalLM.from_config(config)
    except ValueError:  # a config class plain transformers does not know
        return False
    module = dict(model.named_modules()).get(out_proj.format(layer=0))
    return getattr(module, "bias", None) is not None


@contextlib.contextmanager
def _quiet_on_meta() -> Iterator[None]:
    """Build modules on the meta device (no memory), without transformers' log lines (they
    were shown when the user's own model was built)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _modules_at(model: PreTrainedModel, path: str) -> list[nn.Module]:
    """The module at ``path`` (with ``{layer}``) for every layer of ``model``."""
    modules = dict(model.named_modules())
    found = []
    for layer in range(text_config(model.config).num_hidden_layers):
        name = path.format(layer=layer)
        if name not in modules:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type {model.config.model_type!r}) has no module {name!r}; "
                "lofit expects a causal-LM model (AutoModelForCausalLM) whose module paths "
                "match the row for this model_type in lofit/models/architectures.py."
            )
        found.append(modules[name])
    return found


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """Every decoder layer of ``model``; a layer's output is the residual stream after it."""
    return _modules_at(model, architecture_row(model).layer)


def feed_forwards(model: PreTrainedModel) -> list[nn.Module]:
    """Every layer's feed-forward block of ``model``."""
    row = architecture_row(model)
    if row.mlp is None:
        raise UnsupportedModelError(
            f"model_type {model.config.model_type!r}: no feed-forward block found in its decoder layers"
        )
    return _modules_at(model, f"{row.layer}.{row.mlp}")


def attention_inputs(model: PreTrainedModel) -> tuple[str, ...]:
    """Names of the linear layers beside layer 0's attention output projection, in
    registration order: the attention's input projections (q/k/v, or a fused qkv)."""
    row = architecture_row(model)
    attention_path, _, out_name = row.out_proj.format(layer=0).rpartition(".")
    attention = model.get_submodule(attention_path)
    return tuple(
        name
        for name, module in attention.named_children()
        if isinstance(module, (nn.Linear, Conv1D)) and name != out_name
    )


def head_layout(model: PreTrainedModel) -> HeadLayout:
    """Find every layer's attention output projection and the head geometry of ``model``.

    ``num_heads`` is the number of *query* heads (``config.num_attention_heads``), so
    grouped-query models split correctly; ``head_dim`` is the config attribute the row
    names (``config.head_dim`` unless overridden) when the config has it (Gemma: heads x
    head_dim != hidden_size), else in_features / num_heads. Both come from the text config
    of a multimodal model.
    """
    config = text_config(model.config)
    model_type = model.config.model_type
    row = architecture_row(model)
    out_projs = _modules_at(model, row.out_proj)
    num_heads = config.num_attention_heads
    in_features = projection_in_features(out_projs[0])
    head_dim = getattr(config, row.head_dim, None) or in_features // num_heads
    if num_heads * head_dim != in_features:
        raise UnsupportedModelError(
            f"{model_type!r}: {num_heads} heads x head_dim {head_dim} != {in_features}, the "
            f"input size of the attention output projection; check config.{row.head_dim}."
        )
    return HeadLayout(model_type, tuple(out_projs), num_heads, head_dim)


@dataclass(frozen=True)
class FamilySupport:
    """What lofit does with one model family.

    Attributes:
        model_type: the family.
        located: "row" (an exception row of :data:`ARCHITECTURES`) or "automatic" (:func:`locate_row`).
        row: the family's row.
    """

    model_type: str
    located: str
    row: ArchitectureRow

    @property
    def exportable(self) -> bool:
        """Whether a merged model can be written as a checkpoint plain transformers loads."""
        return self.row.bias_flag is not None

    @property
    def export_reason(self) -> str:
        """Why the merge does or does not export, as docs/export.md says it."""
        flag = self.row.bias_flag
        if flag == "always":
            return "the output projection always has a bias"
        if flag is not None:
            return f"sets `{flag}: true`"
        return "no config switch gives the output projection a bias"


def family_support(model_type: str, config: PretrainedConfig | None = None) -> FamilySupport:
    """How lofit handles ``model_type``, read off a model built (on the meta device) from
    ``config``, by default the family's default config."""
    config = config if config is not None else AutoConfig.for_model(model_type)
    with _quiet_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    located = "row" if model_type in ARCHITECTURES else "automatic"
    return FamilySupport(model_type, located, architecture_row(model))
