"""Saving and loading LoFiT adapters: safetensors numbers + a JSON config + a model card.

An adapter directory holds:

- ``adapter_model.safetensors``: ``heads`` (K, 2) int64 (layer, head) pairs in ranking
  order, and ``lofit_scale`` / ``lofit_bias`` (K, head_dim): A and v of those heads only.
- ``adapter_config.json``: the one metadata record: the method that fitted it (``lofit``, or
  ``iti``, whose result is a LoFiT adapter too) and its options, the base model's identity
  (its portable name and the fingerprint of its weights, see :mod:`lofit.models.identity`)
  and geometry, the hyper-parameters, the selected heads and any metrics. (Adapters saved
  before version 0.2 also hold a ``lofit_method.json``; it is read when present.)
- ``README.md``: a short model card.

Saving writes the three files into a staging folder and moves them into place (see
:mod:`lofit.utils.atomic`), so an interrupted save never leaves a partial file.

Loading reads tensors with ``safetensors`` (never unpickles) and checks everything
before it touches the model: a missing file raises ``FileNotFoundError``; any other
problem (a truncated or foreign weights file, bad JSON, a missing or mistyped field, a
tensor of the wrong dtype, shape or with non-finite values) raises :class:`AdapterError`
naming the file, and :class:`AdapterMismatchError` (a subclass) when the adapter was made
for a model of another type or shape. A refused load leaves the base model as it was. An
adapter made for a model of the same shape but with another fingerprint loads with a
``UserWarning`` naming both models.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel

from lofit._version import __version__
from lofit.data.files import finite_number, short_repr, shorten
from lofit.methods.lofit.config import LofitConfig
from lofit.methods.lofit.intervention import HeadAdapter
from lofit.models.architectures import HeadLayout, head_layout
from lofit.models.identity import identity, identity_problem, warn_if_other_weights
from lofit.utils.atomic import save_safetensors, staged_folder, write_json, write_text

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
GEOMETRY_KEYS = ("model_type", "num_layers", "num_heads", "head_dim")
TENSOR_NAMES = ("heads", "lofit_scale", "lofit_bias")


class AdapterError(ValueError):
    """A saved adapter or method result that cannot be used: a broken, incomplete or foreign
    file (bad JSON, a missing or mistyped field, unreadable or ill-shaped tensors). The
    message names the file. A missing file raises ``FileNotFoundError`` instead."""


class AdapterMismatchError(AdapterError):
    """The adapter was made for a model of another type or shape."""


# -- reading files ---------------------------------------------------------------------------------
def read_json_object(path: Path) -> dict:
    """The JSON object stored in ``path`` (UTF-8, a byte-order mark allowed); an AdapterError
    naming the file when it is not UTF-8 JSON or holds something other than an object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AdapterError(f"{path} is not valid JSON ({shorten(str(error))})") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (never unpickled); an AdapterError naming
    the file when it is truncated or in another format."""
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise AdapterError(
            f"{path} is not a readable safetensors file (truncated, or another format): {error}"
        ) from None


def check_tensor(
    path: Path, name: str, tensor: torch.Tensor, shape: tuple[int, ...], integer: bool = False
) -> torch.Tensor:
    """``tensor`` as float32 (int64 when ``integer``) after checking it: the right kind of dtype
    and finite values (AdapterError), then ``shape`` (AdapterMismatchError)."""
    if integer and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise AdapterError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected integers")
    if not integer and not tensor.is_floating_point():
        raise AdapterError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected floating point")
    if tuple(tensor.shape) != tuple(shape):
        raise AdapterMismatchError(
            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, this model needs {tuple(shape)}"
        )
    if integer:
        return tensor.to(torch.int64)
    converted = tensor.float()
    if not torch.isfinite(converted).all():
        raise AdapterError(f"{path}: tensor {name!r} holds non-finite values (inf or nan)")
    return converted


def check_tensor_names(path: Path, tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> None:
    """An AdapterError naming ``path`` unless ``tensors`` holds exactly ``names``."""
    missing = [name for name in names if name not in tensors]
    if missing:
        raise AdapterError(f"{path} lacks the tensor(s) {', '.join(map(repr, missing))}")
    unexpected = sorted(set(tensors) - set(names))
    if unexpected:
        raise AdapterError(f"{path} holds unexpected tensor(s) {shorten(', '.join(unexpected))}")


_KINDS = {
    "float": finite_number,
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "None": lambda v: v is None,
}
_KIND_NAMES = {
    "float": "a finite number",
    "int": "an integer",
    "str": "a string",
    "bool": "true or false",
    "None": "null",
}


def _type_problem(cls: type, values: dict) -> str | None:
    """What is wrong with the types of ``values`` (a field name to value map) for the dataclass
    ``cls``: a value of another type than its field's annotation, or None."""
    for item in fields(cls):
        if item.name in values:
            kinds = [kind.strip() for kind in str(item.type).split("|")]
            if not any(_KINDS.get(kind, lambda v: True)(values[item.name]) for kind in kinds):
                expected = " or ".join(_KIND_NAMES.get(kind, kind) for kind in kinds)
                return f"{item.name} must be {expected}, got {short_repr(values[item.name])}"
    return None


def options_from_json(cls: type, values: Any, path: Path, what: str) -> Any:
    """``cls`` (an options dataclass; through ``cls.from_dict`` when it has one) built from the
    JSON object ``values`` read from ``path``; an AdapterError naming the file when ``values``
    is not an object, has unknown keys, fails the class's checks, or gives a field a value of
    another type than its annotation (numbers finite; booleans are not numbers)."""
    if not isinstance(values, dict):
        raise AdapterError(f"{path}: {what} must be a JSON object, found {type(values).__name__}")
    build = getattr(cls, "from_dict", None) or (lambda kwargs: cls(**kwargs))
    try:
        options = build(values)
    except (TypeError, ValueError, AttributeError) as error:
        problem = _type_problem(cls, values) or shorten(str(error))
        raise AdapterError(f"{path}: {what} is invalid: {problem}") from None
    problem = _type_problem(cls, {item.name: getattr(options, item.name) for item in fields(options)})
    if problem:
        raise AdapterError(f"{path}: {what} is invalid: {problem}")
    return options


# -- saving ------------------------------------------------------------------------------------------
def _geometry(layout: HeadLayout) -> dict:
    num_layers, num_heads, head_dim = layout.shape
    return {"model_type": layout.model_type, "num_layers": num_layers, "num_heads": num_heads, "head_dim": head_dim}


def save_adapter(model: HeadAdapter, directory: Path, metrics: dict | None = None) -> None:
    """Write the adapter's three files into ``directory`` (created if needed), atomically."""
    with staged_folder(directory) as staging:
        write_adapter(model, staging, metrics)


def write_adapter(
    model: HeadAdapter,
    folder: Path,
    metrics: dict | None = None,
    base_identity: dict[str, str] | None = None,
    *,
    method: str = "lofit",
    options: dict | None = None,
) -> None:
    """Write the adapter's three files into ``folder``, a staging folder (:func:`save_adapter`, or a
    method's own save); ``base_identity`` is the base model's :func:`~lofit.models.identity.identity`
    when the caller has it already. ``method`` and its ``options`` name what fitted the adapter
    (LoFiT, or ITI, whose result is a LoFiT adapter too): adapter_config.json is the one record
    of a per-head adapter, with no second method file beside it."""
    heads = model.selected_heads
    index = torch.tensor(heads, dtype=torch.int64).reshape(-1, 2)
    layers, head_ids = index[:, 0], index[:, 1]
    tensors = {
        "heads": index,
        "lofit_scale": model.lofit_scale.detach()[layers, head_ids].float().cpu().contiguous(),
        "lofit_bias": model.lofit_bias.detach()[layers, head_ids].float().cpu().contiguous(),
    }
    config = {
        "method": method,
        "lofit_version": __version__,
        **(base_identity or identity(model.base_model)),
        **_geometry(model.layout),
        "selected_heads": [list(pair) for pair in heads],
        "lofit_config": model.lofit_config.to_dict(),
        "options": options or {},
        "metrics": metrics or {},
    }
    save_safetensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt", "lofit_version": __version__})
    write_json(folder / CONFIG_NAME, config)
    write_text(folder / CARD_NAME, _model_card(config))


def _model_card(config: dict) -> str:
    k = len(config["selected_heads"])
    total = config["num_layers"] * config["num_heads"]
    metrics = "\n".join(f"- {name}: {value}" for name, value in config["metrics"].items()) or "- (none recorded)"
    heads = ", ".join(f"L{layer}.H{head}" for layer, head in config["selected_heads"][:30])
    more = " ..." if k > 30 else ""
    return (
        f"# LoFiT adapter\n\n"
        f"A [LoFiT](https://arxiv.org/abs/2406.01563) adapter for `{config['base_model'] or 'an unnamed model'}` "
        f"(model_type `{config['model_type']}`, weights fingerprint `{config['base_model_fingerprint']}`): per-head "
        f"biases (and scales) on {k} of {total} attention heads, {k} x {config['head_dim']} numbers per tensor.\n\n"
        f"Heads (layer.head, best first): {heads}{more}\n\n## Metrics\n{metrics}\n\n"
        f"## Use\n```python\nimport lofit\nmodel, tokenizer = lofit.load_model({config['base_model'] or '...'!r})\n"
        f"model = lofit.LofitModel.from_pretrained(model, 'this/folder')  # or the hub id it was pushed to\n```\n\n"
        f"Made with lofit {config['lofit_version']}.\n"
    )


# -- loading ------------------------------------------------------------------------------------------
def read_adapter_config(directory: Path) -> dict:
    """The checked adapter_config.json of ``directory``: an object with ``lofit_config`` and
    the geometry fields (model_type a string, the sizes integers; ``base_model`` and
    ``base_model_fingerprint``, when present, strings)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoFiT adapter in {directory}: {CONFIG_NAME} is missing")
    config = read_json_object(path)
    missing = [key for key in ("lofit_config", *GEOMETRY_KEYS) if key not in config]
    if missing:
        raise AdapterError(f"{path} is not a LoFiT adapter config: missing {', '.join(missing)}")
    if not isinstance(config["model_type"], str):
        raise AdapterError(f"{path}: model_type must be a string, got {short_repr(config['model_type'])}")
    for key in GEOMETRY_KEYS[1:]:
        if not _KINDS["int"](config[key]):
            raise AdapterError(f"{path}: {key} must be an integer, got {short_repr(config[key])}")
    if not isinstance(config.get("method", "lofit"), str):
        raise AdapterError(f"{path}: method must be a string, got {short_repr(config['method'])}")
    problem = identity_problem(config)
    if problem:
        raise AdapterError(f"{path}: {problem}")
    return config


def _check_geometry(config: dict, layout: HeadLayout, directory: Path) -> None:
    expected = _geometry(layout)
    saved = {key: config[key] for key in expected}
    if saved != expected:
        differences = ", ".join(
            f"{key} {saved[key]!r} vs {expected[key]!r}" for key in expected if saved[key] != expected[key]
        )
        raise AdapterMismatchError(
            f"{directory / CONFIG_NAME}: the adapter was made for another model (adapter vs this model: {differences})"
        )


def _read_adapter_tensors(
    directory: Path, layout: HeadLayout
) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """The heads and their A and v from the weights file, checked against ``layout``."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoFiT adapter in {directory}: {WEIGHTS_NAME} is missing")
    tensors = read_safetensors(path)
    check_tensor_names(path, tensors, TENSOR_NAMES)
    index = tensors["heads"]
    if index.dim() != 2 or index.shape[1] != 2:
        raise AdapterError(
            f"{path}: tensor 'heads' has shape {tuple(index.shape)}, expected (K, 2): (layer, head) pairs"
        )
    index = check_tensor(path, "heads", index, tuple(index.shape), integer=True)
    heads = [(layer, head) for layer, head in index.tolist()]
    num_layers, num_heads, head_dim = layout.shape
    outside = [pair for pair in heads if not (0 <= pair[0] < num_layers and 0 <= pair[1] < num_heads)]
    if outside:
        raise AdapterMismatchError(
            f"{path}: head {outside[0]} does not exist in this model ({num_layers} layers x "
            f"{num_heads} heads, indices from 0)"
        )
    if len(set(heads)) != len(heads):
        raise AdapterError(f"{path}: the tensor 'heads' lists a head twice")
    scale, bias = (check_tensor(path, name, tensors[name], (len(heads), head_dim)) for name in TENSOR_NAMES[1:])
    return heads, scale, bias


def read_adapter(
    base_model: PreTrainedModel, directory: Path
) -> tuple[LofitConfig, list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """The options, heads and their A and v of the adapter in ``directory``, every file read
    and checked against ``base_model`` before the model is touched (see the module docstring
    for the errors); :func:`lofit.methods.lofit.model.load_adapter` applies them."""
    config = read_adapter_config(directory)
    layout = head_layout(base_model)
    _check_geometry(config, layout, directory)
    lofit_config = options_from_json(LofitConfig, config["lofit_config"], directory / CONFIG_NAME, "lofit_config")
    heads, scale, bias = _read_adapter_tensors(directory, layout)
    warn_if_other_weights(config, base_model, directory / CONFIG_NAME)
    return lofit_config, heads, scale, bias
