"""Compatibility module: ``lofit.batching`` before the package was split into layers. It only
re-exports :mod:`lofit.data.batching`; new code imports from there."""

from lofit.data.batching import (
    Batch,
    TokenizedPair,
    collate,
    left_pad,
    tokenize_pair,
)

__all__ = [
    "Batch",
    "TokenizedPair",
    "collate",
    "left_pad",
    "tokenize_pair",
]
