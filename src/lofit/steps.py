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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .model import LofitModel
from .objectives import Objective
from .training import TrainingLog, TrainingRun, train


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
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HeadRanking":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no head ranking at {path}")
        try:
            data = json.loads(path.read_text())
            scores = torch.zeros(data["num_layers"], data["num_heads"])
            for entry in data["ranking"]:
                scores[entry["layer"], entry["head"]] = entry["score"]
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a lofit head ranking ({error!r})") from None
        return cls.from_scores(scores)


class _WithL1(Objective):
    """The task objective plus lambda * sum|A| (the sparsity term of step 1)."""

    def __init__(self, objective: Objective, model: LofitModel):
        self.objective, self.model = objective, model
        self.items, self.pad_id = objective.items, objective.pad_id

    def collate(self, items):
        return self.objective.collate(items)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return self.objective.loss(model, batch) + self.model.l1_penalty()


def select_heads(model: LofitModel, objective: Objective, progress: bool = True) -> tuple[HeadRanking, TrainingLog]:
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
        config.weight_decay, config.warmup_ratio, "step 1: selecting heads", progress,
    )
    log = train(model, _WithL1(objective, model), run)
    model.train_only("none")
    ranking = HeadRanking.from_scores(model.lofit_scale.detach().norm(dim=-1))
    model.head_ranking = ranking.order
    return ranking, log


def _train_biases(model: LofitModel, objective: Objective, heads: list[tuple[int, int]] | None, epochs: int,
                  description: str, progress: bool) -> TrainingLog:
    """Reset A and v to 0 and train only v on ``heads`` (all heads when None)."""
    config = model.lofit_config
    torch.manual_seed(config.seed)
    model.set_active_heads(heads)
    with torch.no_grad():
        model.lofit_scale.zero_()
        model.lofit_bias.zero_()
    model.train_only("bias")
    run = TrainingRun(
        [model.lofit_bias], config.bias_lr, epochs, config.batch_size, config.seed,
        config.weight_decay, config.warmup_ratio, description, progress,
    )
    log = train(model, objective, run)
    model.train_only("none")
    return log


def select_heads_by_bias(model: LofitModel, objective: Objective, progress: bool = True) -> tuple[HeadRanking, TrainingLog]:
    """The bias-based selection baseline: train v on all heads (A = 0, no L1) for the step-1
    epochs at the bias learning rate, and rank heads by ||v[l, h]||_2. Leaves v at 0."""
    log = _train_biases(model, objective, None, model.lofit_config.select_epochs, "selecting heads by bias", progress)
    ranking = HeadRanking.from_scores(model.lofit_bias.detach().norm(dim=-1))
    with torch.no_grad():
        model.lofit_bias.zero_()
    return ranking, log


def tune_biases(model: LofitModel, objective: Objective, heads: Sequence[tuple[int, int]], progress: bool = True) -> TrainingLog:
    """Step 2: reset A to 0 and train only the biases v of ``heads``."""
    heads = [(int(layer), int(head)) for layer, head in heads]
    log = _train_biases(model, objective, heads, model.lofit_config.tune_epochs, "step 2: tuning biases", progress)
    model.head_ranking = heads
    return log
