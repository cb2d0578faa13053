"""``lofit experiment``: the command-line options turned into a grid, overrides, an executor and a run."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from lofit.experiments.executors import EXECUTORS, Executor, LocalExecutor, RayExecutor, SlurmExecutor
from lofit.experiments.grid import Grid, grid_mapping, load_grid
from lofit.experiments.progress import FAILURES
from lofit.experiments.report import edge_warning, report_kind, write_report
from lofit.experiments.results import RESULTS
from lofit.experiments.runner import Runner, run_job
from lofit.training.trackers import check_trackers
from lofit.utils.distributed import is_main_process


def _list(text: str | None, kind: type = str) -> list | None:
    return [kind(item.strip()) for item in text.split(",") if item.strip()] if text else None


def _options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each value read as YAML (``0.05``, ``true``, ``bf16``)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option takes KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def configure(args: argparse.Namespace) -> tuple[Grid, dict[str, Any], Path]:
    """The grid with the command line's tasks, seeds and sweeps applied, the options for
    every cell, and the experiment folder."""
    if bool(args.name) == bool(args.grid):
        raise ValueError("name one experiment, or give --grid FILE (not both)")
    grid = load_grid(args.grid or args.name)
    report_kind(grid.report.get("kind"))  # a misspelt kind is refused before any cell runs
    grid.tasks = _list(args.tasks) or grid.tasks
    grid.seeds = _list(args.seeds, int) or grid.seeds
    for option, values in (("heads", _list(args.heads)), ("train_size", _list(args.train_size, int))):
        if values:
            if option not in grid.sweep:
                raise ValueError(
                    f"--{option.replace('_', '-')} applies to experiments that sweep {option}; {grid.name} does not"
                )
            grid.sweep[option] = values
    overrides = _options(args.option)
    overrides |= {
        k: v for k, v in (("model", args.model), ("limit", args.limit), ("data_dir", args.data_dir)) if v is not None
    }
    overrides["progress"] = args.progress
    if args.report_to:
        overrides["report_to"] = ",".join(args.report_to)
    check_trackers(overrides.get("report_to", grid.options.get("report_to")))
    model = Path(str(overrides.get("model", grid.options.get("model", "default")))).name.removesuffix(".gguf")
    folder = Path(args.output_dir) if args.output_dir else Path("runs") / "experiments" / f"{grid.name}-{model}"
    return grid, overrides, folder


def make_executor(args: argparse.Namespace, folder: Path) -> Executor | None:
    """The executor of ``--executor`` (None: the cells one after another in this process), its
    options checked: each option of one executor is refused with another."""
    if args.executor not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}; got {args.executor!r}")
    given = {
        "--workers": args.workers,
        "--cell-cpus": args.cell_cpus,
        "--cell-gpus": args.cell_gpus,
        "--ray-address": args.ray_address,
        "--slurm-partition": args.slurm_partition,
        "--slurm-time": args.slurm_time,
    }
    allowed = {
        "local": {"--workers"},
        "ray": {"--workers", "--cell-cpus", "--cell-gpus", "--ray-address"},
        "slurm": {"--workers", "--cell-cpus", "--cell-gpus", "--slurm-partition", "--slurm-time"},
    }[args.executor]
    refused = [option for option, value in given.items() if value is not None and option not in allowed]
    if refused:
        raise ValueError(f"{', '.join(refused)} do(es) not apply to --executor {args.executor}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1; got {args.workers}")
    if args.executor == "local":
        return LocalExecutor(run_job, args.workers) if args.workers and args.workers > 1 else None
    if args.executor == "ray":
        return RayExecutor(run_job, args.ray_address, args.cell_cpus or 1, args.cell_gpus or 0, capacity=args.workers)
    return SlurmExecutor(
        run_job,
        folder / "slurm",
        args.slurm_partition,
        args.slurm_time or 240,
        gpus=int(args.cell_gpus or 0),
        cpus=int(args.cell_cpus or 1),
        capacity=args.workers,
    )


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler ending the driver's job, ``kill``) handled like Ctrl-C for the ``with``
    block: the jobs in flight are cancelled and their running markers removed."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_experiment_command(args: argparse.Namespace) -> int:
    """``lofit experiment``: show the grid (``--show-grid``), list its cells (``--dry-run``), show
    progress (``--status``) or run; 1 when cells failed (they run again next time) or were left to
    another driver running them, else 0."""
    grid, overrides, folder = configure(args)
    looks = [
        name
        for name, given in (("--show-grid", args.show_grid), ("--dry-run", args.dry_run), ("--status", args.status))
        if given
    ]
    if len(looks) > 1:
        raise ValueError(f"give one of --show-grid, --dry-run and --status, not {' and '.join(looks)}")
    if looks and (args.executor != "local" or args.workers is not None):
        raise ValueError(f"{looks[0]} runs nothing: --executor and its options do not apply")
    if args.show_grid:
        print(
            yaml.safe_dump(grid_mapping(grid), sort_keys=False, allow_unicode=True, default_flow_style=None, width=100),
            end="",
        )
        return 0
    runner = Runner(grid, folder, overrides, tune=args.tune)
    if args.dry_run or args.status:
        print(runner.listing() if args.dry_run else runner.status())
        return 0
    runner.executor = make_executor(args, folder)
    with _terminate_as_interrupt():
        runner.run()
    if not is_main_process():
        return 0
    print(f"results: {folder / RESULTS}\nreport: {write_report(folder)}")
    if warning := edge_warning(folder):
        print(warning, file=sys.stderr)
    if runner.failed:
        print(
            f"{len(runner.failed)} cell(s) or step-1 ranking(s) failed (errors in {folder / FAILURES / RESULTS}); "
            "run the same command again to retry them"
        )
    if runner.held:
        print(
            f"{len(runner.held)} job(s) left to another driver that runs them (see `--status`); "
            "run the same command again once it has ended"
        )
    return 1 if runner.failed or runner.held else 0
