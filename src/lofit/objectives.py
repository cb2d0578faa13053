"""Compatibility module: ``lofit.objectives`` before the package was split into layers. It only
re-exports :mod:`lofit.training.objectives`; new code imports from there."""

from lofit.training.objectives import (
    DPO,
    SFT,
    Objective,
    PreferenceBatch,
    PreferenceItem,
    Regularized,
    build_objective,
    dpo_losses,
)

__all__ = [
    "DPO",
    "Objective",
    "PreferenceBatch",
    "PreferenceItem",
    "Regularized",
    "SFT",
    "build_objective",
    "dpo_losses",
]
