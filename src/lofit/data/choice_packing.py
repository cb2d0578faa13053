"""Several questions and all their choices in one sequence: multiple-choice scoring without padding.

A question with prompt tokens p_1..p_L and choices c^1..c^n is laid out as its prompt
followed by the trie of its choices (choices that begin alike share those tokens), and
several questions follow each other in one row until a token budget is reached. A 4-D
attention mask and explicit position ids make each token see exactly what it would see in
its own unpadded sequence ``prefix + prompt + choice``:

- a token of question g attends to the cached shared prefix, to g's prompt tokens up to
  itself, and to its ancestors in g's trie (itself included);
- the prompt's tokens sit at positions P .. P+L-1 (P the prefix's length) and a trie node at
  depth d at P+L+d.

log p(c^i_1 | prompt) is read at the prompt's last token (one logit row for all n choices)
and log p(c^i_j | ..., c^i_<j) at the trie node of c^i_<j; a choice's score sums its path.
A question costs L + (trie nodes) positions of the model, against L + n * max_i m_i padded
positions when its choices run as a batch after the prompt. Whether a model honours a
custom mask and position ids is an empirical matter (ALiBi families build their bias from a
2-D mask, for instance): :func:`lofit.evaluation.multiple_choice.choice_logprobs` checks the first two
questions against the unpacked computation before using this path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

Question = tuple[list[int], list[list[int]]]
"""A question's prompt token ids and its choices' token ids."""


def question_length(question: Question) -> int:
    """Tokens a question takes in a row: its prompt and its choices' distinct beginnings."""
    prompt, choices = question
    return len(prompt) + len({tuple(choice[: depth + 1]) for choice in choices for depth in range(len(choice))})


def pack_questions(questions: Sequence[Question], budget: int) -> list[list[int]]:
    """Consecutive runs of question indices whose packed lengths sum to at most ``budget``
    tokens (a longer question gets a row of its own)."""
    groups: list[list[int]] = []
    used = budget
    for index, question in enumerate(questions):
        length = question_length(question)
        if used + length > budget:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return groups


@dataclass(kw_only=True)
class PackedRow:
    """One packed row: model inputs plus where each choice's token log-probabilities are read.

    Attributes:
        visible: bool (T, T); token t may attend to token s of the row (prefix keys come on top).
        score_mask: bool (1, T), on the CPU; the positions whose logits are computed.
        logit_rows: for every choice token of the row, its row among the computed logits.
        targets: that token's id.
        paths: (pair, token) index pairs: the pair's choice contains the token (a token shared
            by several choices, as their common beginning, counts for each of them).
        pairs: the row's (question, choice) pairs in order.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    visible: torch.Tensor
    score_mask: torch.Tensor
    logit_rows: torch.Tensor
    targets: torch.Tensor
    paths: torch.Tensor
    pairs: list[tuple[int, int]]


def packed_row(questions: Sequence[Question], past_length: int) -> PackedRow:
    """Lay out ``questions`` (each with at least one choice of at least one token) as one row.

    A question's choices form a trie: choices that begin with the same tokens share those
    tokens (exact for a causal model, whose log p(token | everything before) does not depend
    on what follows), which saves a fifth of TruthfulQA's choice tokens. Each token attends
    to its question's prompt and its ancestors in the trie and sits at position P + L + depth.
    """
    ids: list[int] = []
    positions: list[int] = []
    parents: list[int] = []  # the token each token follows: its trie parent, else the prompt's last token
    ancestors: list[list[int]] = []  # what each token sees in the row, itself included
    choice_tokens: list[int] = []  # row position of each choice token, in the order of ``targets``
    paths: list[tuple[int, int]] = []  # (pair, index into choice_tokens)
    pairs: list[tuple[int, int]] = []
    for g, (prompt, choices) in enumerate(questions):
        base = len(ids)
        for offset, token in enumerate(prompt):
            ids.append(token)
            positions.append(past_length + offset)
            parents.append(-1)
            ancestors.append(list(range(base, base + offset + 1)))
        nodes: dict[tuple[int, ...], int] = {}  # a choice beginning -> its index into choice_tokens
        for i, choice in enumerate(choices):
            pairs.append((g, i))
            parent = base + len(prompt) - 1
            for depth in range(len(choice)):
                key = tuple(choice[: depth + 1])
                if key not in nodes:
                    nodes[key] = len(choice_tokens)
                    choice_tokens.append(len(ids))
                    ids.append(choice[depth])
                    positions.append(past_length + len(prompt) + depth)
                    parents.append(parent)
                    ancestors.append(ancestors[parent] + [len(ids) - 1])
                paths.append((len(pairs) - 1, nodes[key]))
                parent = choice_tokens[nodes[key]]
    visible = torch.zeros((len(ids), len(ids)), dtype=torch.bool)
    rows = torch.tensor([t for t, seen in enumerate(ancestors) for _ in seen])
    visible[rows, torch.tensor([s for seen in ancestors for s in seen])] = True
    predicted_from = torch.tensor([parents[t] for t in choice_tokens])
    score_mask = torch.zeros((1, len(ids)), dtype=torch.bool)
    score_mask[0, predicted_from] = True
    logit_row = torch.cumsum(score_mask[0], 0) - 1  # row of a scored position among the computed logits
    return PackedRow(
        input_ids=torch.tensor([ids]),
        positions=torch.tensor([positions]),
        visible=visible,
        score_mask=score_mask,
        logit_rows=logit_row[predicted_from],
        targets=torch.tensor([ids[t] for t in choice_tokens]),
        paths=torch.tensor(paths),
        pairs=pairs,
    )


PACKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take a 4-D mask as given (flash kernels take none, flex
attention a block mask)."""


def attention_implementation(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def attention_mask(visible: torch.Tensor, past_length: int, model: nn.Module, device: torch.device) -> torch.Tensor:
    """The (1, 1, T, past + T) mask in the form the model's attention expects: boolean (True
    attends) for SDPA, additive (0 or the dtype's minimum) for eager."""
    allowed = torch.cat([torch.ones((visible.shape[0], past_length), dtype=torch.bool), visible], dim=1)[None, None].to(
        device
    )
    if attention_implementation(model) != "eager":
        return allowed
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def score_packed(
    model: nn.Module, questions: Sequence[Question], past, past_length: int, device: torch.device
) -> list[list[float]]:
    """Summed log-probability of every choice of ``questions``, in one forward pass of one
    packed row after the cached prefix ``past`` (which the pass extends: give a copy).

    The inputs go to ``device`` (the embedding's); the mask of scored positions stays on the
    CPU, so that it indexes the final hidden states on whichever device they end (the last
    GPU of a device map), and the scores are read on the logits' device.
    """
    row = packed_row(questions, past_length)
    out = model(
        input_ids=row.input_ids.to(device),
        position_ids=row.positions.to(device),
        attention_mask=attention_mask(row.visible, past_length, model, device),
        cache=past,
        use_cache=past is not None,
        logits_to_keep=row.score_mask,
    )
    scored = int(row.score_mask.sum())
    if out.logits.ndim != 2 or out.logits.shape[0] != scored:
        raise ValueError(
            f"{type(model).__name__} returned logits of shape {tuple(out.logits.shape)} for a boolean "
            f"logits_to_keep mask of {scored} positions; expected ({scored}, vocabulary)"
        )
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # (scored positions, V)
    at = logprobs.device
    token_logprobs = logprobs[row.logit_rows.to(at), row.targets.to(at)]
    pair, token = row.paths.to(at).unbind(1)
    totals = torch.zeros(len(row.pairs), dtype=token_logprobs.dtype, device=at)
    totals = totals.index_add(0, pair, token_logprobs[token])
    scores: list[list[float]] = [[] for _ in questions]
    for (g, _), total in zip(row.pairs, totals.tolist()):
        scores[g].append(total)
    return scores
