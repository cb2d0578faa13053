"""The base model's identity, recorded with every saved adapter or method result.

Two fields make a saved result portable between machines:

- ``base_model``: the model as the user named it to :func:`lofit.load_model` (which records
  it as ``model.lofit_base_name``): ``"default"``, ``"gemma3-270m"``, a hub id, or a local
  file or folder by its *name* only, never an absolute path. A model not loaded through
  ``load_model`` is named from its ``name_or_path``, reduced the same way.
- ``base_model_fingerprint``: 16 hex digits of a SHA-256 over (1) the model config's
  ``to_dict()`` without the keys that change with how or where the model was loaded
  (every key starting with ``_`` such as ``_name_or_path``, and :data:`VOLATILE_CONFIG_KEYS`:
  versions, dtype, ``architectures``, runtime flags), nested sub-configs included, as
  sorted-key JSON; and (2) for every parameter, by name in sorted order: its name, its
  shape and :data:`SAMPLES_PER_TENSOR` elements taken at a fixed stride
  (``numel // SAMPLES_PER_TENSOR``) through the flattened tensor, rounded to bfloat16 so
  that float32 and bfloat16 loads of one checkpoint agree. peft's injected layers are seen
  through (``.base_layer`` drops out of a name, ``lora_*`` tensors are skipped), so a model
  carrying a LoRA has its base model's fingerprint; parameters on the ``meta`` device
  (offloaded) are skipped.

Loading a result whose fingerprint differs from the model's (same geometry, other weights)
warns with a ``UserWarning`` naming both models; results saved before fingerprints existed
load silently.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "dtype",
        "torch_dtype",
        "architectures",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)
SAMPLES_PER_TENSOR = 8
NAME_KEY = "base_model"
FINGERPRINT_KEY = "base_model_fingerprint"


def portable_name(name_or_path: str) -> str:
    """``name_or_path`` as it can be named on another machine: an existing path, an absolute
    path, one with more than one ``/`` or ending in ``.gguf`` becomes its last component
    (resolved first, so ``"."`` gives the folder's name); anything else (``"default"``,
    ``"gemma3-270m"``, a hub id ``owner/name``) is kept as it is."""
    path = Path(name_or_path)
    if not name_or_path:
        return ""
    if path.exists():
        return path.resolve().name
    if (
        path.is_absolute()
        or name_or_path.count("/") > 1
        or name_or_path.startswith((".", "~"))
        or name_or_path.endswith(".gguf")
    ):
        return path.name
    return name_or_path


def base_model_name(model: nn.Module) -> str:
    """The name :func:`lofit.load_model` recorded on ``model``, else its ``name_or_path``
    reduced by :func:`portable_name` (``""`` when it has none)."""
    recorded = getattr(model, "lofit_base_name", None)
    if isinstance(recorded, str):
        return recorded
    return portable_name(getattr(model, "name_or_path", "") or "")


def _stable_config(values: Any) -> Any:
    """``values`` (a config's ``to_dict()``) without the volatile keys, at every depth."""
    if isinstance(values, dict):
        return {
            key: _stable_config(value)
            for key, value in values.items()
            if not str(key).startswith("_") and key not in VOLATILE_CONFIG_KEYS
        }
    if isinstance(values, (list, tuple)):
        return [_stable_config(value) for value in values]
    return values


def _base_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s parameters by name, peft's injected adapter tensors left out and its
    ``base_layer`` wrappers seen through."""
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue
        yield ".".join(part for part in parts if part != "base_layer"), parameter


def fingerprint(model: nn.Module) -> str:
    """The fingerprint of ``model``'s config and weights (the rule is in the module docstring)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(_stable_config(model.config.to_dict()), sort_keys=True, default=str).encode())
    for name, parameter in sorted(_base_parameters(model), key=lambda item: item[0]):
        if parameter.device.type == "meta":
            continue
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)][:SAMPLES_PER_TENSOR]
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(sample.to(device="cpu", dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def identity(model: nn.Module) -> dict[str, str]:
    """The two fields a saved result records about its base model."""
    return {NAME_KEY: base_model_name(model), FINGERPRINT_KEY: fingerprint(model)}


def identity_problem(record: dict) -> str | None:
    """What is wrong with the identity fields of a saved ``record`` (a value that is present
    but not a string), or None."""
    for key in (NAME_KEY, FINGERPRINT_KEY):
        if key in record and not isinstance(record[key], str):
            return f"{key} must be a string, got {type(record[key]).__name__}"
    return None


def warn_if_other_weights(record: dict, model: nn.Module, path: Path) -> None:
    """A UserWarning naming both models when ``record`` (read from ``path``) carries a
    fingerprint other than ``model``'s; nothing when it carries none."""
    saved = record.get(FINGERPRINT_KEY)
    if not isinstance(saved, str):
        return
    current = fingerprint(model)
    if saved != current:
        made_for = record.get(NAME_KEY) or "an unnamed model"
        loaded_onto = base_model_name(model) or "an unnamed model"
        warnings.warn(
            f"{path}: this result was made for {made_for!r} (fingerprint {saved}) and is being loaded onto "
            f"{loaded_onto!r} (fingerprint {current}), a model of the same shape with other weights; "
            "it may not behave as it did in training",
            UserWarning,
            stacklevel=2,
        )
