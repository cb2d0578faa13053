"""The two steps of LoFiT: head selection by sparse scaling, then bias tuning on the top heads.

Step 1 (``select_heads``): with v = 0, train only the scales A of *all* heads, from
A ~ N(0, init_std), and rank heads by score[l, h] = || A[l, h] ||_2. Two objectives:

- ``selection="l1"`` (the paper's): minimise  task_loss + lambda * sum |A|  with AdamW.
  The L1 term is meant to keep A near zero for heads the task does not need; under Adam
  its subgradient rarely makes a weight exactly zero, and :class:`Localization` says
  whether the scores ended up concentrated on few heads.
- ``selection="group"``: minimise the task loss with AdamW and, after every optimiser
  step of learning rate eta, apply the proximal operator of the group-lasso penalty
  mu * sum_h ||A_h||_2 (mu = ``group_lambda``) in Adam's metric (:func:`shrink_heads`)::

      A_h <- A_h * max(0, 1 - eta * mu / (d_h * ||A_h||_2)),   d_h = mean_i (sqrt(v_hat[h, i]) + eps)

  where v_hat is Adam's bias-corrected second moment of the gradient. Adam moves A_h by
  about eta * m_h / d_h (m_h its gradient's running mean), so a head keeps a non-zero scale
  only while ||m_h|| > mu: its task gradient, averaged over steps, must exceed mu in norm,
  as at a minimum of  task_loss + mu * sum_h ||A_h||_2. Heads below that return to exactly
  zero. (Proximal gradient in the preconditioner's metric, with the head's mean
  preconditioner standing in for the diagonal one: Yun, Lozano and Yang, NeurIPS 2021.)
  The L1 term's subgradient is lambda per coordinate, lambda * sqrt(head_dim) per head:
  the paper's CLUTRR lambda 5e-3 is 0.04 per head of 64 numbers.

Step 2 (``tune_biases``): reset A to 0, activate the top K heads only, and train their
biases v (from N(0, bias_init_std); 0 by default) on the task loss; with ``tune_scales``
A is trained too. The adapter is then K x head_dim numbers (2x with ``tune_scales``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from lofit.methods.lofit.config import bias_ranking_lr_option
from lofit.methods.lofit.model import LofitModel
from lofit.methods.lofit.ranking import HeadRanking
from lofit.training.loop import TrainingLog, TrainingRun, TrainingSetup, train
from lofit.training.objectives import Objective, Regularized
from lofit.utils.distributed import process_index


def shrink_heads(scale: torch.Tensor, threshold: torch.Tensor | float) -> None:
    """In place, the proximal operator of the group lasso over the heads of ``scale`` (..., head_dim):
    A_h <- A_h * max(0, 1 - threshold_h / ||A_h||_2), ``threshold`` a number or one per head (..., 1)."""
    with torch.no_grad():
        norms = scale.norm(dim=-1, keepdim=True)
        scale.mul_((1 - threshold / norms.clamp_min(torch.finfo(scale.dtype).tiny)).clamp_min(0))


def adam_head_metric(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> torch.Tensor:
    """d_h = mean over the head's coordinates of sqrt(v_hat) + eps, Adam's step divisor, shape (..., 1)."""
    state, group = optimizer.state[parameter], optimizer.param_groups[0]
    step = float(state["step"])
    v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
    return (v_hat.sqrt() + group["eps"]).mean(dim=-1, keepdim=True)


def select_heads(
    model: LofitModel, objective: Objective, progress: bool = True, setup: TrainingSetup | None = None
) -> tuple[HeadRanking, TrainingLog]:
    """Step 1: train A on all heads with the configured sparsity (see the module docstring) and
    rank heads by ||A||_2. The log's ``localization`` holds :class:`Localization`'s figures for
    the configured K, and a warning says so when the result is not localized, or when fewer
    than K heads kept a non-zero scale."""
    config = model.lofit_config
    generator = torch.Generator().manual_seed(config.seed)
    model.set_active_heads(None)
    with torch.no_grad():
        model.lofit_bias.zero_()
        model.lofit_scale.copy_(torch.randn(model.lofit_scale.shape, generator=generator) * config.init_std)
    model.train_only("scale")

    objective_to_train: Objective = objective
    after_step = None
    if config.selection == "l1":
        objective_to_train = Regularized(objective, model.l1_penalty)
    else:

        def after_step(lr: float, optimizer: torch.optim.Optimizer) -> None:
            metric = adam_head_metric(optimizer, model.lofit_scale)
            shrink_heads(model.lofit_scale, lr * config.group_lambda / metric)

    run = TrainingRun(
        parameters=[model.lofit_scale],
        lr=config.scale_lr,
        epochs=config.select_epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        description="step 1: selecting heads",
        progress=progress,
        stage="select",
        lr_name="--scale-lr",
        setup=setup or TrainingSetup(),
        max_grad_norm=config.max_grad_norm,
        after_step=after_step,
    )
    log = train(model, objective_to_train, run)
    model.train_only("none")
    ranking = HeadRanking.from_scores(model.lofit_scale.detach().norm(dim=-1))
    model.head_ranking = ranking.order
    localization = ranking.localization(config.num_heads_to_tune(len(ranking.order)))
    log.localization = localization.to_json()
    if localization.selects and not localization.a_choice:
        message = localization.verdict(config.selection)
        log.warnings.append(message)
        if process_index() == 0:
            warnings.warn(message, stacklevel=2)
    return ranking, log


def _train_biases(
    model: LofitModel,
    objective: Objective,
    heads: list[tuple[int, int]] | None,
    epochs: int,
    description: str,
    stage: str,
    progress: bool,
    setup: TrainingSetup | None,
    with_scales: bool = False,
    lr: tuple[float, str] | None = None,
) -> TrainingLog:
    """Reset A to 0 and v to N(0, bias_init_std), then train v (and A with ``with_scales``) on
    ``heads`` (all heads when None) at the bias learning rate (or ``lr``: a rate and the option
    that set it)."""
    config = model.lofit_config
    rate, rate_name = lr or (config.bias_lr, "--bias-lr")
    model.set_active_heads(heads)
    generator = torch.Generator().manual_seed(config.seed + 1)
    with torch.no_grad():
        model.lofit_scale.zero_()
        model.lofit_bias.copy_(torch.randn(model.lofit_bias.shape, generator=generator) * config.bias_init_std)
        model.lofit_bias.mul_(model.active_heads[..., None])  # heads outside the selection keep v = 0
    model.train_only("both" if with_scales else "bias")
    run = TrainingRun(
        parameters=[model.lofit_bias, model.lofit_scale] if with_scales else [model.lofit_bias],
        lr=rate,
        epochs=epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        description=description,
        progress=progress,
        stage=stage,
        lr_name=rate_name,
        setup=setup or TrainingSetup(),
        first_trained_layer=min(layer for layer, _ in heads) if heads else 0,
        max_grad_norm=config.max_grad_norm,
    )
    log = train(model, objective, run)
    model.train_only("none")
    return log


def select_heads_by_bias(
    model: LofitModel, objective: Objective, progress: bool = True, setup: TrainingSetup | None = None
) -> tuple[HeadRanking, TrainingLog]:
    """The bias-based selection baseline: train v on all heads (A = 0, no L1) for the step-1
    epochs at ``select_bias_lr`` (else the bias learning rate), and rank heads by ||v[l, h]||_2.
    Leaves v at 0."""
    config = model.lofit_config
    rate_option = bias_ranking_lr_option(config.to_dict())
    log = _train_biases(
        model,
        objective,
        None,
        config.select_epochs,
        "selecting heads by bias",
        "select-by-bias",
        progress,
        setup,
        lr=(getattr(config, rate_option), "--" + rate_option.replace("_", "-")),
    )
    ranking = HeadRanking.from_scores(model.lofit_bias.detach().norm(dim=-1))
    with torch.no_grad():
        model.lofit_bias.zero_()
    return ranking, log


def tune_biases(
    model: LofitModel,
    objective: Objective,
    heads: Sequence[tuple[int, int]],
    progress: bool = True,
    setup: TrainingSetup | None = None,
) -> TrainingLog:
    """Step 2: reset A to 0 and train the biases v of ``heads`` (and their A with ``tune_scales``)."""
    heads = [(int(layer), int(head)) for layer, head in heads]
    config = model.lofit_config
    log = _train_biases(
        model,
        objective,
        heads,
        config.tune_epochs,
        "step 2: tuning biases",
        "tune",
        progress,
        setup,
        with_scales=config.tune_scales,
    )
    model.head_ranking = heads
    return log
