"""The paired bootstrap test of a difference in mean per-example score.

For paired scores a_i, b_i (i = 1..n, e.g. 1/0 correctness of two systems on the same
test examples) the observed difference is delta = mean(a - b). Each of B resamples draws
n indices with replacement and computes delta*_b = mean over them of (a - b). Then

- the 95% interval is the 2.5th and 97.5th percentiles of delta*;
- the two-sided p-value of "no difference" shifts the bootstrap distribution to the null
  (mean 0): p = (1 + #{b : |delta*_b - delta| >= |delta|}) / (B + 1).

Identical systems give delta = 0 and p = 1; one system right wherever the other is wrong
gives every delta*_b = delta and p = 1 / (B + 1), the smallest value B resamples can show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class BootstrapResult:
    difference: float
    low: float
    high: float
    p_value: float
    resamples: int


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0) -> BootstrapResult:
    """The paired bootstrap test of mean(a) - mean(b) (see the module docstring)."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired scores need two non-empty lists of one length; got {len(a)} and {len(b)}")
    differences = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    observed = float(differences.mean())
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(len(differences), (resamples, len(differences)), generator=generator)
    means = differences[indices].mean(dim=1)
    extreme = int(((means - observed).abs() >= abs(observed) - 1e-12).sum())
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return BootstrapResult(
        difference=observed, low=low, high=high, p_value=(1 + extreme) / (resamples + 1), resamples=resamples
    )
