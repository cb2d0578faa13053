"""The two steps of LoFiT: head selection by sparse scaling, then bias tuning on the top heads.

Step 1 (``select_heads``): with v = 0, train only the scales A of *all* heads, from
A ~ N(0, init_std), on  task_loss + lambda * sum |A|.  The L1 term keeps A at zero for
heads the task does not need, so a head's importance is its scale's norm
score[l, h] = || A[l, h] ||_2, and the ranking sorts heads by it.

Step 2 (``tune_biases``): reset A to 0, activate the top K heads only, and train their
biases v (from 0) on the task loss. The adapter is then K x head_dim numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .atomic import write_json
from .datafiles import finite_number
from .model import LofitModel
from .objectives import Objective, Regularized
from .training import TrainingLog, TrainingRun, TrainingSetup, train


@dataclass
class HeadRanking:
    """Heads sorted by importance score, best first.

    Attributes:
        scores: (num_layers, num_heads) tensor, ||A[l, h]||_2 after step 1.
        order: every (layer, head) pair sorted by descending score (ties by index).
    """

    scores: torch.Tensor
    order: list[tuple[int, int]]

    @classmethod
    def from_scores(cls, scores: torch.Tensor) -> "HeadRanking":
        num_heads = scores.shape[1]
        flat = scores.flatten()
        # stable sort on the negated scores: equal scores keep index order
        ranked = torch.sort(-flat, stable=True).indices.tolist()
        return cls(scores.detach().cpu().float(), [(i // num_heads, i % num_heads) for i in ranked])

    def top(self, k: int) -> list[tuple[int, int]]:
        if not 1 <= k <= len(self.order):
            raise ValueError(f"cannot take the top {k} heads: there are {len(self.order)} heads")
        return self.order[:k]

    def to_json(self) -> dict:
        return {
            "num_layers": self.scores.shape[0],
            "num_heads": self.scores.shape[1],
            "ranking": [
                {"rank": rank, "layer": layer, "head": head, "score": float(self.scores[layer, head])}
                for rank, (layer, head) in enumerate(self.order)
            ],
        }

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        write_json(path, self.to_json(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "HeadRanking":
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
        return cls.from_scores(cls._scores_from_json(data, path))

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
                raise refuse(f"ranking entry {number} needs an integer layer below {num_layers} and head below {num_heads}")
            if not finite_number(score):
                raise refuse(f"ranking entry {number} needs a finite number score")
            if (layer, head) in seen:
                raise refuse(f"ranking entry {number} repeats head ({layer}, {head})")
            seen.add((layer, head))
            scores[layer, head] = float(score)
        return scores


def select_heads(model: LofitModel, objective: Objective, progress: bool = True,
                 setup: TrainingSetup | None = None) -> tuple[HeadRanking, TrainingLog]:
    """Step 1: train A on all heads with the task loss + L1 and rank heads by ||A||_2."""
    config = model.lofit_config
    generator = torch.Generator().manual_seed(config.seed)
    model.set_active_heads(None)
    with torch.no_grad():
        model.lofit_bias.zero_()
        model.lofit_scale.copy_(torch.randn(model.lofit_scale.shape, generator=generator) * config.init_std)
    model.train_only("scale")

    run = TrainingRun(
        [model.lofit_scale], config.scale_lr, config.select_epochs, config.batch_size, config.seed,
        config.weight_decay, config.warmup_ratio, "step 1: selecting heads", progress, "select", "--scale-lr",
        setup or TrainingSetup(),
    )
    log = train(model, Regularized(objective, model.l1_penalty), run)
    model.train_only("none")
    ranking = HeadRanking.from_scores(model.lofit_scale.detach().norm(dim=-1))
    model.head_ranking = ranking.order
    return ranking, log


def _train_biases(model: LofitModel, objective: Objective, heads: list[tuple[int, int]] | None, epochs: int,
                  description: str, stage: str, progress: bool, setup: TrainingSetup | None) -> TrainingLog:
    """Reset A and v to 0 and train only v on ``heads`` (all heads when None)."""
    config = model.lofit_config
    model.set_active_heads(heads)
    with torch.no_grad():
        model.lofit_scale.zero_()
        model.lofit_bias.zero_()
    model.train_only("bias")
    run = TrainingRun(
        [model.lofit_bias], config.bias_lr, epochs, config.batch_size, config.seed,
        config.weight_decay, config.warmup_ratio, description, progress, stage, "--bias-lr", setup or TrainingSetup(),
        first_trained_layer=min(layer for layer, _ in heads) if heads else 0,
    )
    log = train(model, objective, run)
    model.train_only("none")
    return log


def select_heads_by_bias(model: LofitModel, objective: Objective, progress: bool = True,
                         setup: TrainingSetup | None = None) -> tuple[HeadRanking, TrainingLog]:
    """The bias-based selection baseline: train v on all heads (A = 0, no L1) for the step-1
    epochs at the bias learning rate, and rank heads by ||v[l, h]||_2. Leaves v at 0."""
    log = _train_biases(model, objective, None, model.lofit_config.select_epochs, "selecting heads by bias", "select-by-bias",
                        progress, setup)
    ranking = HeadRanking.from_scores(model.lofit_bias.detach().norm(dim=-1))
    with torch.no_grad():
        model.lofit_bias.zero_()
    return ranking, log


def tune_biases(model: LofitModel, objective: Objective, heads: Sequence[tuple[int, int]], progress: bool = True,
                setup: TrainingSetup | None = None) -> TrainingLog:
    """Step 2: reset A to 0 and train only the biases v of ``heads``."""
    heads = [(int(layer), int(head)) for layer, head in heads]
    log = _train_biases(model, objective, heads, model.lofit_config.tune_epochs, "step 2: tuning biases", "tune", progress, setup)
    model.head_ranking = heads
    return log
