"""Training objectives: SFT on completions, and DPO on preference pairs.

An objective owns its training items and knows how to batch them and score a batch, so
both LoFiT steps (and any other method) train on any of them through one loop.

SFT: the mean negative log-likelihood of the completion tokens.

DPO (Rafailov et al., 2023), with pi the policy (the model with its adapter) and ref the
frozen model (the same model with the adapter disabled), for a prompt x with chosen y_w
and rejected y_l::

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

The reference log-probabilities are computed once, before training, by the same model
with its adapter disabled; no second copy of the model is loaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lofit.data.batching import Batch, TokenizedPair, collate, tokenize_pair
from lofit.data.examples import PromptCompletion, PromptPreference
from lofit.evaluation.scoring import completion_token_logprobs, sequence_logprobs
from lofit.utils.distributed import gather_in_order, my_share


class Objective(ABC):
    """Training items plus how to batch and score them.

    The loss of a batch is ``loss_sum(batch) / batch.weight`` (plus ``regularizer()``):
    a sum of per-term losses over the number of terms, so that a batch split across
    processes or micro-batches can be normalised by the whole batch's weight.
    """

    items: Sequence[Any]
    pad_id: int

    @abstractmethod
    def collate(self, items: Sequence[Any]) -> Any:
        """A batch of ``items``, with ``to(device)`` and ``weight`` (its number of loss terms)."""

    @abstractmethod
    def loss_sum(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The sum of the per-term losses of ``model`` on ``batch`` (a scalar)."""

    def regularizer(self) -> torch.Tensor | None:
        """A term added once per optimiser step, independent of the data (None: none)."""
        return None

    def item_length(self, item: Any) -> int:
        """Tokens of the longest sequence ``item`` puts in a batch (for length-grouped batches)."""
        return 0

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss of ``model`` on ``batch``, regulariser included."""
        loss = self.loss_sum(model, batch) / batch.weight
        regularizer = self.regularizer()
        return loss if regularizer is None else loss + regularizer


class Regularized(Objective):
    """``objective`` plus ``term()`` once per step (e.g. LoFiT's lambda * sum|A| in step 1)."""

    def __init__(self, objective: Objective, term: Callable[[], torch.Tensor]):
        self.objective, self.term = objective, term
        self.items, self.pad_id = objective.items, objective.pad_id

    def collate(self, items: Sequence[Any]) -> Any:
        return self.objective.collate(items)

    def loss_sum(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.objective.loss_sum(model, batch)

    def regularizer(self) -> torch.Tensor:
        return self.term()

    def item_length(self, item: Any) -> int:
        return self.objective.item_length(item)


@dataclass
class SFT(Objective):
    """Supervised fine-tuning on prompt/completion pairs, loss on completion tokens only."""

    items: Sequence[TokenizedPair]
    pad_id: int

    def collate(self, items: Sequence[TokenizedPair]) -> Batch:
        return collate(list(items), self.pad_id)

    def item_length(self, item: TokenizedPair) -> int:
        return len(item.prompt_ids) + len(item.completion_ids)

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Summed negative log-likelihood of the completion tokens."""
        return -completion_token_logprobs(model, batch).sum()


@dataclass(frozen=True)
class PreferenceItem:
    """One preference pair with its reference log-probabilities."""

    chosen: TokenizedPair
    rejected: TokenizedPair
    reference_chosen: float
    reference_rejected: float


@dataclass
class PreferenceBatch:
    """Chosen rows then rejected rows in one padded batch, and their reference log-probs (2B,)."""

    sequences: Batch
    reference: torch.Tensor

    @property
    def weight(self) -> int:
        """Loss terms in the batch: its preference pairs."""
        return int(self.reference.numel()) // 2

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(self.sequences.to(device), self.reference.to(device))


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) of each pair."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -nn.functional.logsigmoid(beta * margin)


@dataclass
class DPO(Objective):
    """Direct preference optimisation against the frozen model."""

    items: Sequence[PreferenceItem]
    pad_id: int
    beta: float = 0.5

    @classmethod
    def with_reference(
        cls,
        model: nn.Module,
        pairs: Sequence[tuple[TokenizedPair, TokenizedPair]],
        pad_id: int,
        beta: float = 0.5,
        batch_size: int = 16,
    ) -> DPO:
        """Score every chosen and rejected completion once with the adapter disabled."""
        if beta <= 0:
            raise ValueError(f"DPO beta must be positive; got {beta}")
        sequences = [pair for chosen_rejected in pairs for pair in chosen_rejected]
        device = model.get_input_embeddings().weight.device
        share = my_share(len(sequences))  # each process scores its share; the scores are gathered back in order
        scores: list[float] = []
        with torch.no_grad(), model.disable_adapter():
            for start in range(0, len(share), batch_size):
                batch = collate([sequences[i] for i in share[start : start + batch_size]], pad_id).to(device)
                scores += sequence_logprobs(model, batch).cpu().tolist()
        reference = torch.tensor(gather_in_order(scores, len(sequences))).view(-1, 2).tolist() if sequences else []
        items = [PreferenceItem(c, r, ref_c, ref_r) for (c, r), (ref_c, ref_r) in zip(pairs, reference)]
        return cls(items, pad_id, beta)

    def collate(self, items: Sequence[PreferenceItem]) -> PreferenceBatch:
        sequences = collate([i.chosen for i in items] + [i.rejected for i in items], self.pad_id)
        reference = torch.tensor([i.reference_chosen for i in items] + [i.reference_rejected for i in items])
        return PreferenceBatch(sequences, reference)

    def item_length(self, item: PreferenceItem) -> int:
        return max(len(p.prompt_ids) + len(p.completion_ids) for p in (item.chosen, item.rejected))

    def loss_sum(self, model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        """Summed DPO loss of the batch's pairs."""
        policy = sequence_logprobs(model, batch.sequences)
        half = policy.shape[0] // 2
        return dpo_losses(policy[:half], policy[half:], batch.reference[:half], batch.reference[half:], self.beta).sum()


def build_objective(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Any], beta: float = 0.5
) -> Objective:
    """SFT for prompt/completion examples, DPO (reference = ``model`` with its adapter disabled) for preferences."""
    pad_id = tokenizer.pad_token_id
    if examples and all(isinstance(e, PromptCompletion) for e in examples):
        return SFT([tokenize_pair(tokenizer, e.prompt, e.completion) for e in examples], pad_id)
    if examples and all(isinstance(e, PromptPreference) for e in examples):
        pairs = [
            (tokenize_pair(tokenizer, e.prompt, e.chosen), tokenize_pair(tokenizer, e.prompt, e.rejected))
            for e in examples
        ]
        return DPO.with_reference(model, pairs, pad_id, beta)
    raise ValueError("training examples must be all prompt/completion pairs or all preference pairs")
