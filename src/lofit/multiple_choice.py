"""Multiple-choice evaluation by log-likelihood: MC1 and MC2 as TruthfulQA defines them.

For a question with choices c_1..c_n, the score of c_i is its summed log-probability
s_i = log p(c_i | prompt) (no EOS, no length normalisation). With B the best answer, T the
correct answers and F the incorrect ones:

- MC1 = 1 if s_B >= max_{j in F} s_j else 0   (lm-evaluation-harness ``truthfulqa_mc1``:
  argmax over [best] + incorrect is the best answer; a tie goes to the best answer);
- MC2 = sum_{i in T} exp(s_i) / sum_{i in T u F} exp(s_i)   (``truthfulqa_mc2``), computed as
  a softmax in float64 so that long answers cannot underflow to 0/0.

A prefix shared by every prompt (the few-shot primer) is run through the model once and its
KV cache copied for each question; each question's prompt is run once, and all its choices
are scored in one batch on the prompt's KV cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .batching import TokenizedPair, collate, tokenize_pair
from .distributed import gather_in_order, is_main_process, my_share


@dataclass(frozen=True)
class MultipleChoiceExample:
    """A question: its prompt (after the shared prefix), the choices as appended, and their labels.

    Attributes:
        labels: 1 for a correct choice, 0 for an incorrect one.
        best: index of the best answer (MC1 compares it with the incorrect choices).
    """

    prompt: str
    choices: tuple[str, ...]
    labels: tuple[int, ...]
    best: int

    def __post_init__(self) -> None:
        if len(self.choices) != len(self.labels) or not self.choices:
            raise ValueError("a multiple-choice example needs one label per choice")
        if self.labels[self.best] != 1 or 0 not in self.labels:
            raise ValueError("the best choice must be correct and at least one choice incorrect")


def mc_scores(scores: Sequence[float], example: MultipleChoiceExample) -> dict[str, float]:
    """MC1 and MC2 of one question from its choices' summed log-probabilities."""
    s = torch.tensor(scores, dtype=torch.float64)
    labels = torch.tensor(example.labels, dtype=torch.bool)
    mc1 = float(s[example.best] >= s[~labels].max())
    mc2 = float(torch.softmax(s, dim=0)[labels].sum())
    return {"mc1": mc1, "mc2": mc2}


def _prefix_cache(model: nn.Module, prefix_ids: list[int], device: torch.device):
    with torch.no_grad():
        return model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True).past_key_values


def _split_is_exact(tokenizer: PreTrainedTokenizerBase, prefix: str, prompt: str) -> bool:
    """Whether tokenising prefix and prompt apart gives the tokens of prefix + prompt."""
    return tokenizer(prefix).input_ids + tokenizer(prompt, add_special_tokens=False).input_ids == tokenizer(prefix + prompt).input_ids


def _choices_after_prompt(model: nn.Module, prompt_ids: list[int], choices: list[list[int]], past, past_length: int,
                          pad_id: int, device: torch.device) -> list[float]:
    """Summed log-probabilities of ``choices`` after one pass over the prompt.

    The prompt runs once (after the cached ``past``, if any): its last position gives every
    choice's first token. The choices then run as one batch on copies of the prompt's KV
    cache, each row predicting its own tokens 2 .. n.
    """
    from .scoring import sequence_logprobs

    if any(not choice for choice in choices):
        raise ValueError("every choice needs at least one token")
    attention = torch.ones((1, past_length + len(prompt_ids)), dtype=torch.long, device=device)
    out = model(input_ids=torch.tensor([prompt_ids], device=device), attention_mask=attention, past_key_values=past,
                use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = [float(first[choice[0]]) for choice in choices]
    longer = [index for index, choice in enumerate(choices) if len(choice) > 1]
    if longer:
        batch = collate([TokenizedPair(choices[i][:1], choices[i][1:]) for i in longer], pad_id).to(device)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(longer))
        batch.attention_mask = torch.cat([attention.expand(len(longer), -1), batch.attention_mask], dim=1)
        for index, rest in zip(longer, sequence_logprobs(model, batch, past_key_values=cache).tolist()):
            scores[index] += rest
    return scores


@torch.no_grad()
def choice_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MultipleChoiceExample],
    prefix: str = "",
    progress: bool = True,
) -> list[list[float]]:
    """Summed log-probability of every choice of every example, given ``prefix + prompt``.

    The prefix is encoded once and its KV cache reused when tokenising it apart from the
    prompts is exact (checked on every prompt); each prompt is then encoded once and all its
    choices scored in one batched pass on its KV cache (:func:`_choices_after_prompt`). A
    model that edits prompt positions (LoReFT) must see whole prompts: each of its rows
    carries the full text.
    """
    from .scoring import sequence_logprobs

    device = model.get_input_embeddings().weight.device
    model.eval()
    whole_rows = getattr(model, "edits_prompt_positions", False)
    reuse = bool(prefix) and not whole_rows and all(e.prompt and _split_is_exact(tokenizer, prefix, e.prompt) for e in examples)
    cache = _prefix_cache(model, tokenizer(prefix).input_ids, device) if reuse else None
    prefix_length = len(tokenizer(prefix).input_ids) if reuse else 0
    results = []
    share = my_share(len(examples))  # with several processes each scores its share; gathered back in order
    show = progress and is_main_process()
    for example in tqdm([examples[i] for i in share], desc="scoring choices", disable=not show, dynamic_ncols=True):
        choices = [tokenizer(c, add_special_tokens=False).input_ids for c in example.choices]
        if whole_rows:
            pairs = [tokenize_pair(tokenizer, prefix + example.prompt, c, add_eos=False) for c in example.choices]
            results.append(sequence_logprobs(model, collate(pairs, tokenizer.pad_token_id).to(device)).tolist())
            continue
        prompt_ids = tokenizer(example.prompt, add_special_tokens=False).input_ids if reuse else tokenizer(prefix + example.prompt).input_ids
        past = copy.deepcopy(cache) if cache is not None else None
        results.append(_choices_after_prompt(model, prompt_ids, choices, past, prefix_length, tokenizer.pad_token_id, device))
    return gather_in_order(results, len(examples))
