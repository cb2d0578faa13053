"""The paired bootstrap test of a difference in mean per-example score.

For paired scores a_i, b_i (i = 1..n, e.g. 1/0 correctness of two systems on the same
test examples) the observed difference is delta = mean(a - b). Each of B resamples draws
n indices with replacement and computes delta*_b = mean over them of (a - b). Then

- the 95% interval is the 2.5th and 97.5th percentiles of delta*;
- the two-sided p-value of "no difference" shifts the bootstrap distribution to the null
  (mean 0): p = (1 + #{b : |delta*_b - delta| >= |delta|}) / (B + 1).

Identical systems give delta = 0 and p = 1; one system right wherever the other is wrong
gives every delta*_b = delta and p = 1 / (B + 1), the smallest value B resamples can show.

Runs with several seeds on one list of test examples are paired by example, not by run: over
the seeds S both systems ran, a_i = mean_{s in S} a_{s,i} (b_i likewise), and the test resamples
these n whole examples. The difference is that of all seeds' answers pooled, but an example's
runs, which share its difficulty, enter a resample together; concatenating the seeds' answers
as |S| n independent pairs would narrow the interval by up to sqrt(|S|) (exactly that when the
seeds agree on every example).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True, kw_only=True)
class BootstrapResult:
    difference: float
    low: float
    high: float
    p_value: float
    resamples: int
    seeds: tuple[int, ...] = ()
    """The seeds whose runs were paired (:func:`paired_bootstrap_over_seeds`); () for one run each."""


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


def paired_bootstrap_over_seeds(
    a: Mapping[int, Sequence[float]], b: Mapping[int, Sequence[float]], resamples: int = 10_000, seed: int = 0
) -> BootstrapResult:
    """The paired bootstrap test of two systems' per-example scores by training seed (``{seed:
    scores}``, every run on the same examples in the same order), whole examples resampled with
    their scores averaged over the seeds both ran (see the module docstring). A ValueError when
    they share no seed or a run scored another number of examples."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"no seed run by both systems (seeds {sorted(a)} and {sorted(b)})")
    for system, runs in (("first", a), ("second", b)):
        if empty := [s for s in seeds if not len(runs[s])]:
            raise ValueError(f"the {system} system's run of seed(s) {empty} has no per-example scores")
    lengths = {len(runs[s]) for runs in (a, b) for s in seeds}
    if len(lengths) != 1:
        raise ValueError(f"the runs of seeds {list(seeds)} scored different numbers of examples: {sorted(lengths)}")
    means = [torch.tensor([runs[s] for s in seeds], dtype=torch.float64).mean(dim=0).tolist() for runs in (a, b)]
    return replace(paired_bootstrap(*means, resamples=resamples, seed=seed), seeds=seeds)
