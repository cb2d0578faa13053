"""The method interface: fit on a task's training examples, then save, load and evaluate alike.

A method is one module defining a :class:`Method` subclass (and, when it has options, a
config dataclass whose field names start with the method's name, so that every option
has one flat name on the command line) and registering it in ``lofit.methods.METHODS``.

``fit`` returns a :class:`FitResult` whose ``model`` is evaluated by the task exactly as
the base model would be (``forward``, ``generate``). ``save`` writes the result's own
numbers as safetensors plus ``lofit_method.json`` (the method, the base model's
geometry, the options); :func:`load_adapted` reads any such folder back onto a base
model, refusing one made for a model of another type or shape.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..adapter_io import AdapterMismatchError
from ..config import LofitConfig
from ..objectives import Objective, build_objective
from ..steps import HeadRanking
from ..training import TrainingLog, TrainingRun, train

METHOD_FILE = "lofit_method.json"


@dataclass
class FitContext:
    """What every method may use: the frozen model, its tokenizer, the training examples,
    and the shared settings (seed, batch size, epochs, head count and selector, DPO beta)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    examples: Sequence[Any]
    lofit: LofitConfig = field(default_factory=LofitConfig)
    beta: float = 0.5
    progress: bool = True

    def objective(self, model: nn.Module) -> Objective:
        """SFT or DPO on the examples; DPO's reference is ``model`` with its adapter disabled."""
        return build_objective(model, self.tokenizer, self.examples, self.beta)

    @property
    def budget_epochs(self) -> int:
        """Epochs a trained baseline gets by default: LoFiT's two steps together (equal budget)."""
        return self.lofit.select_epochs + self.lofit.tune_epochs


@dataclass
class FitResult:
    """A fitted method: the model to evaluate, its trained parameter count (numbers learned
    from the training data, by gradient or by fitting), timings and losses, and the head
    ranking when the method ranks heads."""

    model: nn.Module
    trained_parameters: int
    log: dict[str, Any] = field(default_factory=dict)
    ranking: HeadRanking | None = None


class Method(ABC):
    """A way to adapt a frozen model to a task (LoFiT or a baseline)."""

    name: ClassVar[str]
    config_class: ClassVar[type | None] = None

    def __init__(self, config: Any = None):
        if config is None and self.config_class is not None:
            config = self.config_class()
        if self.config_class is None and config is not None:
            raise TypeError(f"method {self.name!r} takes no options of its own")
        if self.config_class is not None and not isinstance(config, self.config_class):
            raise TypeError(f"method {self.name!r} takes a {self.config_class.__name__}, not a {type(config).__name__}")
        self.config = config

    @abstractmethod
    def fit(self, context: FitContext) -> FitResult:
        """Train or fit on ``context.examples``; the base model's own weights never change."""

    @abstractmethod
    def save(self, result: FitResult, directory: Path, metrics: dict | None = None) -> None:
        """Write the fitted numbers (safetensors) and :data:`METHOD_FILE` into ``directory``."""

    @classmethod
    @abstractmethod
    def load(cls, model: PreTrainedModel, directory: Path) -> nn.Module:
        """``model`` with the result saved in ``directory`` applied."""

    def options(self) -> dict:
        return asdict(self.config) if self.config is not None else {}


def geometry(model: PreTrainedModel) -> dict:
    """What a saved result must agree with: the architecture and its sizes."""
    config = model.config
    return {"model_type": config.model_type, "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}


def write_method_file(directory: Path, method: Method, model: PreTrainedModel, metrics: dict | None) -> None:
    from .. import __version__

    directory.mkdir(parents=True, exist_ok=True)
    record = {"method": method.name, "lofit_version": __version__, "base_model": getattr(model, "name_or_path", "") or "",
              **geometry(model), "options": method.options(), "metrics": metrics or {}}
    (directory / METHOD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_method_file(directory: Path) -> dict:
    path = directory / METHOD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a result saved by lofit")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return record


def check_training_options(method: str, lr: float, epochs: int | None) -> None:
    if lr <= 0:
        raise ValueError(f"{method}_lr must be positive; got {lr}")
    if epochs is not None and epochs < 0:
        raise ValueError(f"{method}_epochs must be >= 0; got {epochs}")


def check_geometry(record: dict, model: PreTrainedModel, directory: Path) -> None:
    expected = geometry(model)
    saved = {key: record.get(key) for key in expected}
    if saved != expected:
        differences = ", ".join(f"{key} {saved[key]!r} vs {expected[key]!r}" for key in expected if saved[key] != expected[key])
        raise AdapterMismatchError(f"the {record.get('method')} result in {directory} was made for another model "
                                   f"(saved vs this model: {differences})")


def save_tensors(directory: Path, filename: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (as float32, on the CPU) to ``directory/filename`` with safetensors."""
    save_file({name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}, str(directory / filename))


def load_tensors(directory: Path, filename: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of ``directory/filename`` (safetensors, never unpickled), checked against ``shapes``."""
    path = directory / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} does not hold a complete saved result")
    tensors = load_file(str(path))
    for name, shape in shapes.items():
        if name not in tensors:
            raise ValueError(f"{path} lacks the tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise AdapterMismatchError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, this model needs {shape}")
    return tensors


def train_adapter(model: nn.Module, parameters: list[nn.Parameter], lr: float, epochs: int | None, context: FitContext,
                  description: str) -> FitResult:
    """Train ``parameters`` of ``model`` on the context's objective with lofit's loop (AdamW,
    linear decay, the shared batch size and seed) for ``epochs`` (None: the equal budget)."""
    start = time.perf_counter()
    run = TrainingRun(parameters, lr, epochs if epochs is not None else context.budget_epochs, context.lofit.batch_size,
                      context.lofit.seed, context.lofit.weight_decay, context.lofit.warmup_ratio, description, context.progress)
    log: TrainingLog = train(model, context.objective(model), run)
    return FitResult(model, sum(p.numel() for p in parameters),
                     {"train_seconds": time.perf_counter() - start, "train_losses": log.epoch_losses})
