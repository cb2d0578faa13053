"""The experiment runner: every cell of a grid through :func:`lofit.runs.pipeline.run_cell`.

- Each finished cell is appended to ``results.jsonl`` at once (resolved configuration,
  metrics, per-example scores, trained parameters, wall time, seed); a rerun skips every
  cell whose key is already there, so a stopped experiment continues where it stopped (a
  cell stopped mid-training resumes from its newest checkpoint).
- What a cell trains is trained once per key of :func:`~lofit.experiments.grid.training_key`
  (the cell's options without those that shape only its evaluation, a ``TRAIN:EVAL`` task as
  TRAIN): the first such cell trains and keeps its adapter; the others wait for it and
  evaluate that adapter (``trained_by`` in their records). So a tuning trial's adapter is the
  test cell's of the same seed, and ``ood`` trains each (arm, seed) once for its four tasks.
- Step-1 rankings are computed once per key of :func:`~lofit.experiments.grid.ranking_key`
  (task, seed, model, step-1 options), recorded as ``ranking`` lines, and handed to every
  LoFiT cell that needs them as ``--heads file --heads-file``. A ranking already recorded
  by another experiment folder beside this one (same parent) is copied, not recomputed;
  so is a tuning trial or test cell that measures the same thing (the same options, seed and
  split, up to options set to what unset means: :func:`~lofit.experiments.grid.measurement_key`):
  its record is copied under this experiment's key and options, with ``reused_from`` naming its folder.
- The model is loaded once per process (:class:`ModelPool`) and lent to each cell; each
  cell takes its adapter off again, which the pool checks before lending it out.
- Cells run on an :class:`~lofit.experiments.executors.Executor` (this process by default;
  local worker processes, Ray tasks or Slurm jobs) as :class:`Job` s: each step-1 ranking
  before the cells that need it. Only this driver appends to ``results.jsonl``; a job that
  fails is recorded in ``failures/results.jsonl`` and runs again on the next run, and the
  jobs in flight are marked in ``running/`` for :meth:`Runner.status`
  (:mod:`~lofit.experiments.progress`). A cell opens one tracker run (``report_to``).
- With ``tune``, every arm's trials run first on the validation split with the first
  seed; where the best trial of a (task, arm, sweep point) sits at an edge of a numeric
  option's explored range, trials one log step beyond are added (:func:`~.grid.search`,
  recomputed from the recorded scores on a rerun), each as soon as the trials it follows from
  have run. Once a group has settled, its best trial runs on test with every seed, while the
  other groups may still tune (trials go first when both wait for a worker).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lofit.data.files import DATA_ENV
from lofit.experiments.executors import Executor, InlineExecutor
from lofit.experiments.grid import (
    Cell,
    Grid,
    Search,
    cell_config,
    check_searches,
    check_tuning,
    expand,
    measurement_key,
    ranking_key,
    search,
    training_key,
    tuning_group,
)
from lofit.experiments.progress import (
    claim_marker,
    clear_stale_markers,
    elapsed_seconds,
    read_failures,
    read_markers,
    record_failure,
    remove_marker,
)
from lofit.experiments.results import RESULTS, append_result, read_results, tuning_score
from lofit.methods.lofit.ranking import HeadRanking
from lofit.runs.config import CellConfig, RunConfig
from lofit.runs.data import RunData
from lofit.runs.pipeline import load_fresh, run_cell, run_eval, run_select
from lofit.tasks import TASKS, training_task_name
from lofit.tasks.transfer import SEPARATOR
from lofit.training.checkpoints import stage_progress
from lofit.training.loop import resolve_mixed_precision
from lofit.training.trackers import TrackerRun, TrackerSession, tracking
from lofit.utils.compute import ComputeConfig, hardware, resolve_device
from lofit.utils.distributed import broadcast_from_main, is_main_process

TRAIN_SECONDS = {"clutrr": 0.43, "mquake": 0.05, "truthfulqa": 0.55}
"""Rough seconds per training example and epoch, default model, 2 CPU cores (measured runs)."""
EVAL_SECONDS = {
    "clutrr": 0.22,
    "mquake": 0.11,
    "truthfulqa": 0.41,
    "nq_open": 0.12,
    "triviaqa": 0.14,
    "mmlu": 0.12,
    "mmlu_continuation": 0.12,
}
"""Rough seconds per evaluated example, default model, 2 CPU cores (the ood tasks: No-FT, one thread, bf16)."""


class ModelPool:
    """Loads each model once per process and lends it to cells, checked clean: the same
    number of hooks on every module as when it was loaded."""

    def __init__(self, load: Callable[[str, ComputeConfig], tuple] = load_fresh):
        self.load = load
        self.loaded: dict[tuple, tuple] = {}
        self.hooks: dict[tuple, list[int]] = {}

    def __call__(self, name: str, compute: ComputeConfig) -> tuple:
        key = (name, compute.dtype, compute.device, compute.device_map)
        if key not in self.loaded:
            self.loaded[key] = self.load(name, compute)
            self.hooks[key] = _hook_counts(self.loaded[key][0])
        model = self.loaded[key][0]
        if _hook_counts(model) != self.hooks[key]:
            raise RuntimeError(f"model {name} still carries an adapter's hooks from an earlier cell")
        return self.loaded[key]

    def total_heads(self, name: str, compute: ComputeConfig) -> int:
        config = self(name, compute)[0].config.get_text_config()
        return config.num_hidden_layers * config.num_attention_heads


def _hook_counts(model) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def primary_metric(summary: dict) -> str | None:
    """The summary key of the cell's main metric: the first its task names (``metric_keys``)."""
    keys = summary.get("metric_keys") or [None]
    return keys[0]


def example_scores(run_folder: Path, metric: str) -> list[float]:
    """Per-example scores of ``metric`` from a run folder's predictions.jsonl: the record's
    own field (mc1, mc2) when it has one, else its ``correct`` flag as 0/1."""
    name = metric.split("_", 1)[1]
    field = {"accuracy": "mc1"}.get(name, name)
    scores = []
    for line in (run_folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        scores.append(float(record[field] if field in record else record["correct"]))
    return scores


_DATA_OPTIONS = ("task", "fold", "all_pairs", "eval_file", "match", "data_dir", "train_size", "eval_split", "limit")
"""The options of a cell that decide which examples it reads (with its seed, the sample)."""


def _run_data(options: dict, needs: Collection[str], task_name: str | None = None) -> RunData:
    """The data a cell of ``options`` reads (of ``task_name`` in place of its task, e.g. its heads
    task), the splits named in ``needs`` read and checked now: the run's own :class:`RunData`."""
    values = {name: options.get(name) for name in _DATA_OPTIONS} | {"fold": str(options["fold"])}
    run = RunConfig(**values | {"all_pairs": bool(values["all_pairs"]), "task": task_name or options["task"]})
    return RunData(run, options["seed"], needs)


def _example_counts(options: dict) -> tuple[int, int]:
    """Training examples (the cell's sample) and evaluated examples (up to its ``limit``) of a
    cell of ``options``; read once per distinct value of its :data:`_DATA_OPTIONS` and seed (its
    ``data_dir`` as :func:`~lofit.data.files.resolve_data_dir` would choose it)."""
    counted = {name: options.get(name) for name in (*_DATA_OPTIONS, "seed")}
    if counted["data_dir"] is None:
        counted["data_dir"] = os.environ.get(DATA_ENV)
    return _counted_examples(tuple(counted.items()))


@functools.cache
def _counted_examples(counted: tuple[tuple[str, Any], ...]) -> tuple[int, int]:
    data = _run_data(dict(counted), needs=())
    return len(data.train_examples()), len(data.eval_examples())


def _training_examples(options: dict) -> int | None:
    """How many training examples the task of a cell of ``options`` has, where its default size
    is all of them (what :func:`~lofit.experiments.grid.measurement_key` needs to tell that a
    larger ``train_size`` samples the same); None for a task with a default size of its own."""
    task_class = TASKS.get(training_task_name(options["task"]))
    if task_class is None or task_class.default_train_size is not None:
        return None
    return _example_counts(options | {"train_size": None})[0]


def _measures(method: str, phase: str, options: dict) -> str:
    """:func:`~lofit.experiments.grid.measurement_key` of a cell, its task's training examples counted."""
    return measurement_key(method, phase, options, _training_examples(options))


def _rough_seconds(options: dict, method: str, phase: str, trains: bool) -> float:
    """The rough cost of a cell with ``options``: training examples x epochs at its task's
    training rate, plus evaluated examples at the evaluated task's rate (the default model on
    2 CPU cores)."""
    evaluated_task = options["task"].rpartition(SEPARATOR)[2]
    train, evaluated = _example_counts(options)
    rate = TRAIN_SECONDS.get(training_task_name(options["task"]), 0.27)
    if phase == "ranking":
        return train * options["select_epochs"] * rate
    epochs = options.get(f"{method}_epochs") or options["select_epochs"] + options["tune_epochs"]
    epochs = {"zero-shot": 0, "iti": 1, "repe": 1}.get(method, epochs)
    epochs = epochs if trains else 0
    return train * epochs * rate + evaluated * EVAL_SECONDS.get(evaluated_task, 0.15)


def _top_k(cell: Cell, total_heads: int) -> int:
    """K, the heads ``cell`` tunes out of the model's ``total_heads``: the top_k of its step-1 record."""
    return cell_config(cell, total_heads).lofit.num_heads_to_tune(total_heads)


EXPERIMENT_FIELDS = ("experiment", "description", "report", "finished_at")
"""The fields :meth:`Runner._record` sets from this grid: dropped from a record copied from a sibling folder."""


class Runner:
    """Runs (or lists) the cells of one grid into one experiment folder."""

    def __init__(
        self,
        grid: Grid,
        folder: str | Path,
        overrides: dict[str, Any] | None = None,
        tune: bool = False,
        pool: ModelPool | None = None,
        log: Callable[[str], None] = print,
        executor: Executor | None = None,
    ):
        """``executor`` runs the cells (default: one after another in this process, on ``pool``'s
        models); :meth:`run` closes it when it ends."""
        self.grid, self.folder, self.tune, self.log = grid, Path(folder), tune, log
        self.overrides = dict(overrides or {})
        self.pool = pool or ModelPool()
        self.executor = executor
        self.done = {record["key"]: record for record in read_results(self.folder)}
        self.shared = self._sibling_records()
        """The records of the experiments beside this one, by what they measure and phase: such cells
        are copied, not run."""
        self.failed: dict[str, str] = {}
        """The jobs (by key) that failed in this process's :meth:`run`, with their errors."""
        self.held: dict[str, dict] = {}
        """The jobs (by key) that this process's :meth:`run` left to another live driver running
        them, with that driver's marker, and the cells that wait for them."""
        if tune:
            check_tuning(grid)
        check_searches(grid, self.overrides, tune)
        checked: set[tuple] = set()
        for cell in self.trials() + self.test_cells():
            self._check_data(cell, checked)

    def searches(self) -> dict[tuple, Search]:
        """The tuning of every (task, label, point) so far, replayed from the recorded trials (none
        without tune). A ``TRAIN:EVAL`` task is tuned as TRAIN, on TRAIN's validation split: what it
        trains is TRAIN's adapter, and EVAL may have no validation split (:func:`tuning_group`)."""
        if not self.tune:
            return {}
        return {
            (task, arm.label, tuple(point.items())): search(self.grid, arm, task, point, self.overrides, self._score)
            for task in dict.fromkeys(training_task_name(task) for task in self.grid.tasks)
            for arm in self.grid.arms
            for point in self.grid.points()
        }

    def _score(self, cell: Cell) -> float | None:
        """A recorded trial's :func:`~lofit.experiments.results.tuning_score`, None when it has not run."""
        record = self.done.get(cell.key) or self._shared_cell(cell)
        if record is None:
            return None
        return tuning_score(record)

    def trials(self, searches: dict[tuple, Search] | None = None) -> list[Cell]:
        """Every tuning trial known so far (of ``searches``, else replayed now): each group's base
        grid and the extension trials due."""
        searches = searches if searches is not None else self.searches()
        return [cell for group in searches.values() for cell in group.cells]

    def test_cells(self, searches: dict[tuple, Search] | None = None) -> list[Cell]:
        return expand(self.grid, "test", self.overrides, self.chosen(searches))

    def chosen(self, searches: dict[tuple, Search] | None = None) -> dict[tuple, dict]:
        """The best trial per tuning group (:func:`~lofit.experiments.grid.tuning_group`) whose
        tuning has settled (of ``searches``, else replayed now)."""
        searches = searches if searches is not None else self.searches()
        return {group: dict(s.best.trial) for group, s in searches.items() if s.settled and s.best is not None}

    def pending_tuning(self) -> int:
        """How many tuning groups (:func:`~lofit.experiments.grid.tuning_group`) have not settled their tuning."""
        return sum(not s.settled for s in self.searches().values())

    def _check_data(self, cell: Cell, checked: set[tuple]) -> None:
        """The cell's training and evaluation rows, read and validated before any model loads,
        except those ``checked`` names already (training rows by the seed that samples them,
        evaluation rows by their data options alone); adds what it checks to ``checked``."""
        options = cell.config
        data = tuple((name, options.get(name)) for name in _DATA_OPTIONS)
        splits = [("train", options["seed"])] + ([] if cell.phase == "ranking" else [("eval", None)])
        for task_name in {options["task"], options.get("heads_task") or options["task"]}:
            for split, seed in splits:
                if (task_name, split, seed, data) not in checked:
                    _run_data(options, (split,), task_name)
                    checked.add((task_name, split, seed, data))

    # --- listing -----------------------------------------------------------------------

    def estimate(self, cell: Cell, trains: bool = True) -> tuple[float, bool]:
        """Seconds a cell should take (evaluation alone when not ``trains``: another cell trains
        its adapter), and whether they were measured. Its rough cost (:func:`_rough_seconds`:
        training examples x epochs, plus evaluated examples, at rates for the default model on
        2 CPU cores), scaled by measured over rough seconds of the finished cells (here or beside
        this experiment) of its method, task, phase, model and dtype on this hardware (or of
        unrecorded hardware) that trained or not alike and ran from the start (a resumed cell's
        seconds miss the steps before its checkpoint): so a 48-epoch trial is timed as 8 of the
        6-epoch ones, and a cell of another model is not timed by the default model's."""
        here = _machine(cell_hardware(cell))
        similar: list[tuple[float, float]] = []  # (measured, rough) seconds
        for r in [*self.shared.values(), *self.done.values()]:
            if (
                r.get("method") == cell.method
                and r.get("task") == cell.task
                and r.get("phase") == cell.phase
                and all(r.get("options", {}).get(name) == cell.config.get(name) for name in ("model", "dtype"))
                and _machine(r.get("hardware", here)) == here
                and (r.get("trained_by") is None) == trains
                and not r.get("resumed_steps")
            ):
                try:
                    similar.append((r["seconds"], _rough_seconds(r["options"], cell.method, cell.phase, trains)))
                except (KeyError, OSError, ValueError):  # options of an older lofit, data since moved: not timed by it
                    continue
        rough = _rough_seconds(cell.config, cell.method, cell.phase, trains)
        measured, rough_of_similar = sum(m for m, _ in similar), sum(r for _, r in similar)
        if not similar:
            return rough, False
        return (rough * measured / rough_of_similar if rough_of_similar > 0 else measured / len(similar)), True

    def listing(self) -> str:
        """Every cell with its key, state and estimated time, and the total still to run."""
        lines, remaining, timed, pending = [], 0.0, 0, 0
        cells = self.trials() + self.test_cells()
        trains = self._trainers(cells)
        shared = 0
        for cell in cells:
            finished = cell.key in self.done
            copied = not finished and self._shared_cell(cell) is not None
            seconds, measured = (0.0, False) if finished or copied else self.estimate(cell, cell.key in trains)
            remaining += seconds
            pending += not finished and not copied
            shared += copied
            timed += measured
            state = "done" if finished else "shared" if copied else f"~{seconds / 60:.0f} min"
            lines.append(f"{cell.key}  {state:>9}  {cell.describe()}")
        unsettled = self.pending_tuning()
        if unsettled:
            lines.append(
                f"(tuning of {unsettled} (task, arm, setting) groups has not settled: extension trials may be "
                "added beyond those listed once their trials have run; test cells use the best trial once "
                "tuning has settled, until then the untuned setting is listed)"
            )
        rankings = sum(r.get("phase") == "ranking" for r in self.done.values())
        summary = f"{len(cells)} cells, {len(cells) - pending - shared} done, "
        if shared:
            summary += f"{shared} measured by an experiment beside this one (copied when it runs), "
        summary += f"{rankings} step-1 rankings recorded; "
        if pending:
            summary += (
                f"about {remaining / 3600:.1f} h to go ({timed} of {pending} missing cells timed by finished cells "
                f"on this hardware, the others at a rough rate for the default model on 2 CPU cores)"
            )
        else:
            summary += "nothing to run"
        lines.append(summary)
        return "\n".join(lines)

    def status(self) -> str:
        """Every cell as done (with its time), running (elapsed, and the estimate left), failed
        (with the last line of its error) or waiting (estimated), from the files the driver keeps
        (:mod:`~lofit.experiments.progress`): readable while another process runs the experiment."""
        running, failures = read_markers(self.folder), read_failures(self.folder)
        counts = dict.fromkeys(("done", "shared", "running", "failed", "waiting"), 0)
        lines, left = [], 0.0
        cells = self.trials() + self.test_cells()
        trains = self._trainers(cells)
        for cell in cells:
            if cell.key in self.done:
                state, note = "done", f"{self.done[cell.key]['seconds'] / 60:.1f} min"
            elif (copied := self._shared_cell(cell)) is not None:
                state, note = "shared", f"measured in {copied['reused_from']}, copied when the experiment runs"
            elif cell.key in running:
                elapsed = elapsed_seconds(running[cell.key])
                estimate = self.estimate(cell, cell.key in trains)[0]
                left += max(0.0, estimate - elapsed)
                state, note = "running", f"{elapsed / 60:.1f} min, ~{max(0.0, estimate - elapsed) / 60:.0f} min left"
                note += self._progress(self.folder / "cells" / job_name(cell), running[cell.key])
            elif cell.key in failures:
                left += self.estimate(cell, cell.key in trains)[0]
                state, note = "failed", failures[cell.key]["error"].strip().splitlines()[-1]
            else:
                seconds = self.estimate(cell, cell.key in trains)[0]
                left += seconds
                state, note = "waiting", f"~{seconds / 60:.0f} min"
            counts[state] += 1
            lines.append(f"{cell.key}  {state:<8} {cell.describe()}: {note}")
        keys = {cell.key for cell in cells}
        for key, marker in running.items():  # step-1 rankings, which are not cells of the grid
            if key not in keys:
                progress = self._progress(self.folder / "rankings" / key, marker)
                lines.append(f"{key}  running  {marker['cell']}: {elapsed_seconds(marker) / 60:.1f} min{progress}")
        for key, failure in failures.items():
            if key not in keys and key not in self.done and key not in running:
                lines.append(f"{key}  failed   {failure['cell']}: {failure['error'].strip().splitlines()[-1]}")
        executors = sorted({marker["executor"] for marker in running.values()})
        lines.append(
            f"{len(cells)} cells: {counts['done']} done, "
            + (f"{counts['shared']} shared (copied when the experiment runs), " if counts["shared"] else "")
            + f"{counts['running']} running, {counts['failed']} failed "
            f"(retried by the next run), {counts['waiting']} waiting; about {left / 3600:.1f} h of cell time left"
            + (f" (running on {', '.join(executors)})" if executors else "")
        )
        return "\n".join(lines)

    @staticmethod
    def _progress(run_folder: Path, marker: dict) -> str:
        """ "; <stage> checkpointed at step N of M, ~T min of it left" for a running job's folder,
        from its newest checkpoints since the job (``marker``) started (nothing before the first)."""
        started = datetime.fromisoformat(marker["started_at"]).timestamp()
        progress = stage_progress(run_folder / "checkpoints", since=started)
        return f"; {progress.describe()}" if progress is not None else ""

    # --- running -----------------------------------------------------------------------

    def run(self) -> list[dict]:
        """Run every cell not yet in results.jsonl on the executor: the tuning trials, each
        extension trial as soon as the trials it follows from have run, and each group's test
        cells as soon as its tuning has settled (trials first whenever both wait: they decide
        what else runs); return all of this grid's records. A cell that fails is recorded in
        ``failures/results.jsonl`` (it runs again on the next run) and the others go on; the test
        cells of a group whose tuning cannot settle (a trial failed) do not run."""
        self.failed, self.held = {}, {}
        clear_stale_markers(self.folder)
        executor = self.executor or InlineExecutor(functools.partial(run_job, pool=self.pool))
        interrupted = True
        try:
            self._execute(self._ready, executor)
            interrupted = False
        finally:
            executor.close(cancel=interrupted)
        return [self.done[c.key] for c in self.trials() + self.test_cells() if c.key in self.done]

    def _ready(self, busy: set[str]) -> list[Cell]:
        """The cells that can run now, trials before tests: every trial known so far and the test
        cells of each settled group, less those recorded, failed or ``busy`` (taken in already:
        queued, waiting or running), after copying the ones a sibling experiment has measured (a
        copied trial may call for extension trials)."""
        while True:
            self._take_in_records()
            recorded = len(self.done)
            searches = self.searches()
            unsettled = {group for group, s in searches.items() if not s.settled}
            tests = [c for c in self.test_cells(searches) if tuning_group(c.task, c.label, c.point) not in unsettled]
            trials = self.trials(searches)
            cells = [
                c for c in trials + tests if c.key not in self.done and c.key not in self.failed and c.key not in busy
            ]
            left = self._copy_shared(cells)
            if len(self.done) == recorded:
                return left

    def _execute(self, ready: Callable[[set[str]], list[Cell]], executor: Executor) -> None:
        """Run the cells ``ready`` returns on ``executor``, asking it again after each job ends
        (what it adds joins the queue behind what waits already), each step-1 ranking they need
        first (once per key), and each cell whose adapter another cell trains after that cell;
        as many at once as the executor takes; where it takes fewer than wait, trials and
        rankings before test cells, each in the order they came."""
        queue: list[tuple[tuple[bool, int, int], Job]] = []  # (a test cell, order of arrival, ranking first)
        blocked: dict[str, list[tuple[int, Cell]]] = {}  # ranking or training cell key -> the cells waiting for it
        trainers: dict[str, str] = {}  # training key -> the key of the cell that trains it here
        admitted: set[str] = set()  # the keys of the cells taken from ``ready`` (run, running or waiting)
        order = itertools.count()

        def enqueue(index: int, cell: Cell, job: Job | None = None) -> None:
            """Queue ``job``: ``cell``'s own by default, behind every trial and ranking if a test
            cell; its step-1 ranking (which goes before it, with the trials)."""
            queue.append(((job is None and cell.phase == "test", index, 0 if job else 1), job or self._cell_job(cell)))

        def admit(cells: list[Cell]) -> None:
            for cell in cells:
                if cell.key not in admitted:
                    admitted.add(cell.key)
                    place(next(order), cell)

        def place(index: int, cell: Cell) -> None:
            """Queue ``cell`` (with its step-1 ranking first, if it needs one), or make it wait
            for the job that makes what it needs (a cell of a training key whose trainer has
            failed since trains it itself)."""
            trained = training_key(cell.method, cell.config) if cell.phase != "ranking" else None
            if trained is not None and self._trained_adapter(cell) is not None:
                enqueue(index, cell)
                return
            trainer = trainers.get(trained)
            if trainer is not None and trainer not in self.done and trainer not in self.failed:
                blocked.setdefault(trainer, []).append((index, cell))  # (a failed one's cells failed with it)
                return
            if cell.phase == "ranking":  # step 1 alone: its own ranking job, which later cells may wait for
                if cell.key not in blocked and self._needs_ranking(cell):
                    blocked[cell.key] = []
                    enqueue(index, cell, self._ranking_job(cell))
                return
            key = ranking_key(cell.config)
            if cell.method != "lofit" or cell.config["heads"] == "file" or key in self.done:
                enqueue(index, cell)
            elif key in self.failed:
                self._fail(
                    Job("cell", cell, self.folder, cell.key), f"its step-1 ranking {key} failed: {self.failed[key]}"
                )
                return  # not a trainer: a later cell of its training key meets the same failure
            elif key in blocked:
                blocked[key].append((index, cell))
            elif self._needs_ranking(cell):
                blocked[key] = [(index, cell)]
                enqueue(index, cell, self._ranking_job(cell))
            else:  # a sibling experiment's ranking, recorded just now
                enqueue(index, cell)
            if trained is not None:
                trainers[trained] = cell.key

        def fail_waiting(key: str, what: str, error: str) -> None:
            """Fail the cells waiting for ``key`` (a ranking, or the cell that trains their
            adapter), and in turn the cells waiting for those."""
            for _, cell in blocked.pop(key, []):
                self._fail(Job("cell", cell, self.folder, cell.key), f"{what} {key} failed: {error}")
                fail_waiting(cell.key, "the cell that trains its adapter,", error)

        admit(ready(admitted))
        running: dict[int, Job] = {}
        ids = itertools.count()
        try:
            while queue or running:
                queue.sort(key=lambda entry: entry[0])
                while queue and (executor.capacity is None or len(running) < executor.capacity):
                    job = queue.pop(0)[1]
                    if (holder := self._claim(job, executor.name)) is not None:
                        self._leave(job, holder, blocked)
                        continue
                    self._take_in_records()
                    if job.key in self.done:  # another driver of this folder recorded it since
                        remove_marker(self.folder, job.key)
                        self.log(f"[{job.key}] {job.describe()}: recorded by another driver meanwhile, not run again")
                        for index, cell in blocked.pop(job.key, []):
                            enqueue(index, cell)
                        continue
                    running[job_id := next(ids)] = job
                    self.log(f"[{job.key}] {job.describe()}")
                    executor.submit(job_id, job)
                if not running:  # every job handed out was another driver's
                    continue
                job_id, record, error = executor.wait()
                job = running.pop(job_id)
                remove_marker(self.folder, job.key)
                if error is None and job.key in self.done:  # a sibling recorded it meanwhile: copied, kept
                    self.log(
                        f"[{job.key}] recorded meanwhile by an experiment beside this one; this run's result dropped"
                    )
                elif error is None:
                    self._record(record)
                    for index, cell in blocked.pop(job.key, []):
                        enqueue(index, cell)
                else:
                    self._fail(job, error)
                    what = "its step-1 ranking" if job.kind == "ranking" else "the cell that trains its adapter,"
                    fail_waiting(job.key, what, error)
                admit(ready(admitted))
        finally:
            for job in running.values():  # interrupted: these jobs did not finish
                remove_marker(self.folder, job.key)  # the main process's only: no other process's pid is on it

    def _take_in_records(self) -> None:
        """Add the records that another driver of this folder has appended since they were read
        (the main process reads them, and tells the others)."""
        new = [r for r in read_results(self.folder) if r["key"] not in self.done] if is_main_process() else None
        for record in broadcast_from_main(new):
            self.done[record["key"]] = record

    def _claim(self, job: Job, executor: str) -> dict | None:
        """Mark ``job`` as this driver's (the main process marks, and tells the others); the
        marker of another live driver that runs it already, if one does."""
        holder = claim_marker(self.folder, job.key, job.describe(), executor) if is_main_process() else None
        return broadcast_from_main(holder)

    def _leave(self, job: Job, holder: dict, blocked: dict[str, list[tuple[int, Cell]]]) -> None:
        """Leave ``job`` to the other driver ``holder`` that runs it, and the cells waiting for
        it too: this run does not wait for another process's results."""
        self.held[job.key] = holder
        since = f" since {holder['started_at']}" if "started_at" in holder else ""
        self.log(
            f"[{job.key}] {job.describe()}: run by another driver (process {holder.get('pid')} on "
            f"{holder.get('host')}{since}); left to it. Run this command again once it has ended"
        )
        for _, cell in blocked.pop(job.key, []):
            self._leave(Job("cell", cell, self.folder, cell.key), holder, blocked)

    def _needs_ranking(self, cell: Cell) -> bool:
        """Whether the step-1 ranking of ``cell`` must be computed: not when this experiment has
        recorded it, nor when a sibling experiment has (its record is copied now, with this
        experiment's K as its top_k: step 1 does not depend on K)."""
        key = ranking_key(cell.config)
        if key in self.done:
            return False
        shared = self._shared_ranking(cell)
        if shared is None:
            return True
        self.log(f"[{key}] ranking reused from {shared['reused_from']}")
        self._record(shared | {"label": cell.label, "top_k": _top_k(cell, torch.tensor(shared["scores"]).numel())})
        return False

    def _ranking_job(self, cell: Cell) -> Job:
        return Job("ranking", cell, self.folder, f"ranking-{ranking_key(cell.config)}")

    def _trainers(self, cells: list[Cell]) -> set[str]:
        """The keys of the unfinished ``cells`` that would train their adapter: no finished cell,
        nor one before them in ``cells``, trains the same (the others are estimated as evaluation)."""
        seen, trainers = set(), set()
        for cell in cells:
            if cell.key in self.done or cell.key in self.failed:
                continue
            trained = training_key(cell.method, cell.config) if cell.phase != "ranking" else None
            if trained is not None and (trained in seen or self._trained_adapter(cell) is not None):
                continue
            trainers.add(cell.key)
            seen.add(trained)
        return trainers

    def _trained_adapter(self, cell: Cell) -> dict | None:
        """The adapter that a finished cell of this experiment trained as ``cell`` would (one
        training key), when its folder is still there: its cell's key, path, ranking and warnings."""
        trained = training_key(cell.method, cell.config)
        if trained is None:
            return None
        for record in self.done.values():
            if record.get("phase") in ("tune", "test") and not record.get("trained_by") and record.get("run_folder"):
                if training_key(record["method"], record["options"]) != trained:
                    continue
                path = Path(record["run_folder"]) / "adapter"
                if path.is_dir():
                    kept = {"ranking_key": record.get("ranking_key"), "warnings": record.get("warnings", [])}
                    return {"key": record["key"], "path": str(path)} | kept
        return None

    def _cell_job(self, cell: Cell) -> Job:
        """The job of a fit cell: the adapter to evaluate when another cell trained it, else (a
        LoFiT cell) its recorded ranking as a file (rebuilt from the record when the file is missing)."""
        name = job_name(cell)
        adapter = self._trained_adapter(cell)
        if adapter is not None:
            return Job("cell", cell, self.folder, name, tuning=self._tuning_fields(cell), adapter=adapter)
        ranking = None
        if cell.method == "lofit" and cell.config["heads"] != "file":
            record = self.done[ranking_key(cell.config)]
            path = self.folder / "rankings" / record["key"] / "head_ranking.json"
            if not path.is_file():
                HeadRanking.from_scores(torch.tensor(record["scores"])).save(path)
            ranking = {"key": record["key"], "seconds": record["seconds"], "path": str(path)}
        return Job("cell", cell, self.folder, name, ranking, self._tuning_fields(cell))

    def _fail(self, job: Job, error: str) -> None:
        """Record ``job`` as failed with ``error``; it runs again on the next run of the experiment."""
        self.log(f"[{job.key}] failed: {error.strip().splitlines()[-1]}")
        self.failed[job.key] = error
        cell = job.cell
        if is_main_process():
            record_failure(
                self.folder,
                {
                    "key": job.key,
                    "phase": "ranking" if job.kind == "ranking" else cell.phase,
                    "label": cell.label,
                    "task": cell.task,
                    "seed": cell.seed,
                    "method": cell.method,
                    "cell": job.describe(),
                    "error": error,
                    "experiment": self.grid.name,
                },
            )

    def _record(self, record: dict) -> None:
        record |= {
            "experiment": self.grid.name,
            "description": self.grid.description,
            "report": self.grid.report,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if is_main_process():
            append_result(self.folder, record)
        self.done[record["key"]] = record

    def _sibling_records(self) -> dict[tuple[str, str], dict]:
        """Every record of the experiment folders beside this one (same parent), by what it
        measures (:func:`~lofit.experiments.grid.measurement_key`) and phase, marked with
        ``reused_from``, its folder (relative to the working directory when this experiment's
        folder was given relative, so no machine's path enters the results); where two folders
        hold one, the first by name."""
        records: dict[tuple[str, str], dict] = {}
        here = self.folder.resolve()
        for results in sorted(here.parent.glob(f"*/{RESULTS}")):
            if results.parent.resolve() == here:
                continue
            sibling = str(results.parent if self.folder.is_absolute() else os.path.relpath(results.parent))
            for record in _measured(results):
                records.setdefault((record["measures"], record.get("phase")), record | {"reused_from": sibling})
        return records

    def _shared_ranking(self, cell: Cell) -> dict | None:
        """The step-1 ranking of ``cell`` if another experiment in a sibling folder recorded it
        (the experiments of one parent folder share step 1), as this experiment's record of it
        (its key and options), marked with where it came from. The siblings are read again on each
        call: one running beside this one may have recorded it since."""
        self.shared = self._sibling_records()
        options = _ranking_options(cell)
        record = self.shared.get((_measures("lofit", "ranking", options), "ranking"))
        if record is None:
            return None
        key = ranking_key(cell.config)
        kept = {k: v for k, v in record.items() if k not in EXPERIMENT_FIELDS and k != "measures"}
        here = {"key": key, "task": options["task"], "options": options}
        return kept | here | {"run_folder": str(self.folder / "rankings" / key)}

    def _shared_cell(self, cell: Cell) -> dict | None:
        """The record of a sibling experiment's trial or test cell that measures what ``cell``
        does, in the same phase, if any (a step-1 cell takes a sibling's ranking through
        :meth:`_needs_ranking`, with its own K)."""
        if cell.phase == "ranking":
            return None
        return self.shared.get((_measures(cell.method, cell.phase, cell.config), cell.phase))

    def _copy_shared(self, cells: list[Cell]) -> list[Cell]:
        """Record a copy of each of ``cells`` that a sibling experiment has measured (with this
        experiment's key, options, label, sweep point, trial and tuning fields, and the key of its
        own step-1 ranking, whose sibling record is copied too where there is one; its ``run_folder`` still the
        sibling's, so a test cell evaluates the adapter its trial trained there); return the
        others, to be run."""
        self.shared = self._sibling_records()
        left = []
        for cell in cells:
            record = None if cell.key in self.done else self._shared_cell(cell)
            if record is None:
                left.append(cell)
                continue
            self.log(f"[{cell.key}] {cell.describe()}: measured in {record['reused_from']}, copied")
            kept = {k: v for k, v in record.items() if k not in EXPERIMENT_FIELDS and k != "measures"}
            here = {"key": cell.key, "options": cell.config, "label": cell.label, "point": dict(cell.point)}
            here |= {"trial": dict(cell.trial)}
            if record.get("ranking_key"):  # this experiment's key of the ranking, recorded here as well
                here["ranking_key"] = ranking_key(cell.config)
                self._needs_ranking(cell)
            self._record(kept | here | self._tuning_fields(cell))
        return left

    def _tuning_fields(self, cell: Cell) -> dict:
        """What the report needs of a tuning trial: the option it extends (None for a base
        trial), its arm's base tune grid and the grid's extension cap."""
        if cell.phase != "tune":
            return {}
        arm = next(arm for arm in self.grid.arms if arm.label == cell.label)
        return {"extends": cell.extends, "tune_grid": arm.tune, "tune_extend": self.grid.tune_extend}


# --- the jobs, wherever they run --------------------------------------------------------


def job_name(cell: Cell) -> str:
    """The folder name of a fit cell's run under ``cells/``: phase, label and key."""
    return f"{cell.phase}-{cell.label}-{cell.key}".replace("/", "_")


@dataclass(frozen=True)
class Job:
    """One unit of work for an executor: a LoFiT step-1 ``ranking`` (for ``cell``), or a
    ``cell``, with what it needs from the driver (the recorded ranking: key, seconds, file)."""

    kind: str
    cell: Cell
    folder: Path
    name: str
    """The job's folder under ``rankings/`` or ``cells/``, and its tracker run's name."""
    ranking: dict | None = None
    tuning: dict = field(default_factory=dict)
    adapter: dict | None = None
    """For a cell whose adapter another cell trained: that cell's key, the adapter's path, its ranking's
    key and the warnings its training gave."""

    @property
    def key(self) -> str:
        return ranking_key(self.cell.config) if self.kind == "ranking" else self.cell.key

    def describe(self) -> str:
        if self.kind == "cell":
            return self.cell.describe()
        options = self.cell.config
        return f"ranking {options.get('heads_task') or self.cell.task} seed {self.cell.seed} ({options['heads']})"


_WORKER_POOL: list[ModelPool] = []


def run_job(job: Job, pool: ModelPool | None = None) -> dict:
    """Run ``job`` (in any process) and return its record, in one tracker run when the cell's
    ``report_to`` names trackers (grouped by experiment: ``<experiment folder>/trackers/<job name>``
    for TensorBoard). Without ``pool``, this process's own pool (created on first use) lends the model."""
    if pool is None:
        if not _WORKER_POOL:
            _WORKER_POOL.append(ModelPool())
        pool = _WORKER_POOL[0]
    cell = job.cell
    spec = TrackerRun(
        report_to=cell.config.get("report_to"),
        directory=job.folder / "trackers",
        project=cell.experiment,
        name=job.name,
        group=cell.experiment,
        config=cell.config | {"phase": "ranking" if job.kind == "ranking" else cell.phase, "label": cell.label},
    )
    with tracking(spec) as session:
        return _rank(job, pool, session) if job.kind == "ranking" else _fit(job, pool, session)


def _machine(hardware: str) -> str:
    """A record's hardware without its thread count: a driver's estimates use the cells its
    workers (one thread each with ``--workers``) timed on the same device."""
    return re.sub(r", \d+ threads?", "", hardware)


def cell_hardware(cell: Cell) -> str:
    """Where ``cell`` runs (in this process), in which autocast precision (``auto`` resolves per
    machine) and whether its training is compiled."""
    compute = cell_config(cell, total_heads=1).compute
    device = resolve_device(compute.device)
    compiled = ", compiled" if compute.compile else ""
    return f"{hardware(device)}, {resolve_mixed_precision(compute.mixed_precision, device)}{compiled}"


def _run_config(cell: Cell, output_dir: Path, pool: ModelPool) -> CellConfig:
    compute = cell_config(cell, total_heads=1).compute
    config = cell_config(cell, pool.total_heads(cell.config["model"], compute))
    resume = (output_dir / "checkpoints").is_dir() and (output_dir / "config.yaml").is_file()
    return replace(config, run=replace(config.run, output_dir=str(output_dir), resume=resume))


def _ranking_options(cell: Cell) -> dict[str, Any]:
    """The options of ``cell``'s step 1: its own, on its ``heads_task``, with no evaluation limit."""
    return cell.config | {"task": cell.config.get("heads_task") or cell.task, "limit": None}


@functools.lru_cache(maxsize=64)
def _measured_records(path: Path, size: int, modified: int) -> tuple[dict, ...]:
    """:func:`_measured` of one version (``size``, ``modified``) of the file at ``path``."""
    records = []
    for record in read_results(path.parent):
        try:
            measures = _measures(record["method"], record.get("phase", ""), record["options"])
        except Exception:  # a record of an older lofit, or not lofit's: only its own key
            measures = record.get("key")
        records.append(record | {"measures": measures})
    return tuple(records)


def _measured(results: Path) -> tuple[dict, ...]:
    """The records of a ``results.jsonl``, each with ``measures``, its
    :func:`~lofit.experiments.grid.measurement_key` (read again only when the file changed)."""
    try:
        stat = results.stat()
    except OSError:  # removed since the folder was listed
        return ()
    return _measured_records(results, stat.st_size, stat.st_mtime_ns)


def _rank(job: Job, pool: ModelPool, session: TrackerSession | None) -> dict:
    """Step 1 for ``job.cell`` (on its ``heads_task``): head_ranking.json in ``rankings/<key>/``, and its record."""
    cell, key = job.cell, job.key
    folder = job.folder / "rankings" / key
    ranking_cell = replace(cell, phase="ranking", options=tuple(sorted(_ranking_options(cell).items())))
    task = ranking_cell.config["task"]
    config = _run_config(ranking_cell, folder, pool)
    start, cpu_start = time.perf_counter(), time.process_time()
    ranking = run_select(config.run, config.lofit, config.compute, pool)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    top_k = _top_k(cell, len(ranking.order))
    if session is not None:
        session.log_summary({"localization": ranking.localization(top_k).to_json(), "select_seconds": seconds})
    return {
        "key": key,
        "phase": "ranking",
        "label": cell.label,
        "task": task,
        "seed": cell.seed,
        "method": "lofit",
        "selector": config.lofit.heads,
        "options": ranking_cell.config,
        "top_k": top_k,
        "scores": ranking.scores.tolist(),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "resumed_steps": metrics.get("resumed_steps", 0),
        "hardware": cell_hardware(cell),
        "warnings": metrics.get("warnings", []),
        "run_folder": str(folder),
    }


def _fit(job: Job, pool: ModelPool, session: TrackerSession | None) -> dict:
    """``job.cell`` through :func:`~lofit.runs.pipeline.run_cell` into ``cells/<job name>/`` (or,
    when another cell trained its adapter, that adapter through :func:`~lofit.runs.pipeline.run_eval`),
    and its record."""
    cell = job.cell
    options, key = cell.config, cell.key
    if job.ranking is not None:
        ranked = options | {"heads": "file", "heads_file": job.ranking["path"]}
        cell = replace(cell, options=tuple(sorted(ranked.items())))
    run_folder = job.folder / "cells" / job.name
    if job.adapter is not None:  # whatever an unfinished attempt left (one that trained, under other code) goes
        shutil.rmtree(run_folder, ignore_errors=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    config = _run_config(cell, run_folder, pool)
    if job.adapter is not None:
        summary = run_eval(config.run, Path(job.adapter["path"]), config.compute, models=pool)
    else:
        summary = run_cell(config, pool)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    shutil.rmtree(run_folder / "checkpoints", ignore_errors=True)
    split = options["eval_split"]
    metric = primary_metric(summary)
    metrics = {k.removeprefix(f"{split}_"): v for k, v in summary.items() if k.startswith(f"{split}_")}
    selected = summary.get("selected_heads")
    ranked = HeadRanking.load(job.ranking["path"]) if job.ranking is not None and selected else None
    if session is not None:
        if ranked is not None and "localization" not in summary:
            summary = summary | {"localization": ranked.localization(len(selected)).to_json()}
        session.log_summary(summary)
    ranking = job.ranking or {}
    trained_by = job.adapter or {}
    return {
        "key": key,
        "phase": cell.phase,
        **job.tuning,
        "label": cell.label,
        "task": cell.task,
        "seed": cell.seed,
        "method": cell.method,
        "point": dict(cell.point),
        "trial": dict(cell.trial),
        "options": options,
        "metric": metric.removeprefix(f"{split}_") if metric else None,
        "score": summary.get(metric),
        "metrics": metrics,
        "per_example": example_scores(run_folder, metric) if metric else [],
        "trained_parameters": summary.get("trained_parameters"),
        "selected_heads": selected,
        **({"zero_score_heads": ranked.zero_scored(selected)} if ranked is not None else {}),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "fit_seconds": summary.get("fit_seconds"),
        "resumed_steps": summary.get("resumed_steps", 0),
        "eval_seconds": summary.get("eval_seconds"),
        "hardware": cell_hardware(cell),
        "ranking_key": ranking.get("key") or trained_by.get("ranking_key"),
        "trained_by": trained_by.get("key"),
        "ranking_seconds": ranking.get("seconds"),
        "warnings": [*trained_by.get("warnings", []), *summary.get("warnings", [])],  # its training's too
        "run_folder": str(run_folder),
    }
