"""``lofit experiment``: the command-line options turned into a grid, overrides and a run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from lofit.experiments.grid import Grid, load_grid
from lofit.experiments.report import report_kind, write_report
from lofit.experiments.runner import Runner
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
    model = Path(str(overrides.get("model", grid.options.get("model", "default")))).name.removesuffix(".gguf")
    folder = Path(args.output_dir) if args.output_dir else Path("runs") / "experiments" / f"{grid.name}-{model}"
    return grid, overrides, folder


def run_experiment_command(args: argparse.Namespace) -> None:
    grid, overrides, folder = configure(args)
    runner = Runner(grid, folder, overrides, tune=args.tune)
    if args.dry_run:
        print(runner.listing())
        return
    runner.run()
    if is_main_process():
        print(f"results: {folder / 'results.jsonl'}\nreport: {write_report(folder)}")
