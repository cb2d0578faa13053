"""Tasks by name. Adding a task is adding a module with a Task subclass and a line here."""

from __future__ import annotations

from .base import Evaluation, GenerationExample, PromptCompletion, Task, normalize_answer
from .clutrr import Clutrr

TASKS: dict[str, type[Task]] = {"clutrr": Clutrr}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Evaluation", "GenerationExample", "PromptCompletion", "Task", "get_task", "normalize_answer"]
