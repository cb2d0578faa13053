"""The experiment runner: every cell of a grid through :func:`lofit.runs.pipeline.run_cell`.

- Each finished cell is appended to ``results.jsonl`` at once (resolved configuration,
  metrics, per-example scores, trained parameters, wall time, seed); a rerun skips every
  cell whose key is already there, so a stopped experiment continues where it stopped (a
  cell stopped mid-training resumes from its newest checkpoint).
- Step-1 rankings are computed once per key of :func:`~lofit.experiments.grid.ranking_key`
  (task, seed, model, step-1 options), recorded as ``ranking`` lines, and handed to every
  LoFiT cell that needs them as ``--heads file --heads-file``. A ranking already recorded
  by another experiment folder beside this one (same parent) is copied, not recomputed.
- The model is loaded once per process (:class:`ModelPool`) and lent to each cell; each
  cell takes its adapter off again, which the pool checks before lending it out.
- With ``tune``, every arm's trials run first on the validation split with the first
  seed; where the best trial of a (task, arm, sweep point) sits at an edge of a numeric
  option's explored range, trials one log step beyond are added (:func:`~.grid.search`,
  recomputed from the recorded scores on a rerun). Once every group has settled, each
  group's best trial runs on test with every seed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lofit.data.files import resolve_data_dir
from lofit.experiments.grid import Cell, Grid, Search, cell_config, check_tuning, expand, ranking_key, search
from lofit.experiments.results import RESULTS, append_result, read_results
from lofit.methods.lofit.ranking import HeadRanking
from lofit.runs.pipeline import load_fresh, run_cell, run_select
from lofit.tasks import get_task
from lofit.training.loop import resolve_mixed_precision
from lofit.utils.compute import ComputeConfig, hardware, resolve_device
from lofit.utils.distributed import is_main_process

TRAIN_SECONDS = {"clutrr": 0.43, "mquake": 0.05, "truthfulqa": 0.55}
"""Rough seconds per training example and epoch, default model, 2 CPU cores (measured runs)."""
EVAL_SECONDS = {"clutrr": 0.22, "mquake": 0.11, "truthfulqa": 0.41}
"""Rough seconds per evaluated example, default model, 2 CPU cores."""


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


def _top_k(cell: Cell, total_heads: int) -> int:
    """K, the heads ``cell`` tunes out of the model's ``total_heads``: the top_k of its step-1 record."""
    return cell_config(cell, total_heads).lofit.num_heads_to_tune(total_heads)


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
    ):
        self.grid, self.folder, self.tune, self.log = grid, Path(folder), tune, log
        self.overrides = dict(overrides or {})
        self.pool = pool or ModelPool()
        self.done = {record["key"]: record for record in read_results(self.folder)}
        if tune:
            check_tuning(grid)
        for cell in self.trials() + self.test_cells():
            self._check_data(cell)

    def searches(self) -> dict[tuple, Search]:
        """The tuning of every (task, label, point) so far, replayed from the recorded trials (none without tune)."""
        if not self.tune:
            return {}
        return {
            (task, arm.label, tuple(point.items())): search(self.grid, arm, task, point, self.overrides, self._score)
            for task in self.grid.tasks
            for arm in self.grid.arms
            for point in self.grid.points()
        }

    def _score(self, cell: Cell) -> float | None:
        """A recorded trial's score (-inf when it has no main metric), None when it has not run."""
        record = self.done.get(cell.key)
        if record is None:
            return None
        return float("-inf") if record["score"] is None else record["score"]

    def trials(self) -> list[Cell]:
        """Every tuning trial known so far: each group's base grid and the extension trials due."""
        return [cell for group in self.searches().values() for cell in group.cells]

    def test_cells(self) -> list[Cell]:
        return expand(self.grid, "test", self.overrides, self.chosen())

    def chosen(self) -> dict[tuple, dict]:
        """The best trial per (task, label, point) whose tuning has settled."""
        return {group: dict(s.best.trial) for group, s in self.searches().items() if s.settled and s.best is not None}

    def pending_tuning(self) -> int:
        """How many (task, label, point) groups have not settled their tuning."""
        return sum(not s.settled for s in self.searches().values())

    def _check_data(self, cell: Cell) -> None:
        """The cell's training and evaluation rows, read and validated before any model loads."""
        options = cell.config
        for task_name in {options["task"], options.get("heads_task") or options["task"]}:
            task = get_task(
                task_name,
                fold=int(options["fold"]),
                all_pairs=options["all_pairs"],
                eval_file=options["eval_file"],
                match=options["match"],
            )
            data_dir = resolve_data_dir(options.get("data_dir")) if task.needs_data_dir else None
            size = options["train_size"] if options["train_size"] is not None else task.default_train_size
            task.sample_train(data_dir, size, options["seed"])
            if cell.phase != "ranking":
                task.eval_examples(data_dir, options["eval_split"])

    # --- listing -----------------------------------------------------------------------

    def estimate(self, cell: Cell) -> tuple[float, bool]:
        """Seconds a cell should take, and whether they were measured: the mean of finished
        cells of its method, task and phase on this hardware (or of unrecorded hardware),
        else a rough rate for the default model on 2 CPU cores."""
        here = self._hardware(cell)
        similar = [
            r["seconds"]
            for r in self.done.values()
            if r.get("method") == cell.method
            and r.get("task") == cell.task
            and r.get("phase") == cell.phase
            and r.get("hardware", here) == here
        ]
        if similar:
            return sum(similar) / len(similar), True
        options = cell.config
        task = get_task(
            options["task"], fold=int(options["fold"]), eval_file=options["eval_file"], match=options["match"]
        )
        data_dir = resolve_data_dir(options.get("data_dir")) if task.needs_data_dir else None
        size = options["train_size"] if options["train_size"] is not None else task.default_train_size
        train = len(task.sample_train(data_dir, size, options["seed"]))
        rate = TRAIN_SECONDS.get(options["task"], 0.27)
        if cell.phase == "ranking":
            return train * options["select_epochs"] * rate, False
        epochs = options.get(f"{cell.method}_epochs") or options["select_epochs"] + options["tune_epochs"]
        epochs = {"zero-shot": 0, "iti": 1, "repe": 1}.get(cell.method, epochs)
        evaluated = len(task.eval_examples(data_dir, options["eval_split"])[: options["limit"]])
        return train * epochs * rate + evaluated * EVAL_SECONDS.get(options["task"], 0.15), False

    def listing(self) -> str:
        """Every cell with its key, state and estimated time, and the total still to run."""
        lines, remaining, timed, pending = [], 0.0, 0, 0
        cells = self.trials() + self.test_cells()
        for cell in cells:
            finished = cell.key in self.done
            seconds, measured = (0.0, False) if finished else self.estimate(cell)
            remaining += seconds
            pending += not finished
            timed += measured
            state = "done" if finished else f"~{seconds / 60:.0f} min"
            lines.append(f"{cell.key}  {state:>9}  {cell.describe()}")
        unsettled = self.pending_tuning()
        if unsettled:
            lines.append(
                f"(tuning of {unsettled} (task, arm, setting) groups has not settled: extension trials may be "
                "added beyond those listed once their trials have run; test cells use the best trial once "
                "tuning has settled, until then the untuned setting is listed)"
            )
        rankings = sum(r.get("phase") == "ranking" for r in self.done.values())
        summary = f"{len(cells)} cells, {len(cells) - pending} done, {rankings} step-1 rankings recorded; "
        if pending:
            summary += (
                f"about {remaining / 3600:.1f} h to go ({timed} of {pending} missing cells timed by finished cells "
                f"on this hardware, the others at a rough rate for the default model on 2 CPU cores)"
            )
        else:
            summary += "nothing to run"
        lines.append(summary)
        return "\n".join(lines)

    # --- running -----------------------------------------------------------------------

    def run(self) -> list[dict]:
        """Run every cell not yet in results.jsonl: the tuning trials, extension trials included,
        until every group has settled, then the test cells; return all of this grid's records."""
        while todo := [cell for cell in self.trials() if cell.key not in self.done]:
            for cell in todo:
                self._run(cell)
        tests = self.test_cells()
        for cell in tests:
            self._run(cell)
        return [self.done[c.key] for c in self.trials() + tests if c.key in self.done]

    def _run(self, cell: Cell) -> None:
        if cell.key in self.done:
            return
        self.log(f"[{cell.key}] {cell.describe()}")
        record = self._ranking_record(cell) if cell.phase == "ranking" else self._fit(cell)
        self._record(record)

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

    def _compute(self, cell: Cell) -> ComputeConfig:
        return cell_config(cell, total_heads=1).compute

    def _hardware(self, cell: Cell) -> str:
        """Where ``cell`` runs and in which autocast precision (``auto`` resolves per machine)."""
        compute = self._compute(cell)
        device = resolve_device(compute.device)
        return f"{hardware(device)}, {resolve_mixed_precision(compute.mixed_precision, device)}"

    def _cell_config(self, cell: Cell, output_dir: Path):
        config = cell_config(cell, self.pool.total_heads(cell.config["model"], self._compute(cell)))
        resume = (output_dir / "checkpoints").is_dir() and (output_dir / "config.yaml").is_file()
        return replace(config, run=replace(config.run, output_dir=str(output_dir), resume=resume))

    def _ranking(self, cell: Cell) -> dict:
        """Step 1 for ``cell`` (on its ``heads_task``): head_ranking.json in ``rankings/<key>/``, and its record."""
        key = ranking_key(cell.config)
        folder = self.folder / "rankings" / key
        task = cell.config.get("heads_task") or cell.task
        ranking_cell = replace(
            cell, phase="ranking", options=tuple(sorted((cell.config | {"task": task, "limit": None}).items()))
        )
        config = self._cell_config(ranking_cell, folder)
        start = time.perf_counter()
        ranking = run_select(config.run, config.lofit, config.compute, self.pool)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        return {
            "key": key,
            "phase": "ranking",
            "label": cell.label,
            "task": task,
            "seed": cell.seed,
            "method": "lofit",
            "selector": config.lofit.heads,
            "options": ranking_cell.config,
            "top_k": _top_k(cell, len(ranking.order)),
            "scores": ranking.scores.tolist(),
            "seconds": time.perf_counter() - start,
            "hardware": self._hardware(cell),
            "run_folder": str(folder),
        }

    def _shared_ranking(self, key: str) -> dict | None:
        """A ranking with ``key`` recorded by another experiment in a sibling folder (the
        experiments of one parent folder share step 1), marked with where it came from."""
        for results in sorted(self.folder.parent.glob(f"*/{RESULTS}")):
            if results.parent.resolve() == self.folder.resolve():
                continue
            for record in read_results(results.parent):
                if record["key"] == key and record.get("phase") == "ranking":
                    return {
                        k: v
                        for k, v in record.items()
                        if k not in ("experiment", "description", "report", "finished_at")
                    } | {"reused_from": str(results.parent), "run_folder": str(self.folder / "rankings" / key)}
        return None

    def _ranking_record(self, cell: Cell) -> dict:
        """The step-1 record of ``cell``: a sibling experiment's when one has it (with this
        experiment's K as its top_k: step 1 does not depend on K), else computed now."""
        shared = self._shared_ranking(ranking_key(cell.config))
        if shared is None:
            return self._ranking(cell)
        self.log(f"  reused from {shared['reused_from']}")
        return shared | {"label": cell.label, "top_k": _top_k(cell, torch.tensor(shared["scores"]).numel())}

    def _ranking_file(self, cell: Cell) -> tuple[Path, dict]:
        """The cached ranking a LoFiT cell uses: this experiment's, a sibling experiment's, or
        computed and recorded now."""
        key = ranking_key(cell.config)
        if key not in self.done:
            self.log(
                f"[{key}] ranking {cell.config.get('heads_task') or cell.task} seed {cell.seed} "
                f"({cell.config['heads']})"
            )
            self._record(self._ranking_record(cell))
        record = self.done[key]
        path = self.folder / "rankings" / key / "head_ranking.json"
        if not path.is_file():  # rebuilt from the record alone
            HeadRanking.from_scores(torch.tensor(record["scores"])).save(path)
        return path, record

    def _tuning_fields(self, cell: Cell) -> dict:
        """What the report needs of a tuning trial: the option it extends (None for a base
        trial), its arm's base tune grid and the grid's extension cap."""
        if cell.phase != "tune":
            return {}
        arm = next(arm for arm in self.grid.arms if arm.label == cell.label)
        return {"extends": cell.extends, "tune_grid": arm.tune, "tune_extend": self.grid.tune_extend}

    def _fit(self, cell: Cell) -> dict:
        options, key = cell.config, cell.key
        ranking: dict = {}
        if cell.method == "lofit" and options["heads"] != "file":
            path, ranking = self._ranking_file(cell)
            cell = replace(cell, options=tuple(sorted((options | {"heads": "file", "heads_file": str(path)}).items())))
        run_folder = self.folder / "cells" / f"{cell.phase}-{cell.label}-{key}".replace("/", "_")
        start = time.perf_counter()
        summary = run_cell(self._cell_config(cell, run_folder), self.pool)
        seconds = time.perf_counter() - start
        shutil.rmtree(run_folder / "checkpoints", ignore_errors=True)
        split = options["eval_split"]
        metric = primary_metric(summary)
        metrics = {k.removeprefix(f"{split}_"): v for k, v in summary.items() if k.startswith(f"{split}_")}
        return {
            "key": key,
            "phase": cell.phase,
            **self._tuning_fields(cell),
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
            "selected_heads": summary.get("selected_heads"),
            "seconds": seconds,
            "fit_seconds": summary.get("fit_seconds"),
            "eval_seconds": summary.get("eval_seconds"),
            "hardware": self._hardware(cell),
            "ranking_key": ranking.get("key"),
            "ranking_seconds": ranking.get("seconds"),
            "warnings": summary.get("warnings", []),
            "run_folder": str(run_folder),
        }
