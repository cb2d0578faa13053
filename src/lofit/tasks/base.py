"""The task interface: load splits, build training pairs, evaluate.

A task is one module defining a :class:`Task` subclass and registering it in
``lofit.tasks.TASKS``.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from torch import nn
from transformers import PreTrainedTokenizerBase

from lofit.data.examples import GenerationExample, PromptCompletion, PromptPreference
from lofit.evaluation.generation import greedy_completions

T = TypeVar("T")


@dataclass
class Evaluation:
    """Metrics and one record per example (prompt, output, prediction, answers, correct).

    A task lists its metrics in ``metrics`` with its main metric first (the one experiments
    compare and test), then its other scores, then ``num_examples``."""

    metrics: dict[str, float]
    records: list[dict]

    @property
    def metric_names(self) -> list[str]:
        """The scores among :attr:`metrics` (not the example count), the task's main metric first."""
        return [name for name in self.metrics if name != "num_examples"]


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: lower case, surrounding whitespace removed."""
    return text.strip().lower()


class Task(ABC):
    """A dataset with a training objective and an evaluation protocol; :meth:`evaluate` names the
    task's metrics, its main metric first (:class:`Evaluation`)."""

    name: str
    default_train_size: int | None = None
    needs_data_dir: bool = True
    chat_tokenizer: PreTrainedTokenizerBase | None = None
    """When set (``--chat-template``), prompts are wrapped in this tokenizer's chat template."""

    def parsed(self, key: Hashable, parse: Callable[[], T]) -> T:
        """``parse()`` (reading and checking one data file), run once per task object and kept:
        a run builds one task, so each data file is parsed once however often its examples are
        asked for (before the model loads, to check them; then to train and evaluate)."""
        cache = self.__dict__.setdefault("_parsed", {})
        if key not in cache:
            cache[key] = parse()
        return cache[key]

    def prompt(self, text: str) -> str:
        """``text`` as the model sees it: as is, or as a user turn of the chat template."""
        if self.chat_tokenizer is None:
            return text
        if not self.chat_tokenizer.chat_template:
            raise ValueError("--chat-template was asked for, but this tokenizer has no chat template")
        messages = [{"role": "user", "content": text.strip()}]
        return self.chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @abstractmethod
    def train_examples(self, data_dir: Path) -> list[PromptCompletion] | list[PromptPreference]:
        """All training examples: prompt/completion pairs (SFT) or preference pairs (DPO)."""

    @abstractmethod
    def eval_examples(self, data_dir: Path, split: str) -> list:
        """Evaluation examples of ``split`` ("val" or "test")."""

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence,
        batch_size: int = 16,
        progress: bool = True,
    ) -> Evaluation:
        """Metrics of ``model`` on ``examples``."""

    def sample_train(self, data_dir: Path, size: int | None, seed: int) -> list:
        """``size`` training examples sampled with ``seed`` (all of them when size is None)."""
        examples = self.train_examples(data_dir)
        if size is None or size >= len(examples):
            return examples
        return random.Random(seed).sample(examples, size)


class GenerationTask(Task):
    """A task scored by exact match (or containment) of the parsed greedy answer."""

    max_new_tokens: int = 16
    match: str = "exact"

    def parse_answer(self, generated: str) -> str:
        """The answer inside a generated continuation: its first non-empty line."""
        return generated.strip().split("\n")[0]

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[GenerationExample],
        batch_size: int = 16,
        progress: bool = True,
    ) -> Evaluation:
        """Greedy-decode every prompt; score the normalised answer against the normalised references."""
        # Only the first line is read in exact-match mode, so generation stops there.
        outputs = greedy_completions(
            model,
            tokenizer,
            [e.prompt for e in examples],
            self.max_new_tokens,
            batch_size,
            progress,
            stop_at_line_end=self.match == "exact",
        )
        records = []
        for example, output in zip(examples, outputs):
            prediction = normalize_answer(self.parse_answer(output))
            answers = {normalize_answer(a) for a in example.answers}
            if self.match == "contains":
                correct = any(answer in normalize_answer(output) for answer in answers)
            else:
                correct = prediction in answers
            records.append(
                {
                    "prompt": example.prompt,
                    "output": output,
                    "prediction": prediction,
                    "answers": list(example.answers),
                    "correct": correct,
                }
            )
        exact_match = sum(r["correct"] for r in records) / max(1, len(records))
        metric = "exact_match" if self.match == "exact" else "contains_match"
        return Evaluation({metric: exact_match, "num_examples": len(records)}, records)
