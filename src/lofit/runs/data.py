"""A run's data: its task and examples, read and checked before the model loads.

The task keeps the rows it parsed (:meth:`~lofit.tasks.base.Task.parsed`), so asking for the
examples again (to train, to evaluate) reads no file a second time.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Collection

from lofit.data.files import resolve_data_dir
from lofit.models.identity import portable_name
from lofit.runs.config import RunConfig
from lofit.tasks import Task, get_task


class RunData:
    """The task of ``run`` and its examples; the splits named in ``needs`` ("train", "eval") are
    read and checked now, so bad data fails before a model loads."""

    def __init__(self, run: RunConfig, seed: int, needs: Collection[str] = ("train", "eval")):
        self.run = run
        self.seed = seed
        self.warnings: list[str] = []  # what reading the data warned of, for the run's metrics
        self.task: Task = get_task(
            run.task, fold=run.folds()[0], all_pairs=run.all_pairs, eval_file=run.eval_file, match=run.match
        )
        self.data_dir = resolve_data_dir(run.data_dir) if self.task.needs_data_dir else None
        if "train" in needs:
            self.train_examples()
        if "eval" in needs:
            self.eval_examples()

    @functools.cached_property
    def _train(self) -> list:
        size = self.run.train_size if self.run.train_size is not None else self.task.default_train_size
        examples = self.task.sample_train(self.data_dir, size, self.seed)
        if self.run.train_size is not None and self.run.train_size > len(examples):
            message = (
                f"{portable_name(self.run.task)}: --train-size {self.run.train_size} is more than its "
                f"{len(examples)} training examples; training on all {len(examples)}"
            )
            self.warnings.append(message)
            warnings.warn(message, stacklevel=3)
        return examples

    def train_examples(self) -> list:
        """``--train-size`` training examples (the task's default size), sampled with the seed once;
        all of them, with a warning, when ``--train-size`` asks for more than there are."""
        return self._train

    def eval_examples(self) -> list:
        """The ``--eval-split`` examples, the first ``--limit`` of them."""
        return self.task.eval_examples(self.data_dir, self.run.eval_split)[: self.run.limit]
