"""Methods: LoFiT and the baselines it is compared with, each one module, selected by name.

``METHODS`` maps ``--method NAME`` to its class; ``load_adapted`` reads back any saved result.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from ..adapter_io import CONFIG_NAME
from .base import METHOD_FILE, FitContext, FitResult, Method, read_method_file
from .iti import Iti, ItiConfig
from .lofit_method import Lofit
from .lora import Lora, LoraBaselineConfig
from .red import Red, RedConfig
from .repe import Repe, RepeConfig
from .reft import Reft, ReftConfig
from .zero_shot import ZeroShot

METHODS: dict[str, type[Method]] = {m.name: m for m in (Lofit, ZeroShot, Iti, Repe, Lora, Red, Reft)}
METHOD_CONFIGS: tuple[type, ...] = (ItiConfig, RepeConfig, LoraBaselineConfig, RedConfig, ReftConfig)


def get_method(name: str, config: object | None = None) -> Method:
    """The method called ``name`` with ``config`` (its config dataclass; defaults when None)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name](config)


def saved_method(directory: str | Path) -> str:
    """The method that saved ``directory`` (a LoFiT adapter from before methods existed counts as lofit)."""
    directory = Path(directory)
    if (directory / METHOD_FILE).is_file():
        name = read_method_file(directory).get("method")
        if name not in METHODS:
            raise ValueError(f"{directory / METHOD_FILE} names an unknown method {name!r}")
        return name
    if (directory / CONFIG_NAME).is_file():
        return "lofit"
    raise FileNotFoundError(f"nothing saved by lofit in {directory}: neither {METHOD_FILE} nor {CONFIG_NAME} is there")


def load_adapted(model: PreTrainedModel, directory: str | Path) -> nn.Module:
    """``model`` with the result saved in ``directory`` (by any method) applied."""
    directory = Path(directory)
    return METHODS[saved_method(directory)].load(model, directory)


__all__ = ["METHODS", "METHOD_CONFIGS", "FitContext", "FitResult", "Method", "get_method", "load_adapted", "saved_method"]
