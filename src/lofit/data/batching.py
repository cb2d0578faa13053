"""Turning (prompt, completion) text pairs into padded token batches with answer-only targets.

Labels are built from lengths, not by searching for a response template: the prompt and
the completion are tokenised separately and concatenated, so the completion's tokens are
exactly those a model generating after the prompt would produce; the completion is
followed by the tokenizer's EOS token. Position t carries loss when token t + 1 belongs
to the completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenizedPair:
    """A prompt and its completion as token ids (the completion ends with EOS)."""

    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass(kw_only=True)
class Batch:
    """Right-padded sequences and the positions whose next token is scored.

    Attributes:
        input_ids, attention_mask: (B, T), the model's inputs.
        score_mask: bool (B, T); True at t when token t + 1 is a completion token.
        targets: the completion tokens, in the row-major order of ``score_mask``'s Trues.
        rows: for each target, the index of its sequence in the batch.

    :meth:`to` moves the model's inputs only; ``score_mask``, ``targets`` and ``rows`` stay on
    the CPU. The model selects the scored positions of its final hidden states with
    ``score_mask``, and those sit on the last device of a model spread over several: PyTorch
    accepts a CPU index for a tensor on any device, but not one on another accelerator.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    score_mask: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor

    @property
    def weight(self) -> int:
        """Loss terms in the batch: its completion tokens."""
        return int(self.targets.numel())

    def to(self, device: torch.device | str) -> Batch:
        """This batch with its model inputs on ``device`` (the index tensors stay where they are)."""
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            score_mask=self.score_mask,
            targets=self.targets,
            rows=self.rows,
        )


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, add_eos: bool = True
) -> TokenizedPair:
    """Token ids of ``prompt`` (with the tokenizer's special prefix, if any) and of ``completion``
    (followed by EOS when ``add_eos``: training targets end there; scored choices do not)."""
    prompt_ids = tokenizer(prompt).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    return TokenizedPair(prompt_ids, completion_ids + [tokenizer.eos_token_id] if add_eos else completion_ids)


def collate(pairs: list[TokenizedPair], pad_id: int) -> Batch:
    """Right-pad ``pairs`` into a :class:`Batch`."""
    if any(not p.prompt_ids or not p.completion_ids for p in pairs):
        raise ValueError("every example needs at least one prompt token and one completion token")
    lengths = [len(p.prompt_ids) + len(p.completion_ids) for p in pairs]
    width = max(lengths)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    score_mask = torch.zeros((len(pairs), width), dtype=torch.bool)
    for row, (pair, length) in enumerate(zip(pairs, lengths)):
        input_ids[row, :length] = torch.tensor(pair.prompt_ids + pair.completion_ids)
        attention_mask[row, :length] = 1
        score_mask[row, len(pair.prompt_ids) - 1 : length - 1] = True
    next_tokens = torch.roll(input_ids, shifts=-1, dims=1)
    rows = torch.arange(len(pairs))[:, None].expand_as(score_mask)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        score_mask=score_mask,
        targets=next_tokens[score_mask],
        rows=rows[score_mask],
    )


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists for generation: (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, width - len(sequence) :] = 1
    return input_ids, attention_mask
