"""The hyper-parameters of LoFiT, as one dataclass shared by the Python API and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LofitConfig:
    """Hyper-parameters of the two LoFiT steps.

    Defaults are the ones measured to work on SmolLM2-135M (270 heads) for CLUTRR; see
    docs/method.md for why 10% of heads and not the paper's 3%.
    """

    heads: float = field(
        default=0.1,
        metadata={"help": "heads to tune in step 2: a count (integer >= 1) or a fraction of all heads (0 < x < 1)"},
    )
    l1_lambda: float = field(
        default=1e-3, metadata={"help": "weight of the L1 penalty lambda * sum|A| in head selection"}
    )
    scale_lr: float = field(default=5e-3, metadata={"help": "learning rate of the scales A (step 1)"})
    bias_lr: float = field(default=5e-2, metadata={"help": "learning rate of the biases v (step 2)"})
    select_epochs: int = field(default=2, metadata={"help": "epochs of head selection (step 1)"})
    tune_epochs: int = field(default=4, metadata={"help": "epochs of bias tuning (step 2)"})
    batch_size: int = field(default=8, metadata={"help": "training examples per optimiser step"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps of linear warm-up before the linear decay"})
    init_std: float = field(default=1e-3, metadata={"help": "std of the N(0, std) initialisation of A in step 1"})
    seed: int = field(default=42, metadata={"help": "seed of initialisation, data order and sampling"})

    def __post_init__(self) -> None:
        if self.heads <= 0 or (self.heads >= 1 and self.heads != int(self.heads)):
            raise ValueError(f"heads must be an integer >= 1 or a fraction in (0, 1); got {self.heads}")
        for name in ("scale_lr", "bias_lr", "batch_size", "init_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("l1_lambda", "select_epochs", "tune_epochs", "weight_decay", "warmup_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")

    def num_heads_to_tune(self, total_heads: int) -> int:
        """K: ``heads`` as a count of heads out of ``total_heads`` (at least 1)."""
        k = int(self.heads) if self.heads >= 1 else max(1, round(self.heads * total_heads))
        if k > total_heads:
            raise ValueError(f"asked for {k} heads but the model has only {total_heads} heads")
        return k

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LofitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LofitConfig fields: {', '.join(unknown)}")
        return cls(**values)
