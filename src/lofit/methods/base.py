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

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lofit._version import __version__
from lofit.data.files import short_repr
from lofit.methods.lofit.adapter_io import (
    AdapterError,
    AdapterMismatchError,
    check_tensor,
    check_tensor_names,
    read_json_object,
    read_safetensors,
)
from lofit.methods.lofit.config import LofitConfig
from lofit.methods.lofit.ranking import HeadRanking
from lofit.models.identity import identity, identity_problem, warn_if_other_weights
from lofit.training.loop import TrainingLog, TrainingRun, TrainingSetup, train
from lofit.training.objectives import Objective, build_objective
from lofit.utils.atomic import save_safetensors, write_json

METHOD_FILE = "lofit_method.json"


@dataclass(kw_only=True)
class FitContext:
    """What every method may use: the frozen model, its tokenizer, the training examples,
    and the shared settings (seed, batch size, epochs, head count and selector, DPO beta)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    examples: Sequence[Any]
    lofit: LofitConfig = field(default_factory=LofitConfig)
    beta: float = 0.5
    progress: bool = True
    setup: TrainingSetup = field(default_factory=TrainingSetup)

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


METHODS: dict[str, type[Method]] = {}
"""``--method NAME`` -> its class: every subclass of :class:`Method` that sets ``name`` is entered
here when its module is imported (:mod:`lofit.methods` imports them all)."""


class Method(ABC):
    """A way to adapt a frozen model to a task (LoFiT or a baseline). A subclass that sets
    ``name`` registers itself in :data:`METHODS`."""

    name: ClassVar[str]
    config_class: ClassVar[type | None] = None
    trains: ClassVar[bool] = True
    """Whether ``fit`` learns anything from the training examples (the 0-shot baseline does not)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in METHODS:
                raise TypeError(f"two methods are called {cls.name!r}: {METHODS[cls.name].__name__} and {cls.__name__}")
            METHODS[cls.name] = cls

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
    config = model.config.get_text_config()  # a multimodal model's sizes are those of its text decoder
    return {
        "model_type": model.config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    }


def write_method_file(
    directory: Path,
    method: Method,
    model: PreTrainedModel,
    metrics: dict | None,
    base_identity: dict[str, str] | None = None,
) -> None:
    """Write :data:`METHOD_FILE` (the method, the base model's portable name and fingerprint, see
    :mod:`lofit.models.identity`, its geometry, the options, ``metrics``) atomically;
    ``base_identity`` is ``identity(model)`` when the caller has computed it already."""
    record = {
        "method": method.name,
        "lofit_version": __version__,
        **(base_identity or identity(model)),
        **geometry(model),
        "options": method.options(),
        "metrics": metrics or {},
    }
    write_json(directory / METHOD_FILE, record)


def read_method_file(directory: Path) -> dict:
    """The JSON object in ``directory``'s :data:`METHOD_FILE`: FileNotFoundError when it is
    absent, AdapterError when it is not UTF-8 JSON holding an object, or gives the base
    model's name or fingerprint as something other than a string."""
    path = directory / METHOD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a result saved by lofit")
    record = read_json_object(path)
    problem = identity_problem(record)
    if problem:
        raise AdapterError(f"{path}: {problem}")
    return record


def check_training_options(method: str, lr: float, epochs: int | None) -> None:
    if lr <= 0:
        raise ValueError(f"{method}_lr must be positive; got {lr}")
    if epochs is not None and epochs < 0:
        raise ValueError(f"{method}_epochs must be >= 0; got {epochs}")


def check_geometry(record: dict, model: PreTrainedModel, directory: Path) -> None:
    """An AdapterMismatchError unless the saved ``record`` has ``model``'s type and sizes; then a
    UserWarning when it was made for a model of another fingerprint (:mod:`lofit.models.identity`)."""
    expected = geometry(model)
    saved = {key: record.get(key) for key in expected}
    if saved != expected:
        differences = ", ".join(
            f"{key} {short_repr(saved[key])} vs {expected[key]!r}" for key in expected if saved[key] != expected[key]
        )
        raise AdapterMismatchError(
            f"{directory / METHOD_FILE}: the {short_repr(record.get('method'))} result was made for "
            f"another model (saved vs this model: {differences})"
        )
    warn_if_other_weights(record, model, directory / METHOD_FILE)


def save_tensors(directory: Path, filename: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (as float32, on the CPU) to ``directory/filename`` with safetensors, atomically."""
    save_safetensors(
        directory / filename,
        {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()},
        metadata={"format": "pt"},
    )


def load_tensors(directory: Path, filename: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of ``directory/filename`` (safetensors, never unpickled) as float32: exactly
    the names of ``shapes``, floating point, finite and of those shapes (else an AdapterError,
    an AdapterMismatchError for a shape); FileNotFoundError when the file is absent."""
    path = directory / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} does not hold a complete saved result")
    tensors = read_safetensors(path)
    check_tensor_names(path, tensors, tuple(shapes))
    return {name: check_tensor(path, name, tensors[name], shape) for name, shape in shapes.items()}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside the block torch's global RNG (which weight initialisers draw from) is seeded
    with ``seed``; afterwards the caller's RNG state is what it was."""
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield


def train_adapter(
    model: nn.Module,
    parameters: list[nn.Parameter],
    lr: float,
    epochs: int | None,
    context: FitContext,
    description: str,
    method: str,
    first_trained_layer: int = 0,
) -> FitResult:
    """Train ``parameters`` of ``model`` on the context's objective with lofit's loop (AdamW,
    linear decay, the shared batch size, seed and gradient clipping) for ``epochs`` (None: the equal budget);
    ``method`` names the checkpoint stage and the learning-rate option (``--<method>-lr``);
    nothing trained acts below ``first_trained_layer`` (see :class:`~lofit.training.loop.TrainingRun`)."""
    start = time.perf_counter()
    shared = context.lofit
    run = TrainingRun(
        parameters=parameters,
        lr=lr,
        epochs=epochs if epochs is not None else context.budget_epochs,
        batch_size=shared.batch_size,
        seed=shared.seed,
        weight_decay=shared.weight_decay,
        warmup_ratio=shared.warmup_ratio,
        description=description,
        progress=context.progress,
        stage=method,
        lr_name=f"--{method}-lr",
        setup=context.setup,
        first_trained_layer=first_trained_layer,
        max_grad_norm=shared.max_grad_norm,
    )
    log: TrainingLog = train(model, context.objective(model), run)
    return FitResult(
        model,
        sum(p.numel() for p in parameters),
        {"train_seconds": time.perf_counter() - start, "train_losses": log.epoch_losses} | training_entries(log),
    )


def training_entries(*logs: TrainingLog) -> dict:
    """The summary entries of the training stages ``logs`` that every method shares: their
    warnings (divergence), if any, and when a stage resumed from a checkpoint, ``resumed_steps``
    (the optimiser steps run before this process, which its wall times do not count) of
    ``steps`` (all of them)."""
    messages = [message for log in logs for message in log.warnings]
    resumed = sum(log.resumed_from_step for log in logs)
    entries: dict = {"warnings": messages} if messages else {}
    return entries | ({"resumed_steps": resumed, "steps": sum(log.steps for log in logs)} if resumed else {})
