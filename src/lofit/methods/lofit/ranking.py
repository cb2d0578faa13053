"""The head ranking step 1 (or another selector) produces: a score per head, best first,
saved as head_ranking.json with the localization figures of the selection."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lofit.data.files import finite_number
from lofit.methods.lofit.localization import Localization
from lofit.utils.atomic import write_json


@dataclass
class HeadRanking:
    """Heads sorted by importance score, best first.

    Attributes:
        scores: (num_layers, num_heads) tensor, ||A[l, h]||_2 after step 1.
        order: every (layer, head) pair sorted by descending score (ties by index).
    """

    scores: torch.Tensor
    order: list[tuple[int, int]]
    selected: int | None = None
    """K, the heads the run that saved this ranking selected, when known (a saved ``localization``)."""

    @classmethod
    def from_scores(cls, scores: torch.Tensor) -> HeadRanking:
        num_heads = scores.shape[1]
        flat = scores.flatten()
        # stable sort on the negated scores: equal scores keep index order
        ranked = torch.sort(-flat, stable=True).indices.tolist()
        return cls(scores.detach().cpu().float(), [(i // num_heads, i % num_heads) for i in ranked])

    def localization(self, k: int) -> Localization:
        """How concentrated the scores are, judged for a selection of the top ``k`` heads."""
        return Localization.of(self.scores, k)

    def zero_scored(self, heads: list[tuple[int, int]] | list[list[int]]) -> int:
        """How many of ``heads`` scored exactly 0: heads no selection chose, when they are fewer
        than all heads (a step 1 that kept fewer than K fills its top K with them, in index order)."""
        if len(heads) >= self.scores.numel():
            return 0  # every head is trained: nothing was selected
        return sum(float(self.scores[layer, head]) == 0.0 for layer, head in heads)

    def top(self, k: int) -> list[tuple[int, int]]:
        if not 1 <= k <= len(self.order):
            raise ValueError(f"cannot take the top {k} heads: there are {len(self.order)} heads")
        return self.order[:k]

    def to_json(self, k: int | None = None) -> dict:
        """Every head with its score, best first; with ``k``, the localization figures of a top-``k`` selection."""
        record = {
            "num_layers": self.scores.shape[0],
            "num_heads": self.scores.shape[1],
            "ranking": [
                {"rank": rank, "layer": layer, "head": head, "score": float(self.scores[layer, head])}
                for rank, (layer, head) in enumerate(self.order)
            ],
        }
        if k is not None:
            record["localization"] = self.localization(k).to_json()
        return record

    def save(self, path: str | Path, k: int | None = None) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        write_json(path, self.to_json(k), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> HeadRanking:
        """The ranking :meth:`save` wrote to ``path``: FileNotFoundError when it is absent, a
        ValueError naming the file unless it is UTF-8 JSON holding an object with integer
        ``num_layers`` and ``num_heads`` (>= 1) and a ``ranking`` list naming every head once
        (integer ``layer`` and ``head`` in range, a finite number ``score``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no head ranking at {path}")
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ValueError(f"{path} is not a lofit head ranking: not valid JSON ({error})") from None
        ranking = cls.from_scores(cls._scores_from_json(data, path))
        saved = data.get("localization")
        k = saved.get("k") if isinstance(saved, dict) else None
        if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= len(ranking.order):
            ranking.selected = k
        return ranking

    @staticmethod
    def _scores_from_json(data: object, path: Path) -> torch.Tensor:
        """The (num_layers, num_heads) scores of a saved ranking, or a ValueError naming ``path``."""

        def refuse(problem: str) -> ValueError:
            return ValueError(f"{path} is not a lofit head ranking: {problem}")

        def integer(value: object, low: int, high: float) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value < high

        if not isinstance(data, dict):
            raise refuse(f"expected a JSON object, found {type(data).__name__}")
        num_layers, num_heads, entries = data.get("num_layers"), data.get("num_heads"), data.get("ranking")
        if not (integer(num_layers, 1, math.inf) and integer(num_heads, 1, math.inf)):
            raise refuse("num_layers and num_heads must be integers >= 1")
        if not isinstance(entries, list) or len(entries) != num_layers * num_heads:
            raise refuse(f"'ranking' must list each of the {num_layers} x {num_heads} heads once")
        scores, seen = torch.zeros(num_layers, num_heads, dtype=torch.float64), set()
        for number, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise refuse(f"ranking entry {number} is not an object")
            layer, head, score = entry.get("layer"), entry.get("head"), entry.get("score")
            if not (integer(layer, 0, num_layers) and integer(head, 0, num_heads)):
                raise refuse(
                    f"ranking entry {number} needs an integer layer below {num_layers} and head below {num_heads}"
                )
            if not finite_number(score):
                raise refuse(f"ranking entry {number} needs a finite number score")
            if (layer, head) in seen:
                raise refuse(f"ranking entry {number} repeats head ({layer}, {head})")
            seen.add((layer, head))
            scores[layer, head] = float(score)
        return scores
