"""Batched greedy generation with left padding and a KV cache."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from lofit.data.batching import left_pad
from lofit.utils.distributed import gather_in_order, is_main_process, my_share

ANSWER_LINE = re.compile(r"\S[^\n]*\n")


class AnswerLineEnd(StoppingCriteria):
    """Stops a row once its new text holds a line break after some non-blank text: the
    answer's first line is complete, and nothing after it is read."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([bool(ANSWER_LINE.search(text)) for text in texts], device=input_ids.device)


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
    stop_at_line_end: bool = False,
) -> list[str]:
    """Greedy continuation of each prompt (new text only, special tokens dropped).

    With ``stop_at_line_end`` each row stops at the end of its first non-blank line (see
    :class:`AnswerLineEnd`) rather than after ``max_new_tokens``.

    Prompts are batched by length to limit padding; the output keeps the input order.
    With several processes each generates its share of the length-sorted prompts, and
    every process gets all outputs back in the input order.
    """
    encoded = [tokenizer(p).input_ids for p in prompts]
    by_length = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    order = [by_length[i] for i in my_share(len(by_length))]
    outputs: dict[int, str] = {}
    device = model.get_input_embeddings().weight.device
    model.eval()
    show = progress and is_main_process()
    for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not show, dynamic_ncols=True):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = left_pad([encoded[i] for i in rows], tokenizer.pad_token_id)
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList(
                [AnswerLineEnd(tokenizer, input_ids.shape[1])] if stop_at_line_end else []
            ),
        )
        texts = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
        for row, text in zip(rows, texts):
            outputs[row] = text
    gathered = gather_in_order([outputs[i] for i in order], len(by_length))
    result = [""] * len(prompts)
    for index, text in zip(by_length, gathered):
        result[index] = text
    return result
