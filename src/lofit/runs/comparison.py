"""``lofit compare``: several methods on one task, one after another, as one table.

Each method runs exactly as ``lofit run --method NAME`` would, in its own sub-folder of
the comparison folder, with the same training examples, seed and batch size; trained
baselines get LoFiT's number of epochs (select + tune) unless told otherwise. The table
(``comparison.md``, and ``comparison.json`` with every metric) has, per method, its
trained parameters, its evaluation metrics and its wall times (fit, and total with
evaluation).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lofit.methods import get_method
from lofit.methods.lofit.config import LofitConfig
from lofit.runs.config import RunConfig
from lofit.runs.pipeline import run_all
from lofit.utils.atomic import write_json, write_text
from lofit.utils.compute import ComputeConfig
from lofit.utils.distributed import is_main_process


def _seconds(summary: dict, key: str) -> float:
    """A wall time of a run, summed over folds for ``--fold all``."""
    if "folds" in summary:
        return sum(fold.get(key, 0.0) for fold in summary["folds"])
    return summary.get(key, 0.0)


def comparison_table(summaries: list[dict]) -> str:
    """A markdown table: method, trained parameters, each metric (in %), fit and total wall time
    (marked "resumed" where training resumed from a checkpoint: the steps before it are not timed)."""
    metrics = summaries[0].get("metric_keys", [])  # the task's metrics, its main metric first
    header = ["method", "trained parameters", *[m.replace("_", " ") for m in metrics], "fit (s)", "total (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in summaries:
        parameters = summary.get("trained_parameters", summary.get("folds", [{}])[0].get("trained_parameters", 0))
        cells = [
            summary["method"],
            f"{parameters:,}",
            *[f"{100 * summary[m]:.1f}" for m in metrics],
            f"{_seconds(summary, 'fit_seconds'):.0f}" + (" (resumed)" if summary.get("resumed_steps") else ""),
            f"{_seconds(summary, 'total_seconds'):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_compare(
    run: RunConfig,
    lofit: LofitConfig,
    methods: list[str],
    method_configs: dict[str, object | None],
    compute: ComputeConfig | None = None,
) -> tuple[list[dict], Path]:
    """Run every method of ``methods`` on ``run``'s task; write and return the comparison."""
    if not methods:
        raise ValueError("name at least one method to compare")
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is named twice in {','.join(methods)}")
    for name in methods:
        get_method(name, method_configs.get(name))  # refuse an unknown method before anything runs
    folder = (
        Path(run.output_dir)
        if run.output_dir
        else Path(str(replace(run, method="lofit").resolved_output_dir()) + "-compare")
    )
    summaries = []
    for name in methods:  # the table is rewritten after each method, so a failure loses nothing finished
        summaries.append(
            run_all(replace(run, method=name, output_dir=str(folder / name)), lofit, method_configs.get(name), compute)
        )
        if is_main_process():
            write_json(folder / "comparison.json", summaries)
            write_text(folder / "comparison.md", comparison_table(summaries))
    return summaries, folder
