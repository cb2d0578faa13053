"""Ways to choose the heads whose biases LoFiT tunes: ``--heads NAME``.

Each selector returns a :class:`~lofit.methods.lofit.ranking.HeadRanking` (a score per head, best
first) and the log of the training it took; step 2 tunes the top K of it. Each registers
itself under its name in :data:`~lofit.methods.lofit.config.SELECTORS` with
:func:`register_selector`. The paper's ablations compare LoFiT's own selection with:

- ``lofit``: ||A[l, h]||_2 after training scales with an L1 penalty (step 1);
- ``random``: scores drawn uniformly with the seed;
- ``probe-layers``: all heads of the layers whose residual stream a linear probe separates
  best (positive vs negative texts); heads of one layer keep index order;
- ``bias-based``: ||v[l, h]||_2 after training biases (not scales) on all heads;
- ``iti``: ITI's ranking, the validation accuracy of a linear probe on each head's output;
- ``file``: a ``head_ranking.json`` from an earlier run, of any task (the cross-task
  experiment), checked against the model's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from lofit.methods.lofit.config import SELECTORS
from lofit.methods.lofit.model import LofitModel
from lofit.methods.lofit.ranking import HeadRanking
from lofit.methods.lofit.steps import select_heads, select_heads_by_bias
from lofit.methods.probing import Activations, collect_activations, contrast_pairs, fit_probes
from lofit.training.loop import TrainingLog, TrainingSetup
from lofit.training.objectives import Objective


def random_ranking(shape: tuple[int, int], seed: int) -> HeadRanking:
    return HeadRanking.from_scores(torch.rand(shape, generator=torch.Generator().manual_seed(seed)))


def _base_activations(
    model: LofitModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence, seed: int, progress: bool
) -> Activations:
    with model.disable_adapter():
        return collect_activations(
            model.base_model, contrast_pairs(tokenizer, examples, seed), tokenizer.pad_token_id, progress=progress
        )


def probe_layer_ranking(
    model: LofitModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence, seed: int, progress: bool = True
) -> HeadRanking:
    """Every head scored by its layer's residual-stream probe accuracy."""
    activations = _base_activations(model, tokenizer, examples, seed, progress)
    layer_scores = fit_probes(activations.residual, activations.labels, activations.groups, seed=seed).ranking_key()
    return HeadRanking.from_scores(layer_scores[:, None].expand(-1, model.layout.num_heads).clone())


def iti_ranking(
    model: LofitModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence, seed: int, progress: bool = True
) -> HeadRanking:
    """Every head scored by the validation accuracy of a linear probe on its output (ITI)."""
    return head_probe_ranking(_base_activations(model, tokenizer, examples, seed, progress), seed)


def head_probe_ranking(activations: Activations, seed: int) -> HeadRanking:
    """ITI's ranking: held-out accuracy of a probe on each head's output (ties: lower held-out loss)."""
    num_layers, num_heads = activations.heads.shape[1:3]
    scores = fit_probes(
        activations.heads.flatten(1, 2), activations.labels, activations.groups, seed=seed
    ).ranking_key()
    return HeadRanking.from_scores(scores.view(num_layers, num_heads))


def ranking_from_file(path: str | Path | None, model: LofitModel) -> HeadRanking:
    if path is None:
        raise ValueError("--heads file needs --heads-file PATH (a head_ranking.json from an earlier run)")
    ranking = HeadRanking.load(path)
    if tuple(ranking.scores.shape) != model.layout.shape[:2]:
        raise ValueError(
            f"{path} ranks {tuple(ranking.scores.shape)} layers x heads, but this model has "
            f"{model.layout.shape[:2]}: it was made for another model"
        )
    return ranking


Selector = Callable[
    [LofitModel, PreTrainedTokenizerBase, Sequence, Objective, "str | Path | None", bool, "TrainingSetup | None"],
    tuple[HeadRanking, TrainingLog],
]
"""A selector's arguments: the model, tokenizer, training examples, objective, ``--heads-file``,
whether to show progress, and the training setup."""


def register_selector(name: str) -> Callable[[Selector], Selector]:
    """Register the decorated function as the head selector ``--heads name``."""

    def register(function: Selector) -> Selector:
        SELECTORS[name] = function
        return function

    return register


@register_selector("lofit")
def _lofit(model, tokenizer, examples, objective, heads_file, progress, setup):
    """Step 1: ||A[l, h]||_2 after training scales with an L1 (or group) penalty."""
    return select_heads(model, objective, progress, setup)


@register_selector("random")
def _random(model, tokenizer, examples, objective, heads_file, progress, setup):
    """Scores drawn uniformly with the seed."""
    return random_ranking(model.layout.shape[:2], model.lofit_config.seed), TrainingLog()


@register_selector("probe-layers")
def _probe_layers(model, tokenizer, examples, objective, heads_file, progress, setup):
    """All heads of the layers a residual-stream probe separates best."""
    return probe_layer_ranking(model, tokenizer, examples, model.lofit_config.seed, progress), TrainingLog()


@register_selector("bias-based")
def _bias_based(model, tokenizer, examples, objective, heads_file, progress, setup):
    """||v[l, h]||_2 after training biases on all heads."""
    return select_heads_by_bias(model, objective, progress, setup)


@register_selector("iti")
def _iti(model, tokenizer, examples, objective, heads_file, progress, setup):
    """ITI's ranking: a linear probe's validation accuracy on each head's output."""
    return iti_ranking(model, tokenizer, examples, model.lofit_config.seed, progress), TrainingLog()


@register_selector("file")
def _file(model, tokenizer, examples, objective, heads_file, progress, setup):
    """A head_ranking.json from an earlier run (--heads-file)."""
    return ranking_from_file(heads_file, model), TrainingLog()


def rank_heads(
    selector: str,
    model: LofitModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence,
    objective: Objective,
    heads_file: str | Path | None = None,
    progress: bool = True,
    setup: TrainingSetup | None = None,
) -> tuple[HeadRanking, TrainingLog]:
    """The ranking of ``selector`` (one of :data:`SELECTORS`) for ``model`` on the training data,
    and the log of the training it took (empty for selectors that do not train)."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown head selector {selector!r}; choose one of: {', '.join(SELECTORS)}")
    ranking, log = SELECTORS[selector](model, tokenizer, examples, objective, heads_file, progress, setup)
    model.head_ranking = ranking.order
    return ranking, log
