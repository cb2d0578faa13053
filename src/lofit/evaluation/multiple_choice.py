"""Multiple-choice evaluation by log-likelihood: MC1 and MC2 as TruthfulQA defines them.

For a question with choices c_1..c_n, the score of c_i is its summed log-probability
s_i = log p(c_i | prompt) (no EOS, no length normalisation). With B the best answer, T the
correct answers and F the incorrect ones:

- MC1 = 1 if s_B >= max_{j in F} s_j else 0   (lm-evaluation-harness ``truthfulqa_mc1``:
  argmax over [best] + incorrect is the best answer; a tie goes to the best answer);
- MC2 = sum_{i in T} exp(s_i) / sum_{i in T u F} exp(s_i)   (``truthfulqa_mc2``), computed as
  a softmax in float64 so that long answers cannot underflow to 0/0.

A prefix shared by every prompt (the few-shot primer) is run through the model once and its
KV cache reused by every question. The questions, each with all its choices, are then packed
into rows without padding (:mod:`lofit.data.choice_packing`); a model whose attention does not
take a custom mask runs each question's prompt once and its choices as a batch on the
prompt's KV cache.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lofit.data.batching import TokenizedPair, collate, tokenize_pair
from lofit.data.choice_packing import (
    PACKABLE_ATTENTION,
    Question,
    attention_implementation,
    pack_questions,
    score_packed,
)
from lofit.evaluation.scoring import sequence_logprobs
from lofit.models.architectures import text_config
from lofit.utils.distributed import gather_in_order, is_main_process, my_share


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
        return model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True).cache


def _split_is_exact(tokenizer: PreTrainedTokenizerBase, prefix: str, prompt: str) -> bool:
    """Whether tokenising prefix and prompt apart gives the tokens of prefix + prompt."""
    return (
        tokenizer(prefix).input_ids + tokenizer(prompt, add_special_tokens=False).input_ids
        == tokenizer(prefix + prompt).input_ids
    )


def _choices_after_prompt(
    model: nn.Module,
    prompt_ids: list[int],
    choices: list[list[int]],
    past,
    past_length: int,
    pad_id: int,
    device: torch.device,
) -> list[float]:
    """Summed log-probabilities of ``choices`` after one pass over the prompt.

    The prompt runs once (after the cached ``past``, if any): its last position gives every
    choice's first token. The choices then run as one batch on copies of the prompt's KV
    cache, each row predicting its own tokens 2 .. n.
    """
    attention = torch.ones((1, past_length + len(prompt_ids)), dtype=torch.long, device=device)
    out = model(
        input_ids=torch.tensor([prompt_ids], device=device),
        attention_mask=attention,
        cache=past,
        use_cache=True,
        logits_to_keep=1,
    )
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = [float(first[choice[0]]) for choice in choices]
    longer = [index for index, choice in enumerate(choices) if len(choice) > 1]
    if longer:
        batch = collate([TokenizedPair(choices[i][:1], choices[i][1:]) for i in longer], pad_id).to(device)
        cache = out.cache
        cache.batch_repeat_interleave(len(longer))
        batch.attention_mask = torch.cat([attention.expand(len(longer), -1), batch.attention_mask], dim=1)
        for index, rest in zip(longer, sequence_logprobs(model, batch, cache=cache).tolist()):
            scores[index] += rest
    return scores


PACKING_PROBE_QUESTIONS = 2
"""Questions scored both unpacked and packed together in one row before packing is trusted."""


def _packing_limit(model: nn.Module) -> int | None:
    """The longest context a packed question may have: the sliding window of a model with
    sliding-window layers (a custom mask replaces the window, which only matters once a
    question's own context is longer than it), else none."""
    config = text_config(model.config)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if (
        not window
        or getattr(config, "use_sliding_window", True) is False
        or (layer_types and "sliding_attention" not in layer_types)
    ):
        return None
    return window


def _packing_reproduces(
    model: nn.Module,
    questions: list[Question],
    reference: list[list[float]],
    past,
    past_length: int,
    device: torch.device,
) -> bool:
    """Whether scoring ``questions`` (two or more) packed in one row reproduces their unpacked
    ``reference`` scores: to float32 rounding, or to bfloat16's when the forward pass runs in
    lower precision. A family that cannot take a 4-D mask at all (ALiBi models build their
    bias from a 2-D one, for instance) fails its forward pass here, which answers no as well."""
    try:
        packed = score_packed(model, questions, past, past_length, device)
    except torch.OutOfMemoryError:
        raise
    except (ValueError, RuntimeError, TypeError, IndexError):
        return False
    weights = model.get_input_embeddings().weight
    low_precision = torch.is_autocast_enabled(weights.device.type) or weights.dtype != torch.float32
    tolerance = {"rtol": 2e-2, "atol": 0.1} if low_precision else {"rtol": 1e-4, "atol": 1e-3}
    return all(torch.allclose(torch.tensor(a), torch.tensor(b), **tolerance) for a, b in zip(packed, reference))


@torch.no_grad()
def choice_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MultipleChoiceExample],
    prefix: str = "",
    progress: bool = True,
    pack_tokens: int = 512,
) -> list[list[float]]:
    """Summed log-probability of every choice of every example, given ``prefix + prompt``.

    The prefix is encoded once and its KV cache reused when tokenising it apart from the
    prompts is exact (checked on every prompt). Questions are then packed, with all their
    choices, into rows of at most ``pack_tokens`` tokens and scored without padding
    (:mod:`lofit.data.choice_packing`), once the first two questions have been scored both packed
    together and unpacked (each prompt once, its choices as a batch on the prompt's KV cache:
    :func:`_choices_after_prompt`) with the same result; a model whose attention ignores a
    custom mask or position ids keeps the unpacked path for every question (``pack_tokens``
    0 forces it), as do models on flash or flex attention and questions longer than a
    sliding window. A model that edits prompt positions (LoReFT) must see whole prompts: each
    of its rows carries the full text.
    """
    if pack_tokens < 0:
        raise ValueError(f"pack_tokens must be 0 (no packing) or a positive number of tokens, got {pack_tokens}")
    device = model.get_input_embeddings().weight.device
    model.eval()
    whole_rows = getattr(model, "edits_prompt_positions", False)
    reuse = (
        bool(prefix)
        and not whole_rows
        and all(e.prompt and _split_is_exact(tokenizer, prefix, e.prompt) for e in examples)
    )
    cache = _prefix_cache(model, tokenizer(prefix).input_ids, device) if reuse else None
    prefix_length = len(tokenizer(prefix).input_ids) if reuse else 0
    share = [
        examples[i] for i in my_share(len(examples))
    ]  # with several processes each scores its share; gathered back in order
    show = progress and is_main_process()
    if whole_rows:
        results = []
        for example in tqdm(share, desc="scoring choices", disable=not show, dynamic_ncols=True):
            pairs = [tokenize_pair(tokenizer, prefix + example.prompt, c, add_eos=False) for c in example.choices]
            results.append(sequence_logprobs(model, collate(pairs, tokenizer.pad_token_id).to(device)).tolist())
        return gather_in_order(results, len(examples))
    questions = [
        (
            tokenizer(e.prompt, add_special_tokens=False).input_ids
            if reuse
            else tokenizer(prefix + e.prompt).input_ids,
            [tokenizer(c, add_special_tokens=False).input_ids for c in e.choices],
        )
        for e in share
    ]
    if any(not choice for _, choices in questions for choice in choices):
        raise ValueError("every choice needs at least one token")
    if any(not prompt for prompt, _ in questions):
        raise ValueError(
            "every prompt needs at least one token (a choice's first token is predicted from the prompt's last)"
        )

    def prefix_copy():
        return copy.deepcopy(cache) if cache is not None else None

    def unpacked(question: Question) -> list[float]:
        return _choices_after_prompt(
            model, question[0], question[1], prefix_copy(), prefix_length, tokenizer.pad_token_id, device
        )

    probe = PACKING_PROBE_QUESTIONS if pack_tokens > 0 and len(questions) > PACKING_PROBE_QUESTIONS else 0
    results = [unpacked(question) for question in questions[:probe]]
    longest = max((prefix_length + len(prompt) + max(map(len, choices)) for prompt, choices in questions), default=0)
    packs = (
        probe > 0
        and attention_implementation(model) in PACKABLE_ATTENTION
        and longest <= (_packing_limit(model) or float("inf"))
    )
    if packs and not _packing_reproduces(model, questions[:probe], results, prefix_copy(), prefix_length, device):
        warnings.warn(
            f"{type(model).__name__}: scoring choices packed in one sequence (custom attention mask and position "
            "ids) did not reproduce the unpacked scores; scoring each question on its own (slower)",
            stacklevel=2,
        )
        packs = False
    bar = tqdm(total=len(questions), initial=len(results), desc="scoring choices", disable=not show, dynamic_ncols=True)
    if packs:
        for group in pack_questions(questions[probe:], pack_tokens):
            results += score_packed(model, [questions[probe + i] for i in group], prefix_copy(), prefix_length, device)
            bar.update(len(group))
    else:
        for question in questions[probe:]:
            results.append(unpacked(question))
            bar.update()
    bar.close()
    return gather_in_order(results, len(examples))
