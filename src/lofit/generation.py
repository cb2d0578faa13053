"""Batched greedy generation with left padding and a KV cache."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .batching import left_pad


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy continuation of each prompt (new text only, special tokens dropped).

    Prompts are batched by length to limit padding; the output keeps the input order.
    """
    encoded = [tokenizer(p).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    device = model.get_input_embeddings().weight.device
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress, dynamic_ncols=True):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = left_pad([encoded[i] for i in rows], tokenizer.pad_token_id)
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
        for row, text in zip(rows, texts):
            outputs[row] = text
    return outputs
