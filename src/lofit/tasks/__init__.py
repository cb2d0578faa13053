"""Tasks by name. Adding a task is adding a module with a Task subclass and a line here."""

from __future__ import annotations

import inspect
from typing import Any

from .base import Evaluation, GenerationExample, GenerationTask, PromptCompletion, PromptPreference, Task, normalize_answer
from .clutrr import Clutrr
from .mquake import MQuAKE
from .truthfulqa import TruthfulQA
from .user_file import UserFileTask

TASKS: dict[str, type[Task]] = {"clutrr": Clutrr, "mquake": MQuAKE, "truthfulqa": TruthfulQA}


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name`` (or a user's .jsonl/.csv file), built with the options its
    constructor takes (e.g. fold=1, eval_file=...)."""
    if name.endswith((".jsonl", ".csv")):
        task_class: type[Task] = UserFileTask
        options = {"train_file": name, **options}
    else:
        task_class = _registered(name)
    accepted = inspect.signature(task_class).parameters
    return task_class(**{k: v for k, v in options.items() if k in accepted})


def _registered(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}, or a .jsonl/.csv file of your own"
        ) from None


__all__ = ["TASKS", "Evaluation", "GenerationExample", "GenerationTask", "PromptCompletion", "PromptPreference", "Task",
           "UserFileTask", "get_task", "normalize_answer"]
