"""Compatibility module: ``lofit.steps`` before the package was split into layers. It only
re-exports :mod:`lofit.methods.lofit.steps`, :mod:`lofit.methods.lofit.ranking`; new code imports from there."""

from lofit.methods.lofit.ranking import (
    HeadRanking,
)
from lofit.methods.lofit.steps import (
    adam_head_metric,
    select_heads,
    select_heads_by_bias,
    shrink_heads,
    tune_biases,
)

__all__ = [
    "HeadRanking",
    "adam_head_metric",
    "select_heads",
    "select_heads_by_bias",
    "shrink_heads",
    "tune_biases",
]
