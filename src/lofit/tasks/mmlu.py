"""MMLU: 4-way multiple choice over 57 subjects, evaluation only (out of domain).

Data: ``ood/mmlu/test.jsonl`` (14,042 questions) and ``ood/mmlu/dev.jsonl`` (5 per subject, the
few-shot examples), one object per line: ``subject``, ``question``, ``choices`` (four
strings) and ``answer`` (0-3 for A-D).

Prompt (lm-evaluation-harness's ``mmlu``, Hendrycks et al.'s format)::

    The following are multiple choice questions (with answers) about <subject words>.

    <question>
    A. <choice A>
    B. <choice B>
    C. <choice C>
    D. <choice D>
    Answer:

``mmlu`` is zero-shot; ``mmlu_5shot`` puts the subject's five dev questions, each closed by
`` <letter>\\n\\n``, between the description and the question (the standard 5-shot prompt).
The letters `` A`` .. `` D`` are scored by summed log-probability; the prediction is the
argmax (the first letter on a tie), and ``accuracy`` is the share of correct predictions,
overall and per subject group (``accuracy_stem``, ``accuracy_humanities``,
``accuracy_social_sciences``, ``accuracy_other``: the standard grouping of the 57 subjects,
:data:`SUBJECT_GROUPS`; a group without evaluated questions is left out).

``mmlu_continuation`` (lm-evaluation-harness's ``mmlu_continuation``, the "cloze" formulation
used for small models) shows no letters: each choice's own text is scored as the answer::

    The following are questions (with answers) about <subject words>.

    Question: <question>
    Answer: <choice>

Its main metric ``accuracy_norm`` takes the argmax of log p(choice) / len(choice) (characters,
the harness's ``acc_norm``), ``accuracy`` the argmax of the summed log-probability (``acc``);
the groups' accuracies (``accuracy_norm_<group>``) follow the normalised prediction. A model too
small to read the letters answers almost every lettered question with one letter, so its
``mmlu`` accuracy sits at chance whatever it knows; the continuation formulation does not depend on
that skill.

The test questions come in a fixed shuffled order (seed 0), so the first N (``--limit N``)
are a uniform random sample across subjects rather than the first subjects alphabetically.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from lofit.data.files import OOD_FOLDER, DataError, read_json_lines
from lofit.evaluation.multiple_choice import MultipleChoiceExample, choice_logprobs
from lofit.tasks.base import Evaluation, Task
from lofit.tasks.open_qa import evaluation_only, only_test_split

LETTERS = ("A", "B", "C", "D")
ORDER_SEED = 0
"""The seed of the test questions' fixed shuffled order."""
SUBJECT_GROUPS = {
    "stem": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"
    ).split(),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
        "professional_law world_religions"
    ).split(),
    "social_sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology public_relations "
        "security_studies sociology us_foreign_policy"
    ).split(),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
    ).split(),
}
"""The 57 subjects in the standard four groups (Hendrycks et al.; lm-evaluation-harness's ``mmlu_*`` groups)."""
GROUP_OF = {subject: group for group, subjects in SUBJECT_GROUPS.items() for subject in subjects}
DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"
CONTINUATION_DESCRIPTION = "The following are questions (with answers) about {subject}.\n\n"


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int

    def text(self) -> str:
        """The question and its lettered choices, ending in ``Answer:``."""
        lines = [self.question.strip(), *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, self.choices))]
        return "\n".join(lines) + "\nAnswer:"


@dataclass(frozen=True)
class MMLUExample:
    """One question: its subject and the multiple-choice example over its four continuations."""

    subject: str
    choice: MultipleChoiceExample


class MMLU(Task):
    name = "mmlu"
    evaluation_only = True
    shots = 0
    description = DESCRIPTION
    """The prompt's first paragraph, formatted with the subject's words."""
    prediction_metrics: tuple[str, ...] = ("accuracy",)
    """The accuracies reported, the main one first: one per way of predicting (:meth:`predictions`)."""

    def train_examples(self, data_dir: Path) -> list:
        raise evaluation_only(self.name)

    def _questions(self, data_dir: Path, split: str) -> list[Question]:
        path = data_dir / OOD_FOLDER / "mmlu" / f"{split}.jsonl"
        return self.parsed(path, lambda: _parse(path))

    def eval_examples(self, data_dir: Path, split: str) -> list[MMLUExample]:
        """Every test question, in the fixed shuffled order, with its prompt (zero- or few-shot)."""
        only_test_split(self.name, split)
        questions = list(self._questions(data_dir, "test"))
        random.Random(ORDER_SEED).shuffle(questions)
        shots: dict[str, list[Question]] = {}
        if self.shots:
            for question in self._questions(data_dir, "dev"):
                shots.setdefault(question.subject, []).append(question)
            short = sorted({q.subject for q in questions if len(shots.get(q.subject, [])) < self.shots})
            if short:
                raise DataError(
                    f"{data_dir / OOD_FOLDER / 'mmlu' / 'dev.jsonl'}: fewer than {self.shots} questions of {short}"
                )
        examples = []
        for q in questions:
            primer = "".join(
                f"{self.question_text(s)}{self.choice_texts(s)[s.answer]}\n\n"
                for s in shots.get(q.subject, [])[: self.shots]
            )
            prompt = self.prompt(
                self.description.format(subject=q.subject.replace("_", " ")) + primer + self.question_text(q)
            )
            labels = tuple(int(i == q.answer) for i in range(len(LETTERS)))
            examples.append(
                MMLUExample(q.subject, MultipleChoiceExample(prompt, self.choice_texts(q), labels, q.answer))
            )
        return examples

    def question_text(self, question: Question) -> str:
        """The question as the prompt ends: with its lettered choices and ``Answer:``."""
        return question.text()

    def choice_texts(self, question: Question) -> tuple[str, ...]:
        """The continuations scored after the prompt: the four letters."""
        return tuple(" " + letter for letter in LETTERS)

    def predictions(self, scores: list[float], example: MMLUExample) -> dict[str, int]:
        """The predicted choice of each of :attr:`prediction_metrics`: the argmax of the summed log-probability (the
        first on a tie)."""
        return {"accuracy": _argmax(scores)}

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[MMLUExample],
        batch_size: int = 16,
        progress: bool = True,
    ) -> Evaluation:
        """Each of :attr:`prediction_metrics`, and the main one per subject group (module docstring)."""
        scores = choice_logprobs(model, tokenizer, [e.choice for e in examples], progress=progress)
        main, *others = self.prediction_metrics
        records = []
        for example, choice_scores in zip(examples, scores):
            predicted = self.predictions(choice_scores, example)
            records.append(
                {
                    "prompt": example.choice.prompt,
                    "subject": example.subject,
                    "group": GROUP_OF[example.subject],
                    "scores": choice_scores,
                    "prediction": LETTERS[predicted[main]],
                    "answer": LETTERS[example.choice.best],
                    "correct": predicted[main] == example.choice.best,
                    **{f"correct_{name}": predicted[name] == example.choice.best for name in others},
                }
            )
        metrics = {main: sum(r["correct"] for r in records) / max(1, len(records))}
        for name in others:
            metrics[name] = sum(r[f"correct_{name}"] for r in records) / max(1, len(records))
        for group in SUBJECT_GROUPS:
            members = [r["correct"] for r in records if r["group"] == group]
            if members:
                metrics[f"{main}_{group}"] = sum(members) / len(members)
        metrics["num_examples"] = len(records)
        return Evaluation(metrics, records)


class MMLUFiveShot(MMLU):
    name = "mmlu_5shot"
    shots = 5


class MMLUContinuation(MMLU):
    """The "cloze" formulation: no letters, each choice's text scored as the answer (module docstring)."""

    name = "mmlu_continuation"
    description = CONTINUATION_DESCRIPTION
    prediction_metrics = ("accuracy_norm", "accuracy")

    def question_text(self, question: Question) -> str:
        """``Question: <question>`` and ``Answer:`` on the next line."""
        return f"Question: {question.question.strip()}\nAnswer:"

    def choice_texts(self, question: Question) -> tuple[str, ...]:
        """The four choices' texts, each after a space."""
        return tuple(" " + choice for choice in question.choices)

    def predictions(self, scores: list[float], example: MMLUExample) -> dict[str, int]:
        """``accuracy_norm``: the argmax of log p(choice) / len(choice) in characters, without the
        leading space (the harness's ``acc_norm``); ``accuracy``: of the summed log-probability."""
        lengths = [max(1, len(choice) - 1) for choice in example.choice.choices]
        return {"accuracy_norm": _argmax([s / n for s, n in zip(scores, lengths)]), "accuracy": _argmax(scores)}


def _argmax(values: Sequence[float]) -> int:
    """The index of the largest value, the first on a tie."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _parse(path: Path) -> list[Question]:
    """The questions of ``path``, checked: a known subject, a question, four choices, an answer 0-3."""
    questions = []
    for where, row in read_json_lines(path):
        if row.get("subject") not in GROUP_OF:
            raise DataError(f"{where}: unknown subject {row.get('subject')!r} (one of the 57 MMLU subjects expected)")
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise DataError(f"{where}: field 'question' must be a non-empty string")
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of four strings")
        answer = row.get("answer")
        if isinstance(answer, bool) or answer not in range(4):
            raise DataError(f"{where}: field 'answer' must be 0, 1, 2 or 3 (A-D); got {answer!r}")
        questions.append(Question(row["subject"], row["question"], tuple(choices), answer))
    if not questions:
        raise DataError(f"{path}: no rows")
    return questions
