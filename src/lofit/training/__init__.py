"""Training: the one loop (:mod:`.loop`), the objectives it minimises (:mod:`.objectives`:
SFT and DPO), checkpoints (:mod:`.checkpoints`) and the prefix cache that skips frozen
layers (:mod:`.prefix_cache`). Imports :mod:`lofit.utils`, :mod:`lofit.data`,
:mod:`lofit.models` and :mod:`lofit.evaluation`.

The loop's names are re-exported here, so ``lofit.training.train`` and the other names of
the former ``lofit/training.py`` keep working."""

from lofit.training.loop import (
    DIVERGENCE_FACTOR,
    EXPLOSION_FACTOR,
    START_STEPS,
    CheckpointPolicy,
    NonFiniteLossError,
    TrainingLog,
    TrainingRun,
    TrainingSetup,
    bf16_is_fast,
    check_loss_scaling,
    cpu_has_bf16,
    epoch_batches,
    gradient_checkpointing,
    make_accelerator,
    resolve_mixed_precision,
    train,
)

__all__ = [
    "DIVERGENCE_FACTOR",
    "EXPLOSION_FACTOR",
    "START_STEPS",
    "CheckpointPolicy",
    "NonFiniteLossError",
    "TrainingLog",
    "TrainingRun",
    "TrainingSetup",
    "bf16_is_fast",
    "check_loss_scaling",
    "cpu_has_bf16",
    "epoch_batches",
    "gradient_checkpointing",
    "make_accelerator",
    "resolve_mixed_precision",
    "train",
]
