"""The hyper-parameters of LoFiT, as one dataclass shared by the Python API and the CLI."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SELECTORS: dict[str, Callable[..., Any]] = {}
"""``--heads NAME`` -> the function that ranks the heads for step 2. Each function registers
itself with :func:`lofit.methods.lofit.selectors.register_selector` (they need the model, which this
module lies below); this module reads the names only, when a config is checked."""
SELECTION_OBJECTIVES = ("l1", "group")
"""Step-1 objectives (see :mod:`lofit.methods.lofit.steps`): the paper's L1 penalty, or a proximal
head-level group penalty."""


def bias_ranking_lr_option(options: Mapping[str, Any]) -> str:
    """The option holding the learning rate of v when heads are ranked by a bias trained on all
    of them: ``select_bias_lr`` when ``options`` set it, else ``bias_lr``."""
    return "select_bias_lr" if options.get("select_bias_lr") is not None else "bias_lr"


def selection_bias_lr_option(options: Mapping[str, Any]) -> str | None:
    """The option holding the learning rate of v in step 1, for a configuration's ``options``:
    :func:`bias_ranking_lr_option` for bias-based selection (``heads: bias-based``); None for
    every other selector, whose step 1 trains no bias."""
    return bias_ranking_lr_option(options) if options.get("heads") == "bias-based" else None


def check_head_amount(amount: float) -> None:
    """Refuse a number of heads that is neither a count (integer >= 1) nor a fraction in (0, 1)."""
    if amount <= 0 or (amount >= 1 and amount != int(amount)):
        raise ValueError(f"a number of heads must be an integer >= 1 or a fraction in (0, 1); got {amount}")


def head_count(amount: float, total_heads: int) -> int:
    """``amount`` heads out of ``total_heads``: a count (integer >= 1) or a fraction in (0, 1), at least 1."""
    check_head_amount(amount)
    k = int(amount) if amount >= 1 else max(1, round(amount * total_heads))
    if k > total_heads:
        raise ValueError(f"asked for {k} heads but the model has only {total_heads} heads")
    return k


@dataclass
class LofitConfig:
    """Hyper-parameters of the two LoFiT steps.

    Defaults are the ones measured to work on SmolLM2-135M (270 heads) for CLUTRR; see
    docs/method.md for why 10% of heads and not the paper's 3%.
    """

    num_heads: float = field(
        default=0.1,
        metadata={
            "step": 2,
            "help": "K, the heads to tune in step 2: a count (integer >= 1) or a fraction of all heads (0 < x < 1)",
        },
    )
    heads: str = field(
        default="lofit",
        metadata={
            "help": "how to choose the K heads",
            "choices": SELECTORS,
        },
    )
    heads_file: str | None = field(
        default=None,
        metadata={"step": 2, "help": "with --heads file: a head_ranking.json from an earlier run, of any task"},
    )
    selection: str = field(
        default="l1",
        metadata={
            "step": 1,
            "help": "step-1 objective: l1 (the paper's: task loss + lambda * sum|A|) or group (a proximal "
            "head-level penalty that sets whole heads exactly to zero; see docs/method.md)",
        },
    )
    l1_lambda: float = field(
        default=1e-3,
        metadata={
            "read_when": {"selection": "l1"},
            "step": 1,
            "help": "weight of the L1 penalty lambda * sum|A| in head selection (--selection l1)",
        },
    )
    group_lambda: float = field(
        default=0.02,
        metadata={
            "read_when": {"selection": "group"},
            "step": 1,
            "help": "mu of the head-level penalty mu * sum_h ||A_h||_2 of --selection group: a head keeps a "
            "non-zero scale only while its averaged task gradient exceeds mu in norm (0.02: on CLUTRR 125 of "
            "270 heads end at exactly 0; 0.1 removes every head)",
        },
    )
    scale_lr: float = field(default=5e-3, metadata={"step": 1, "help": "learning rate of the scales A (step 1)"})
    bias_lr: float = field(default=5e-2, metadata={"help": "learning rate of the biases v (step 2)"})
    select_bias_lr: float | None = field(
        default=None,
        metadata={
            "read_when": {"heads": "bias-based"},
            "hashed": "when set",
            "step": 1,
            "help": "learning rate of the biases v on all heads when --heads bias-based selects heads by "
            "their norm (default: --bias-lr; a rate that suits a few heads can make all-head training diverge)",
        },
    )
    select_epochs: int = field(default=2, metadata={"step": 1, "help": "epochs of head selection (step 1)"})
    tune_epochs: int = field(default=4, metadata={"step": 2, "help": "epochs of bias tuning (step 2)"})
    batch_size: int = field(default=8, metadata={"help": "training examples per optimiser step"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "fraction of steps of linear warm-up before the linear decay"}
    )
    init_std: float = field(default=1e-3, metadata={"help": "std of the N(0, std) initialisation of A in step 1"})
    bias_init_std: float = field(
        default=0.0,
        metadata={
            "step": 2,
            "help": "std of the N(0, std) initialisation of v in step 2 (the paper's code: 1e-3; "
            "0: v starts at zero, the adapter starts as the identity)",
        },
    )
    tune_scales: bool = field(
        default=False,
        metadata={
            "step": 2,
            "help": "step 2 trains A as well as v on the K heads (the capacity test; the paper trains v only)",
        },
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": "clip the gradient's global norm to this value before each optimiser step, "
            "for every trained method (0: no clipping; 1.0 as the Hugging Face Trainer of the "
            "paper's code)"
        },
    )
    seed: int = field(default=42, metadata={"help": "seed of initialisation, data order and sampling"})

    def __post_init__(self) -> None:
        """Refuse impossible values, every problem on its own line."""
        problems = []
        try:
            check_head_amount(self.num_heads)
        except ValueError as error:
            problems.append(str(error))
        if self.heads not in SELECTORS:
            hint = " (the number of heads to tune is --num-heads)" if self.heads.replace(".", "", 1).isdigit() else ""
            problems.append(f"unknown head selector {self.heads!r}; choose one of: {', '.join(SELECTORS)}{hint}")
        if self.selection not in SELECTION_OBJECTIVES:
            problems.append(
                f"unknown step-1 objective {self.selection!r}; choose one of: {', '.join(SELECTION_OBJECTIVES)}"
            )
        if (self.heads == "file") != (self.heads_file is not None):
            problems.append("--heads file and --heads-file PATH go together: the file is the head_ranking.json to use")
        problems += [
            f"{name} must be positive; got {getattr(self, name)}"
            for name in ("scale_lr", "bias_lr", "batch_size", "init_std")
            if getattr(self, name) <= 0
        ]
        if self.select_bias_lr is not None and self.select_bias_lr <= 0:
            problems.append(f"select_bias_lr must be positive; got {self.select_bias_lr}")
        problems += [
            f"{name} must be >= 0; got {getattr(self, name)}"
            for name in (
                "l1_lambda",
                "group_lambda",
                "select_epochs",
                "tune_epochs",
                "weight_decay",
                "warmup_ratio",
                "bias_init_std",
                "max_grad_norm",
            )
            if getattr(self, name) < 0
        ]
        problems += [
            f"{f.name} must be a finite number; got {getattr(self, f.name)}"
            for f in fields(self)
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))
        ]
        if problems:
            raise ValueError("\n".join(problems))

    def num_heads_to_tune(self, total_heads: int) -> int:
        """K: ``num_heads`` as a count of heads out of ``total_heads`` (at least 1)."""
        return head_count(self.num_heads, total_heads)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LofitConfig:
        if isinstance(values.get("heads"), (int, float)):  # adapters saved before head selectors: heads was K
            values = {k: v for k, v in values.items() if k != "heads"} | {"num_heads": values["heads"]}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LofitConfig fields: {', '.join(unknown)}")
        return cls(**values)
