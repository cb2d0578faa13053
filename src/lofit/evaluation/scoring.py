"""Log-probabilities of completion tokens, computing the vocabulary projection only where needed.

The LM head maps each hidden state to |V| logits; for a 49k-token vocabulary that is a
large share of a small model's compute. Only positions whose next token is a completion
token carry loss, so we ask the model for logits at exactly those positions
(``logits_to_keep`` with a boolean (B, T) mask), which is also how the model applies its
own final logit processing (e.g. Gemma's soft-capping).

The mask stays on the CPU (see :class:`~lofit.data.batching.Batch`) so that it indexes the final
hidden states wherever they are: on the last GPU of a model spread by a device map. The
log-probabilities are computed on the logits' device and returned on the inputs' device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lofit.data.batching import Batch


def completion_token_logprobs(model: nn.Module, batch: Batch, cache: Any = None) -> torch.Tensor:
    """log p(target_i | prefix) for every completion token of the batch, shape (N,).

    With ``cache`` (the KV cache of a shared prefix), ``batch.attention_mask`` must cover
    the prefix and the batch's own tokens.
    """
    cached = {"cache": cache, "use_cache": True} if cache is not None else {"use_cache": False}
    outputs = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=batch.score_mask, **cached
    )
    logits = outputs.logits.float()  # (N, V): one row per scored position, on the final hidden states' device
    logprobs = -nn.functional.cross_entropy(logits, batch.targets.to(logits.device), reduction="none")
    return logprobs.to(batch.input_ids.device)


def sft_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood over the completion tokens of the batch."""
    return -completion_token_logprobs(model, batch).mean()


def sequence_logprobs(model: nn.Module, batch: Batch, cache: Any = None) -> torch.Tensor:
    """Summed log-probability of each sequence's completion, shape (B,)."""
    token_logprobs = completion_token_logprobs(model, batch, cache)
    totals = torch.zeros(batch.input_ids.shape[0], dtype=token_logprobs.dtype, device=token_logprobs.device)
    return totals.index_add(0, batch.rows.to(token_logprobs.device), token_logprobs)
