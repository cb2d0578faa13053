"""Saving and loading LoFiT adapters: safetensors numbers + a JSON config + a model card.

An adapter directory holds:

- ``adapter_model.safetensors``: ``heads`` (K, 2) int64 (layer, head) pairs in ranking
  order, and ``lofit_scale`` / ``lofit_bias`` (K, head_dim): A and v of those heads only.
- ``adapter_config.json``: the base model's identity and geometry, the hyper-parameters,
  the selected heads and any metrics.
- ``README.md``: a short model card.

Loading reads tensors with ``safetensors`` (never unpickles) and refuses an adapter
whose model_type or geometry differs from the model it is loaded into.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from . import __version__
from .config import LofitConfig

if TYPE_CHECKING:
    from .model import LofitModel

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"


class AdapterMismatchError(ValueError):
    """The adapter was made for a model of another type or shape."""


def _geometry(model: "LofitModel") -> dict:
    num_layers, num_heads, head_dim = model.layout.shape
    return {"model_type": model.layout.model_type, "num_layers": num_layers, "num_heads": num_heads, "head_dim": head_dim}


def save_adapter(model: "LofitModel", directory: Path, metrics: dict | None = None) -> None:
    heads = model.selected_heads
    index = torch.tensor(heads, dtype=torch.int64).reshape(-1, 2)
    layers, head_ids = index[:, 0], index[:, 1]
    tensors = {
        "heads": index,
        "lofit_scale": model.lofit_scale.detach()[layers, head_ids].float().cpu().contiguous(),
        "lofit_bias": model.lofit_bias.detach()[layers, head_ids].float().cpu().contiguous(),
    }
    base_name = getattr(model.base_model, "name_or_path", "") or ""
    config = {
        "lofit_version": __version__,
        "base_model": base_name,
        **_geometry(model),
        "selected_heads": [list(pair) for pair in heads],
        "lofit_config": model.lofit_config.to_dict(),
        "metrics": metrics or {},
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "lofit_version": __version__})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (directory / CARD_NAME).write_text(_model_card(config))


def _model_card(config: dict) -> str:
    k = len(config["selected_heads"])
    total = config["num_layers"] * config["num_heads"]
    metrics = "\n".join(f"- {name}: {value}" for name, value in config["metrics"].items()) or "- (none recorded)"
    heads = ", ".join(f"L{layer}.H{head}" for layer, head in config["selected_heads"][:30])
    more = " ..." if k > 30 else ""
    return (
        f"# LoFiT adapter\n\n"
        f"A [LoFiT](https://arxiv.org/abs/2406.01563) adapter for `{config['base_model'] or 'an unnamed model'}` "
        f"(model_type `{config['model_type']}`): per-head biases (and scales) on {k} of {total} attention heads, "
        f"{k} x {config['head_dim']} numbers per tensor.\n\n"
        f"Heads (layer.head, best first): {heads}{more}\n\n## Metrics\n{metrics}\n\n"
        f"## Use\n```python\nimport lofit\nmodel, tokenizer = lofit.load_model(...)\n"
        f"model = lofit.LofitModel.from_pretrained(model, 'this/folder')\n```\n\n"
        f"Made with lofit {config['lofit_version']}.\n"
    )


def read_adapter_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoFiT adapter in {directory}: {CONFIG_NAME} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def load_adapter(base_model: PreTrainedModel, directory: Path) -> "LofitModel":
    from .model import LofitModel

    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no LoFiT adapter in {directory}: {WEIGHTS_NAME} is missing")
    missing = [key for key in ("lofit_config", "model_type", "num_layers", "num_heads", "head_dim") if key not in config]
    if missing:
        raise ValueError(f"{directory / CONFIG_NAME} is not a LoFiT adapter config: missing {', '.join(missing)}")
    tensors = load_file(str(weights))
    absent = [key for key in ("heads", "lofit_scale", "lofit_bias") if key not in tensors]
    if absent:
        raise ValueError(f"{weights} is not a LoFiT adapter: missing tensor(s) {', '.join(absent)}")
    model = LofitModel(base_model, LofitConfig.from_dict(config["lofit_config"]))
    expected = _geometry(model)
    saved = {key: config.get(key) for key in expected}
    if saved != expected:
        differences = ", ".join(f"{key} {saved[key]!r} vs {expected[key]!r}" for key in expected if saved[key] != expected[key])
        model.remove_hooks()
        raise AdapterMismatchError(
            f"the adapter in {directory} was made for another model (adapter vs this model: {differences})"
        )
    index = tensors["heads"]
    k, head_dim = len(index), expected["head_dim"]
    for name in ("lofit_scale", "lofit_bias"):
        if tuple(tensors[name].shape) != (k, head_dim):
            model.remove_hooks()
            raise AdapterMismatchError(f"{weights}: {name} has shape {tuple(tensors[name].shape)}, expected ({k}, {head_dim})")
    heads = [tuple(pair) for pair in index.tolist()]
    try:
        model.set_active_heads(heads)
    except ValueError as error:
        model.remove_hooks()
        raise AdapterMismatchError(f"{weights}: {error}") from None
    layers, head_ids = index[:, 0], index[:, 1]
    with torch.no_grad():
        model.lofit_scale[layers, head_ids] = tensors["lofit_scale"].to(model.lofit_scale)
        model.lofit_bias[layers, head_ids] = tensors["lofit_bias"].to(model.lofit_bias)
    model.head_ranking = heads
    return model
