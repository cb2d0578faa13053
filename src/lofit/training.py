"""A small, seeded training loop: AdamW, linear decay, mini-batches, progress bars."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .objectives import Objective


@dataclass
class TrainingRun:
    """What the loop needs to know besides the model and the data."""

    parameters: list[nn.Parameter]
    lr: float
    epochs: int
    batch_size: int
    seed: int
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    description: str = "training"
    progress: bool = True


@dataclass
class TrainingLog:
    """Mean loss of each epoch and wall time."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0


def train(model: nn.Module, objective: Objective, run: TrainingRun) -> TrainingLog:
    """Minimise ``objective.loss`` over ``objective.items`` by AdamW on ``run.parameters`` only.

    Each epoch visits the items in an order drawn from ``random.Random(run.seed)``; the
    learning rate decays linearly to 0 over all steps (after an optional warm-up).
    """
    items = objective.items
    if not items:
        raise ValueError("no training examples")
    order_rng = random.Random(run.seed)
    steps_per_epoch = math.ceil(len(items) / run.batch_size)
    total_steps = steps_per_epoch * run.epochs
    optimizer = torch.optim.AdamW(run.parameters, lr=run.lr, weight_decay=run.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(run.warmup_ratio * total_steps), total_steps)
    device = next(iter(run.parameters)).device
    log = TrainingLog()
    # The model stays in eval mode: only A or v train, and the frozen model's dropout must
    # not perturb the policy (DPO's reference log-probabilities are computed without it).
    model.eval()
    with tqdm(total=total_steps, desc=run.description, disable=not run.progress, dynamic_ncols=True) as bar:
        for _ in range(run.epochs):
            order = list(range(len(items)))
            order_rng.shuffle(order)
            losses = []
            for start in range(0, len(order), run.batch_size):
                batch = objective.collate([items[i] for i in order[start : start + run.batch_size]]).to(device)
                loss = objective.loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                log.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            log.epoch_losses.append(sum(losses) / len(losses))
    return log
