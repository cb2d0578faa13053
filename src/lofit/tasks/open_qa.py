"""NQ-open and TriviaQA: closed-book short-answer questions, evaluation only (out of domain).

Data: ``ood/nq_open/test.jsonl`` (the 3,610 questions of the official NQ-open dev set) and
``ood/triviaqa/test.jsonl`` (2,000 TriviaQA validation questions), one object per line:
``question``, ``answers`` (every gold alias), ``false_answer`` (the wrong answer that
Inference-Time Intervention paired with the question for its transfer evaluation) and
``false_answer_in_answers`` (that "false" answer is in fact a gold answer).

Rows whose false answer is a gold answer (255 of NQ's, 720 of TriviaQA's) are left out:
choosing between two correct answers measures nothing. Both protocols below score the
same remaining rows (3,355 and 1,280), so that their scores pair row for row.

Prompts are lm-evaluation-harness's zero-shot ones for its tasks of the same names:

- ``nq_open``: ``Answer these questions:\\n\\nQ: <question>?\\nA:``
- ``triviaqa``: ``Question: <question>?\\nAnswer:``

Two protocols on every row, the paper's first (the task's main metric):

1. ``true_false_accuracy`` (LoFiT's Table 5, after ITI's transfer evaluation): with s(x) the
   summed log-probability of `` <x>`` after the prompt, the row is correct when
   max over the gold aliases a of s(a) >= s(false answer): the model prefers some correct
   form of the answer to the false one (TruthfulQA's MC1 with the best answer taken as the
   model's likeliest alias; the files keep no canonical answer, and a row's first alias can
   be an odd one, e.g. ``Yukon Optics`` for "pulsar").
2. ``exact_match``: the greedy continuation, cut at the first line break, period or comma
   (the harness's stop sequences) and stripped, is correct when its SQuAD normalisation
   (:func:`squad_normalize`) equals that of any gold alias.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from lofit.data.files import OOD_FOLDER, DataError, read_json_lines
from lofit.evaluation.generation import greedy_completions
from lofit.evaluation.multiple_choice import MultipleChoiceExample, choice_logprobs
from lofit.tasks.base import Evaluation, Task

STOP = re.compile(r"[\n.,]")
"""Where a generated answer ends: lm-evaluation-harness's ``until`` for nq_open and triviaqa."""
ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, ASCII punctuation removed, the articles
    a/an/the removed, whitespace collapsed."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


def cut_answer(generated: str) -> str:
    """The answer in a greedy continuation: the text before the first line break, period or comma, stripped."""
    return STOP.split(generated, maxsplit=1)[0].strip()


def evaluation_only(task: str) -> ValueError:
    """The error for training on an evaluation-only task."""
    return ValueError(
        f"{task} is an evaluation-only task (it has no training split): train on another task and evaluate "
        f"the result with `lofit eval --task {task} --adapter RUN/adapter`, or train and evaluate in one run with "
        f"--task truthfulqa:{task}"
    )


def only_test_split(task: str, split: str) -> None:
    """A ValueError unless ``split`` is ``test``, the one split of an evaluation-only task."""
    if split != "test":
        raise ValueError(f"{task} has only a test split (evaluation only); got --eval-split {split}")


@dataclass(frozen=True)
class OpenQAExample:
    """One question: the prompt as the model sees it, every gold alias, and ITI's false answer."""

    prompt: str
    answers: tuple[str, ...]
    false_answer: str


class OpenQATask(Task):
    """A closed-book QA task of :mod:`lofit.tasks.open_qa` (see the module docstring)."""

    folder: str
    template: str
    evaluation_only = True
    max_new_tokens = 16

    def train_examples(self, data_dir: Path) -> list:
        raise evaluation_only(self.name)

    def eval_examples(self, data_dir: Path, split: str) -> list[OpenQAExample]:
        """The test rows whose false answer is not a gold answer (see the module docstring)."""
        only_test_split(self.name, split)
        path = data_dir / OOD_FOLDER / self.folder / "test.jsonl"
        rows = self.parsed(path, lambda: _parse(path))
        return [
            OpenQAExample(self.prompt(self.template.format(question=question)), answers, false_answer)
            for question, answers, false_answer, flawed in rows
            if not flawed
        ]

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[OpenQAExample],
        batch_size: int = 16,
        progress: bool = True,
    ) -> Evaluation:
        """The true-vs-false choice and the greedy exact match of every example (module docstring)."""
        choices = [
            MultipleChoiceExample(
                e.prompt, tuple(" " + a for a in (*e.answers, e.false_answer)), (1,) * len(e.answers) + (0,), 0
            )
            for e in examples
        ]
        scores = choice_logprobs(model, tokenizer, choices, progress=progress)
        outputs = greedy_completions(
            model,
            tokenizer,
            [e.prompt for e in examples],
            self.max_new_tokens,
            batch_size,
            progress,
            stop_at_line_end=True,
        )
        records = []
        for example, choice_scores, output in zip(examples, scores, outputs):
            prediction = cut_answer(output)
            normalized = squad_normalize(prediction)
            records.append(
                {
                    "prompt": example.prompt,
                    "output": output,
                    "prediction": prediction,
                    "answers": list(example.answers),
                    "false_answer": example.false_answer,
                    "scores": choice_scores,
                    "true_false_accuracy": float(max(choice_scores[:-1]) >= choice_scores[-1]),
                    "exact_match": float(any(normalized == squad_normalize(a) for a in example.answers)),
                }
            )
        n = max(1, len(records))
        metrics = {
            "true_false_accuracy": sum(r["true_false_accuracy"] for r in records) / n,
            "exact_match": sum(r["exact_match"] for r in records) / n,
            "num_examples": len(records),
        }
        return Evaluation(metrics, records)


class NaturalQuestions(OpenQATask):
    name = "nq_open"
    folder = "nq_open"
    template = "Answer these questions:\n\nQ: {question}?\nA:"


class TriviaQA(OpenQATask):
    name = "triviaqa"
    folder = "triviaqa"
    template = "Question: {question}?\nAnswer:"


def _parse(path: Path) -> list[tuple[str, tuple[str, ...], str, bool]]:
    """(question, answers, false answer, false answer is a gold answer) of every line of ``path``, checked."""
    rows = []
    for where, row in read_json_lines(path):
        for name in ("question", "false_answer"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise DataError(f"{where}: field {name!r} must be a non-empty string")
        answers = row.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{where}: field 'answers' must be a non-empty list of non-empty strings")
        if not isinstance(row.get("false_answer_in_answers"), bool):
            raise DataError(f"{where}: field 'false_answer_in_answers' must be true or false")
        rows.append((row["question"], tuple(answers), row["false_answer"], row["false_answer_in_answers"]))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
