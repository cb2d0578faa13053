"""Train on one task, evaluate on another: the task ``TRAIN:EVAL`` (e.g. ``truthfulqa:nq_open``).

A run of ``truthfulqa:nq_open`` fits its method on TruthfulQA's training examples (TruthfulQA's
objective and default size, its ``--fold``) and evaluates the result on NQ-open's test rows
with NQ-open's protocol and metrics: the out-of-domain evaluation of the paper's Table 5 as
one run, so that an experiment grid can evaluate one training recipe on several tasks
(``lofit experiment ood``). Both names must be built-in tasks, and the training task must
have a training split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from lofit.tasks.base import Evaluation, Task

SEPARATOR = ":"


class TransferTask(Task):
    """``train``'s training examples, ``evaluate``'s evaluation (see the module docstring)."""

    def __init__(self, train: Task, evaluate: Task):
        if getattr(train, "evaluation_only", False):
            raise ValueError(
                f"task {train.name}{SEPARATOR}{evaluate.name}: {train.name} has no training split; the task "
                f"to train on comes first (TRAIN{SEPARATOR}EVAL, e.g. truthfulqa{SEPARATOR}nq_open)"
            )
        self.train_task, self.eval_task = train, evaluate
        self.name = f"{train.name}{SEPARATOR}{evaluate.name}"
        self.default_train_size = train.default_train_size
        self.needs_data_dir = train.needs_data_dir or evaluate.needs_data_dir

    @property
    def chat_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.train_task.chat_tokenizer

    @chat_tokenizer.setter
    def chat_tokenizer(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """``--chat-template`` wraps the prompts of both tasks."""
        self.train_task.chat_tokenizer = tokenizer
        self.eval_task.chat_tokenizer = tokenizer

    def train_examples(self, data_dir: Path) -> list:
        return self.train_task.train_examples(data_dir)

    def sample_train(self, data_dir: Path, size: int | None, seed: int) -> list:
        return self.train_task.sample_train(data_dir, size, seed)

    def eval_examples(self, data_dir: Path, split: str) -> list:
        return self.eval_task.eval_examples(data_dir, split)

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence,
        batch_size: int = 16,
        progress: bool = True,
    ) -> Evaluation:
        return self.eval_task.evaluate(model, tokenizer, examples, batch_size, progress)
