"""Tasks by name. Adding a task is adding a module with a Task subclass and a line here."""

from __future__ import annotations

import inspect
from typing import Any

from lofit.tasks.base import (
    Evaluation,
    GenerationExample,
    GenerationTask,
    PromptCompletion,
    PromptPreference,
    Task,
    normalize_answer,
)
from lofit.tasks.clutrr import Clutrr
from lofit.tasks.mmlu import MMLU, MMLUContinuation, MMLUFiveShot
from lofit.tasks.mquake import MQuAKE
from lofit.tasks.open_qa import NaturalQuestions, TriviaQA
from lofit.tasks.transfer import SEPARATOR, TransferTask
from lofit.tasks.truthfulqa import TruthfulQA
from lofit.tasks.user_file import UserFileTask, is_user_source

TASKS: dict[str, type[Task]] = {
    "clutrr": Clutrr,
    "mquake": MQuAKE,
    "truthfulqa": TruthfulQA,
    "nq_open": NaturalQuestions,
    "triviaqa": TriviaQA,
    "mmlu": MMLU,
    "mmlu_5shot": MMLUFiveShot,
    "mmlu_continuation": MMLUContinuation,
}
"""Built-in tasks; nq_open, triviaqa, mmlu, mmlu_5shot and mmlu_continuation are evaluation only (no training
split)."""


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name``, else the user's own data ``name`` (a .jsonl, .csv or .parquet
    file, or a ``datasets`` dataset: see :mod:`lofit.tasks.user_file`), built with the
    options its constructor takes (e.g. fold=1, eval_file=...). ``TRAIN:EVAL`` (two built-in
    tasks, e.g. ``truthfulqa:nq_open``) trains on TRAIN and evaluates on EVAL
    (:class:`~lofit.tasks.transfer.TransferTask`)."""
    train, separator, evaluate = name.partition(SEPARATOR)
    if separator and train in TASKS and evaluate in TASKS:
        return TransferTask(get_task(train, **options), get_task(evaluate, **options))
    if name in TASKS:
        task_class: type[Task] = TASKS[name]
    elif is_user_source(name):
        task_class = UserFileTask
        options = {"train_file": name, **options}
    else:
        trainable = sorted(n for n, t in TASKS.items() if not getattr(t, "evaluation_only", False))
        evaluation_only = sorted(set(TASKS) - set(trainable))
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(trainable)}; evaluation only: "
            f"{', '.join(evaluation_only)}; TRAIN{SEPARATOR}EVAL (e.g. truthfulqa{SEPARATOR}nq_open); or data of "
            "your own: a .jsonl/.csv/.parquet file, or a datasets dataset (owner/name or a folder)"
        )
    accepted = inspect.signature(task_class).parameters
    return task_class(**{k: v for k, v in options.items() if k in accepted})


def training_task_name(name: str) -> str:
    """The task whose training examples a run of task ``name`` trains on: TRAIN for a
    ``TRAIN:EVAL`` task, else ``name`` itself."""
    train, separator, evaluate = name.partition(SEPARATOR)
    return train if separator and train in TASKS and evaluate in TASKS else name


__all__ = [
    "TASKS",
    "Evaluation",
    "GenerationExample",
    "GenerationTask",
    "PromptCompletion",
    "PromptPreference",
    "Task",
    "TransferTask",
    "UserFileTask",
    "get_task",
    "normalize_answer",
    "training_task_name",
]
