"""The example types tasks produce and training consumes: supervised pairs, preferences
and generation examples (re-exported by :mod:`lofit.tasks`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptCompletion:
    """A supervised example: the loss falls on ``completion`` only."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class PromptPreference:
    """A preference example for DPO: ``chosen`` is preferred to ``rejected`` after ``prompt``."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class GenerationExample:
    """An evaluation example scored by exact match of the parsed greedy answer."""

    prompt: str
    answers: tuple[str, ...]
