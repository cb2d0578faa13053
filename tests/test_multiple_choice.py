"""MC1/MC2 against hand-computed values, and shared-prefix reuse against full recomputation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, MistralConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from lofit import get_lofit_model
from lofit.data.choice_packing import pack_questions, question_length
from lofit.evaluation import multiple_choice
from lofit.evaluation.multiple_choice import MultipleChoiceExample, choice_logprobs, mc_scores
from lofit.models.architectures import text_config

from .conftest import COMMON, WORDS, randomize_adapter, tiny_model, word_tokenizer


class BigramModel(nn.Module):
    """p(next | current) from a fixed table: every log-probability is known in advance."""

    def __init__(self, probabilities: dict[str, dict[str, float]]):
        super().__init__()
        table = torch.full((len(WORDS), len(WORDS)), 1e-6)
        for current, row in probabilities.items():
            for word, p in row.items():
                table[WORDS.index(current), WORDS.index(word)] = p
        self.log_table = torch.log(table / table.sum(-1, keepdim=True))
        self.embed = nn.Embedding(len(WORDS), 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None, cache=None, use_cache=False):
        logits = self.log_table[input_ids]
        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:]
        elif logits_to_keep is not None:
            logits = logits[logits_to_keep]
        return CausalLMOutputWithPast(logits=logits, cache=NoContext() if use_cache else None)


class NoContext:
    """The KV cache of a bigram model: there is nothing to remember."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass


def test_mc1_and_mc2_match_hand_computed_values():
    """p(yes|A:) = 0.5, p(no|A:) = 0.3, p(maybe|A:) = 0.2; "sky blue" adds log p(blue|sky) = log 0.9."""
    model = BigramModel({"A:": {"yes": 0.5, "no": 0.3, "maybe": 0.2}, "sky": {"blue": 0.9, "red": 0.1}})
    example = MultipleChoiceExample("Q: sky A:", (" yes", " no", " maybe"), (1, 0, 1), best=0)
    scores = choice_logprobs(model, word_tokenizer(), [example], progress=False)[0]
    expected = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert scores == pytest.approx(expected, abs=1e-5)
    metrics = mc_scores(scores, example)
    assert metrics["mc1"] == 1.0
    assert metrics["mc2"] == pytest.approx((0.5 + 0.2) / (0.5 + 0.3 + 0.2), abs=1e-5)
    two_tokens = MultipleChoiceExample("Q: A: sky", (" blue", " red"), (0, 1), best=1)
    assert mc_scores(
        choice_logprobs(model, word_tokenizer(), [two_tokens], progress=False)[0], two_tokens
    ) == pytest.approx({"mc1": 0.0, "mc2": 0.1}, abs=1e-5)


def test_mc1_is_the_harness_argmax_with_ties_to_the_best_answer():
    example = MultipleChoiceExample("", ("a", "b", "c", "d"), (0, 1, 1, 0), best=1)
    assert mc_scores([-1.0, -2.0, -0.5, -3.0], example)["mc1"] == 0.0  # an incorrect answer beats the best
    assert mc_scores([-2.0, -2.0, -5.0, -3.0], example)["mc1"] == 1.0  # a tie goes to the best answer
    assert mc_scores([-2.0, -1.0, -9.0, -3.0], example)["mc1"] == 1.0  # another correct answer may score higher


def test_mc2_does_not_underflow_on_long_answers():
    example = MultipleChoiceExample("", ("a", "b"), (1, 0), best=0)
    assert mc_scores([-2000.0, -2001.0], example)["mc2"] == pytest.approx(1 / (1 + math.exp(-1)))


def test_invalid_multiple_choice_examples_are_refused():
    with pytest.raises(ValueError, match="one label per choice"):
        MultipleChoiceExample("", ("a", "b"), (1,), best=0)
    with pytest.raises(ValueError, match="at least one choice incorrect"):
        MultipleChoiceExample("", ("a", "b"), (1, 1), best=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_shared_prefix_reuse_equals_full_recomputation(model_type):
    tokenizer = word_tokenizer()
    lofit_model = get_lofit_model(tiny_model(model_type))
    randomize_adapter(lofit_model)
    examples = [
        MultipleChoiceExample(" Q: sky A:", (" yes", " no maybe", " blue"), (1, 0, 0), best=0),
        MultipleChoiceExample(" Q: A:", (" red", " yes yes"), (0, 1), best=1),
    ]
    prefix = "Q: sky A: blue Q: red A: no"
    reused = choice_logprobs(lofit_model, tokenizer, examples, prefix=prefix, progress=False)
    full = [
        choice_logprobs(
            lofit_model,
            tokenizer,
            [MultipleChoiceExample(prefix + e.prompt, e.choices, e.labels, e.best)],
            progress=False,
        )[0]
        for e in examples
    ]
    for a, b in zip(reused, full):
        assert a == pytest.approx(b, abs=1e-4)


PACKING_EXAMPLES = [
    MultipleChoiceExample(
        " Q: sky A:", (" yes", " no maybe", " blue", " no maybe red", " yes"), (1, 0, 0, 1, 0), best=0
    ),
    MultipleChoiceExample(" Q: A:", (" red", " yes yes", " yes no sky"), (0, 1, 0), best=1),
    MultipleChoiceExample(" Q: red blue sky A: maybe", (" sky", " sky blue"), (1, 0), best=0),
    MultipleChoiceExample(" Q: no A:", (" blue red red", " blue red yes", " maybe"), (1, 0, 0), best=0),
]
"""Choices with shared beginnings (a trie), a duplicate choice, one-token choices, and
questions that end up several to a packed row."""


ALIBI_FAMILIES = {"bloom", "mpt"}
"""Families whose position information is a bias built from a 2-D mask: packing must be refused."""


def test_packed_scoring_equals_scoring_each_question(model_type, monkeypatch):
    """Questions packed with their choice tries into rows give every choice the score it gets
    on its own; a family whose attention ignores the custom mask is detected and scored
    unpacked, with a warning: the same scores either way."""
    rows = []
    score_packed = multiple_choice.score_packed
    monkeypatch.setattr(
        multiple_choice,
        "score_packed",
        lambda model, questions, *rest: rows.append(len(questions)) or score_packed(model, questions, *rest),
    )
    tokenizer = word_tokenizer()
    lofit_model = get_lofit_model(tiny_model(model_type))
    randomize_adapter(lofit_model)
    sliding_window = getattr(text_config(lofit_model.config), "sliding_window", None) or 1000
    for prefix in ("Q: sky A: blue Q: red A: no", ""):
        rows.clear()
        alone = choice_logprobs(lofit_model, tokenizer, PACKING_EXAMPLES, prefix=prefix, progress=False, pack_tokens=0)
        assert rows == []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            packed = choice_logprobs(
                lofit_model, tokenizer, PACKING_EXAMPLES, prefix=prefix, progress=False, pack_tokens=16
            )
        for a, b in zip(packed, alone):
            assert a == pytest.approx(b, abs=1e-4)
        assert any("did not reproduce" in str(w.message) for w in caught) == (model_type in ALIBI_FAMILIES)
        longest = max(
            len(tokenizer(prefix + e.prompt).input_ids) + max(len(tokenizer(c).input_ids) for c in e.choices)
            for e in PACKING_EXAMPLES
        )
        if model_type not in ALIBI_FAMILIES and sliding_window >= longest:
            assert rows[0] == 2 and sum(rows[1:]) == 2, rows  # the probe's row, then the other two questions packed


def test_pack_questions_keeps_order_and_budget():
    questions = [([1] * n, [[2], [2, 3], [2, 3]]) for n in (3, 9, 1, 20, 2)]  # each adds 2 choice tokens (a trie)
    assert [question_length(q) for q in questions] == [5, 11, 3, 22, 4]
    assert pack_questions(questions, 16) == [[0, 1], [2], [3], [4]]  # 22 > 16: a row of its own
    assert pack_questions(questions, 30) == [[0, 1, 2], [3, 4]]
    assert pack_questions(questions, 100) == [[0, 1, 2, 3, 4]]


def test_bad_packing_inputs_are_refused():
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    with pytest.raises(ValueError, match="pack_tokens must be 0"):
        choice_logprobs(model, tokenizer, PACKING_EXAMPLES, progress=False, pack_tokens=-1)
    empty_prompt = MultipleChoiceExample("", (" yes", " no"), (1, 0), best=0)  # no BOS: nothing to predict from
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        choice_logprobs(model, tokenizer, [*PACKING_EXAMPLES, empty_prompt], progress=False)


def test_questions_longer_than_a_sliding_window_are_not_packed(monkeypatch):
    """A custom mask replaces the sliding window, so a question whose context exceeds the
    window is scored unpacked, as the window demands."""
    rows = []
    score_packed = multiple_choice.score_packed
    monkeypatch.setattr(
        multiple_choice,
        "score_packed",
        lambda model, questions, *rest: rows.append(len(questions)) or score_packed(model, questions, *rest),
    )
    tokenizer = word_tokenizer()
    for window, packed in ((3, False), (64, True)):
        rows.clear()
        torch.manual_seed(0)
        model = get_lofit_model(AutoModelForCausalLM.from_config(MistralConfig(**COMMON, sliding_window=window)).eval())
        randomize_adapter(model)
        scores = choice_logprobs(model, tokenizer, PACKING_EXAMPLES, progress=False, pack_tokens=16)
        assert bool(rows) == packed
        alone = choice_logprobs(model, tokenizer, PACKING_EXAMPLES, progress=False, pack_tokens=0)
        for a, b in zip(scores, alone):
            assert a == pytest.approx(b, abs=1e-4)
