"""Methods: LoFiT and the baselines it is compared with, each one module, selected by name.

``METHODS`` maps ``--method NAME`` to its class; ``load_adapted`` reads back any saved result.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from lofit.data.files import short_repr
from lofit.methods.base import METHOD_FILE, METHODS, FitContext, FitResult, Method, read_method_file
from lofit.methods.lofit.adapter_io import CONFIG_NAME, AdapterError, read_json_object

# Each method's class registers itself in METHODS when its module is imported; the order of
# these imports is the order of METHODS (LoFiT first, then the baselines).
# isort: off
from lofit.methods.lofit import method as lofit_method
from lofit.methods import zero_shot, iti, repe, lora, red, reft
# isort: on

METHOD_MODULES = (lofit_method, zero_shot, iti, repe, lora, red, reft)
"""The modules that define the methods, imported for their registration."""
METHOD_CONFIGS: tuple[type, ...] = tuple(m.config_class for m in METHODS.values() if m.config_class is not None)
"""Every method's option dataclass, derived from :data:`METHODS`."""


def get_method(name: str, config: object | None = None) -> Method:
    """The method called ``name`` with ``config`` (its config dataclass; defaults when None)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name](config)


def saved_record(directory: str | Path) -> dict:
    """The one metadata record of a saved result: ``lofit_method.json`` (the baselines, and
    LoFiT adapters saved before version 0.2), else a per-head adapter's ``adapter_config.json``
    (whose ``method`` defaults to lofit); FileNotFoundError when lofit saved nothing there,
    AdapterError when the record is broken or names no known method."""
    directory = Path(directory)
    if (directory / METHOD_FILE).is_file():
        path, record = directory / METHOD_FILE, read_method_file(directory)
    elif (directory / CONFIG_NAME).is_file():
        path = directory / CONFIG_NAME
        record = {"method": "lofit"} | read_json_object(path)
    else:
        raise FileNotFoundError(
            f"nothing saved by lofit in {directory}: neither {METHOD_FILE} nor {CONFIG_NAME} is there"
        )
    name = record.get("method")
    if not isinstance(name, str) or name not in METHODS:
        raise AdapterError(f"{path} names an unknown method {short_repr(name)}; known methods: {', '.join(METHODS)}")
    return record


def saved_method(directory: str | Path) -> str:
    """The method that saved ``directory`` (:func:`saved_record`'s ``method``)."""
    return saved_record(directory)["method"]


def load_adapted(model: PreTrainedModel, directory: str | Path) -> nn.Module:
    """``model`` with the result saved in ``directory`` (by any method) applied. Every file is
    checked: FileNotFoundError for a missing one, AdapterError (AdapterMismatchError for a
    result made for another model) for a broken or foreign one, and then ``model`` is left
    as it was (``requires_grad``, hooks, modules)."""
    directory = Path(directory)
    return METHODS[saved_method(directory)].load(model, directory)


__all__ = [
    "METHODS",
    "METHOD_CONFIGS",
    "FitContext",
    "FitResult",
    "Method",
    "get_method",
    "load_adapted",
    "saved_method",
    "saved_record",
]
