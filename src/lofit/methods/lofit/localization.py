"""How localized a head ranking is: whether a few heads hold most of the importance score.

LoFiT's step 1 is meant to choose: its sparsity term should leave most heads near zero, so
that the top K heads are a real selection. These figures say whether it did, for any
ranking (step 1, bias norms, probes, random scores).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

NEAR_ZERO = 0.05
"""A head "near zero" scores below this fraction of the largest score."""
MAJORITY = 0.5
"""A selection of K of N heads is localized when the top K hold at least this share of the total score,
and at least twice K / N (capped halfway between K / N and 1). Scores drawn uniformly at random give the
top 10% about 19% of the total: twice the uniform share alone would call noise a choice."""


@dataclass(frozen=True)
class Localization:
    """How localized a step-1 result is, for a selection of the top ``k`` of ``total`` heads.

    With scores s_1 >= ... >= s_N >= 0 and S = sum s:

    - ``top_share`` = (s_1 + ... + s_k) / S, against ``uniform_share`` = k / N, what it
      would be if every head scored the same;
    - ``near_zero`` = #{h : s_h < NEAR_ZERO * s_1}, and ``exact_zero`` = #{h : s_h = 0};
    - ``effective_heads`` = S^2 / sum s^2 (N when all scores are equal, 1 when one head holds
      everything).

    ``localized`` holds when K < N (``selects``) and ``top_share`` >= min(max(MAJORITY, 2 k / N),
    (1 + k / N) / 2): for K up to a quarter of the heads, when the top K hold at least half of the
    total score. At K = N nothing is chosen, so ``localized`` is false and ``label`` says "no selection".
    """

    k: int
    total: int
    top_share: float
    uniform_share: float
    near_zero: int
    exact_zero: int
    effective_heads: float
    max_score: float
    median_score: float

    @classmethod
    def of(cls, scores: torch.Tensor, k: int) -> Localization:
        flat = scores.detach().flatten().double().abs().sort(descending=True).values
        total, count = flat.sum().item(), flat.numel()
        if not 1 <= k <= count:
            raise ValueError(f"cannot judge a selection of {k} heads: there are {count} heads")
        squares = (flat**2).sum().item()
        return cls(
            k=k,
            total=count,
            top_share=flat[:k].sum().item() / total if total > 0 else 0.0,
            uniform_share=k / count,
            near_zero=int((flat < NEAR_ZERO * flat[0]).sum()),
            exact_zero=int((flat == 0).sum()),
            effective_heads=total**2 / squares if squares > 0 else 0.0,
            max_score=flat[0].item(),
            median_score=flat.median().item(),
        )

    @property
    def threshold(self) -> float:
        """The top share at which a selection counts as localized."""
        return min(max(MAJORITY, 2 * self.uniform_share), (1 + self.uniform_share) / 2)

    @property
    def selects(self) -> bool:
        """Whether the top K leave any head out (K < N): at K = N every head is tuned, and the
        ranking chooses nothing, localized or not."""
        return self.k < self.total

    @property
    def localized(self) -> bool:
        """K < N, some head moved, and the top K hold at least ``threshold`` of the total score."""
        return self.selects and self.max_score > 0 and self.top_share >= self.threshold

    @property
    def label(self) -> str:
        """``localized``, ``NOT localized``, or ``no selection (all heads)`` when K = N."""
        if not self.selects:
            return "no selection (all heads)"
        return "localized" if self.localized else "NOT localized"

    @property
    def kept(self) -> int:
        """Heads with a non-zero score: fewer than K means the top K include heads at zero, in index order."""
        return self.total - self.exact_zero

    @property
    def a_choice(self) -> bool:
        """Localized, and every one of the top K heads kept a non-zero score."""
        return self.localized and self.kept >= self.k

    def summary(self) -> str:
        """One line of figures (with the localization threshold where K < N)."""
        threshold = f"; localized from {100 * self.threshold:.1f}%" if self.selects else ""
        return (
            f"top {self.k} of {self.total} heads hold {100 * self.top_share:.1f}% of the total score "
            f"({100 * self.uniform_share:.1f}% if all scored the same{threshold}), "
            f"effective heads {self.effective_heads:.0f} of {self.total}, {self.near_zero} heads below "
            f"{NEAR_ZERO:.0%} of the largest score ({self.exact_zero} exactly 0)"
        )

    def verdict(self, selection: str | None = None) -> str:
        """The summary, preceded by whether the top K are a choice and, when not, what to change (at
        K = N, that there is nothing to choose: step 1 itself does not warn then)."""
        if not self.selects:
            return f"K = all {self.total} heads: step 2 tunes every head, so step 1 chooses none ({self.summary()})"
        lower = {"l1": "lower --l1-lambda", "group": "lower --group-lambda"}.get(selection or "", "lower the penalty")
        if self.kept < self.k:
            return (
                f"step 1 kept only {self.kept} heads, fewer than K = {self.k}: the other {self.k - self.kept} of the "
                f"top K are heads at zero, taken in index order; {lower}, or choose fewer heads"
            )
        if self.localized:
            return f"step 1 localized: {self.summary()}"
        advice = {
            "l1": "raise --l1-lambda, or use --selection group (a head-level proximal penalty that sets heads "
            "exactly to zero)",
            "group": "raise --group-lambda",
        }.get(selection or "", "this ranking barely prefers its top heads")
        return f"step 1 did not localize: {self.summary()}; {advice}"

    def to_json(self) -> dict:
        return asdict(self) | {
            "threshold": self.threshold,
            "localized": self.localized,
            "selects": self.selects,
            "kept": self.kept,
            "near_zero_fraction": NEAR_ZERO,
        }
