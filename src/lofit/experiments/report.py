"""An experiment's report, rebuilt from ``results.jsonl`` alone.

``report.md`` has one row per (task, arm, sweep point): the mean and the standard
deviation (sample, n - 1; 0 for one seed) over seeds of every metric, in %, the best mean
of each task in bold, the trained parameters and the mean wall time, under a header that
states each arm's training budget; then the experiment's own section (cross-task matrix,
layer histograms, curves), every row against the grid's reference row (``compare_to``, with
the paired bootstrap test), and the tuning: per (task, arm, sweep point) the chosen values,
where each sits in the range explored (an unexplored edge marked), the trials used (base +
extension) and the validation examples per trial, then every trial.
``report.csv`` holds the same rows; each figure is one PNG.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from lofit.experiments.bootstrap import BootstrapResult, paired_bootstrap_over_seeds
from lofit.experiments.grid import (
    EDGE_BOUND,
    EDGE_CAP,
    EDGE_PENDING,
    EXTENDED_INSIDE,
    FLAT,
    INSIDE,
    NO_EFFECT,
    Arm,
    admissible,
    all_tied,
    chooses_nothing,
    edge_step,
    flat_step,
    on_option_line,
    option_line,
    same_value,
    tied_on_line,
)
from lofit.experiments.results import read_results, tuning_score
from lofit.methods.lofit.config import selection_bias_lr_option
from lofit.methods.lofit.localization import NEAR_ZERO, Localization
from lofit.methods.lofit.ranking import HeadRanking
from lofit.runs.plots import curves, layer_histograms, matrix_plot
from lofit.utils.atomic import write_text


def _point(record: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in record.get("point", {}).items())


def _setting(trial: dict) -> str:
    """A tuned setting as ``option=value, ...``."""
    return ", ".join(f"{k}={v}" for k, v in trial.items())


def _point_and_trial(point: str, trial: dict) -> str:
    """A row's sweep point and its tuned setting, as the results table names them: "point; trial"."""
    return "; ".join(filter(None, [point, _setting(trial)]))


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


UNRECORDED_HARDWARE = "not recorded"
"""What reports say for records written before results named their hardware."""


def _paired(runs: dict[int, dict], base: dict[int, dict]) -> BootstrapResult | str:
    """The paired bootstrap test of one row's test records (by seed) against another's
    (:func:`paired_bootstrap_over_seeds` on their per-example scores), or why they cannot be paired."""
    try:
        return paired_bootstrap_over_seeds(
            *({seed: record.get("per_example") or [] for seed, record in row.items()} for row in (runs, base))
        )
    except ValueError as error:
        return str(error)


def _interval(test: BootstrapResult) -> str:
    """A test's difference and 95% interval in points: "+d [+low, +high]"."""
    return f"{100 * test.difference:+.1f} [{100 * test.low:+.1f}, {100 * test.high:+.1f}]"


def _minutes(members: list[dict]) -> str:
    """Mean minutes per run, per hardware when the runs of one row ran on different hardware
    (a GPU's minutes and a CPU's do not average), of the runs that trained their adapter from
    the start; failing those, of the runs that resumed their training from a checkpoint
    (``resumed_steps``: their wall times miss the steps before it); failing those, of the runs
    that evaluated another cell's adapter (``trained_by``); the row says which it shows. Records
    written before ``resumed_steps`` existed count as trained from the start."""
    trained = [record for record in members if not record.get("trained_by")]
    whole = [record for record in trained if not record.get("resumed_steps")]
    if whole:
        counted, note = whole, ""
    elif trained:
        counted, note = trained, " (resumed from a checkpoint: the steps before it are not counted)"
    else:
        counted, note = members, " (evaluation only: another cell trained the adapter)"
    by_hardware: dict[str, list[float]] = defaultdict(list)
    for record in counted:
        by_hardware[record.get("hardware", UNRECORDED_HARDWARE)].append(record["seconds"] / 60)
    if len(by_hardware) == 1:
        return f"{statistics.fmean(next(iter(by_hardware.values()))):.1f}{note}"
    return "; ".join(f"{statistics.fmean(m):.1f} on {name}" for name, m in sorted(by_hardware.items())) + note


def summarize(records: list[dict]) -> list[dict]:
    """One row per (task, label, sweep point) of the test records, in :func:`_grid_order`."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        if record.get("phase") == "test":
            groups[(record["task"], record["label"], json.dumps(record.get("point", {}), sort_keys=True))].append(
                record
            )
    rows = []
    for (task, label, _), members in groups.items():
        metric_names = [m for m in members[0]["metrics"] if m != "num_examples"]
        row = {
            "task": task,
            "label": label,
            "point": _point(members[0]),
            "point_values": members[0].get("point", {}),
            "method": members[0]["method"],
            "metric": members[0]["metric"],
            "seeds": sorted(r["seed"] for r in members),
            "trained_parameters": members[0].get("trained_parameters"),
            "minutes": _minutes(members),
            "examples": members[0]["metrics"].get("num_examples"),
            "trial": members[0].get("trial", {}),
        }
        for name in metric_names:
            row[name] = _stats([r["metrics"][name] for r in members])
        rows.append(row)
    return sorted(rows, key=_grid_order(rows, "point_values"))


def _grid_order(items: list[dict], point_field: str) -> Callable[[dict], tuple]:
    """A sort key for report rows or records (``point_field`` holds the sweep point's dict).
    Cells of a resumed experiment finish out of grid order, so items are grouped by task, then
    by arm (each in order of first appearance), then ordered by numeric sweep point as on the
    curves (train size 10 before 100); other points (head selectors, source tasks) follow the
    numbers in their order of first appearance. Sorting is stable: ties keep their order."""

    def first_appearance(values) -> dict:
        return {value: index for index, value in enumerate(dict.fromkeys(values))}

    task_order, label_order = first_appearance(x["task"] for x in items), first_appearance(x["label"] for x in items)
    other_points = first_appearance(json.dumps(x.get(point_field, {}), sort_keys=True) for x in items)

    def key(item: dict) -> tuple:
        point = item.get(point_field, {})
        try:  # the curves' x values: train sizes, % of heads ("all" = 100)
            point_order = (0, [_x_value(value, name) for name, value in point.items()])
        except ValueError:  # head selectors, source tasks
            point_order = (1, [other_points[json.dumps(point, sort_keys=True)]])
        return task_order[item["task"]], label_order[item["label"]], point_order

    return key


def _table(rows: list[dict]) -> tuple[str, str]:
    """The markdown table and the CSV of ``rows``."""
    metrics = list(dict.fromkeys(m for row in rows for m in row if isinstance(row.get(m), tuple)))
    best = {
        (task, m): max(row[m][0] for row in rows if row["task"] == task and m in row)
        for task in {r["task"] for r in rows}
        for m in metrics
        if any(m in r and r["task"] == task for r in rows)
    }
    header = [
        "task",
        "arm",
        "setting",
        *[f"{m.replace('_', ' ')} (%)" for m in metrics],
        "seeds",
        "trained parameters",
        "minutes / run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "task",
            "arm",
            "method",
            "setting",
            "tuned",
            *[f"{m}_{s}" for m in metrics for s in ("mean", "std")],
            "seeds",
            "trained_parameters",
            "minutes_per_run",
            "examples",
        ]
    )
    for row in rows:
        cells = []
        for m in metrics:
            if m not in row:
                cells.append("")
                continue
            text = f"{100 * row[m][0]:.1f}" + (f" ± {100 * row[m][1]:.1f}" if len(row["seeds"]) > 1 else " (1 seed)")
            cells.append(f"**{text}**" if len(rows) > 1 and row[m][0] == best[(row["task"], m)] else text)
        setting = _point_and_trial(row["point"], row["trial"])
        parameters = f"{row['trained_parameters']:,}" if row["trained_parameters"] is not None else ""
        lines.append(
            "| "
            + " | ".join(
                [
                    row["task"],
                    row["label"],
                    setting,
                    *cells,
                    ",".join(map(str, row["seeds"])),
                    parameters,
                    row["minutes"],
                ]
            )
            + " |"
        )
        writer.writerow(
            [
                row["task"],
                row["label"],
                row["method"],
                row["point"],
                json.dumps(row["trial"]),
                *[f"{row[m][i]:.6f}" if m in row else "" for m in metrics for i in (0, 1)],
                " ".join(map(str, row["seeds"])),
                row["trained_parameters"],
                row["minutes"],
                row["examples"],
            ]
        )
    return "\n".join(lines) + "\n", buffer.getvalue()


def _group_key(record: dict) -> tuple:
    return record["task"], record["label"], json.dumps(record.get("point", {}), sort_keys=True)


def split_superseded_tests(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """``records`` without the test runs of superseded choices, and those runs. A test run is
    superseded when its tuned setting (``trial``) is not the current choice (:func:`_best`) of
    the tuning trials of its task, arm and sweep point: it tested the choice of a grid that an
    extension trial has since beaten. Averaging it with the new choice's runs would mix two
    settings under one row."""
    chosen = {group: _best(members)["trial"] for group, members in _tuning_groups(records).items()}
    current, superseded = [], []
    for r in records:
        group = _group_key(r) if r.get("phase") == "test" else None
        stale = group in chosen and r.get("trial", chosen[group]) != chosen[group]
        (superseded if stale else current).append(r)
    return current, superseded


def _superseded_note(superseded: list[dict]) -> str:
    """One line per superseded setting: which test runs the report leaves out, and why."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in superseded:
        groups[(*_group_key(r), json.dumps(r["trial"], sort_keys=True))].append(r)
    lines = [
        f"Left out: {len(superseded)} test runs of choices that a later tuning trial superseded "
        "(kept in results.jsonl):",
        "",
    ]
    for members in groups.values():
        r = members[0]
        setting = _setting(r["trial"])
        scores = ", ".join(f"seed {m['seed']}: {100 * m['score']:.1f}" for m in members if m.get("score") is not None)
        lines.append(f"- {r['task']}, {r['label']}, {_point(r) or 'no sweep point'}, {setting}: {scores}")
    return "\n".join(lines) + "\n"


def _unselected_note(records: list[dict]) -> str:
    """One line per test run whose step 1 kept fewer heads than it trained (``zero_score_heads``),
    or "" when there is none: the rest of its K heads scored exactly 0 and were filled in index
    order, so its row measures no selection on that seed. (The tuning refuses such trials, but it
    judges the first seed only.)"""
    flagged = [r for r in records if r.get("phase") == "test" and r.get("zero_score_heads")]
    if not flagged:
        return ""
    lines = [
        f"Not a selection: {len(flagged)} test runs trained heads that their step 1 scored exactly 0 "
        "(it kept fewer than K heads; the rest were filled in index order):",
        "",
    ]
    for r in sorted(flagged, key=_grid_order(flagged, "point")):
        setting = _point_and_trial(_point(r), r.get("trial", {})) or "no sweep point"
        lines.append(
            f"- {r['task']}, {r['label']}, {setting}, seed {r['seed']}: "
            f"{r['zero_score_heads']} of its {len(r['selected_heads'])} heads"
        )
    return "\n".join(lines) + "\n"


def _tuning_groups(records: list[dict]) -> dict[tuple, list[dict]]:
    """The tuning trials of ``records`` per (task, arm, sweep point), each group in the order of
    ``records``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("phase") == "tune":
            groups[_group_key(r)].append(r)
    return groups


def _best(trials: list[dict]) -> dict:
    """The chosen trial of one group: the highest :func:`~lofit.experiments.results.tuning_score`,
    the earlier trial on a tie in the order of its search (:func:`~lofit.experiments.grid.search`):
    base trials in the order of their grid (:meth:`~lofit.experiments.grid.Arm.trials` of the
    recorded ``tune_grid``; as recorded where there is none), then extension trials as recorded."""
    tune_grid = next((r["tune_grid"] for r in trials if r.get("tune_grid")), {})
    base = Arm(label="", method="", tune=tune_grid).trials()

    def search_order(record: dict) -> tuple[bool, int]:
        trial = record.get("trial", {})
        if record.get("extends") is not None:
            return True, 0
        return False, base.index(trial) if trial in base else len(base)

    ordered = sorted(trials, key=search_order)
    scores = [tuning_score(r) for r in ordered]
    return ordered[scores.index(max(scores))]


UNEXPLORED = (EDGE_CAP, EDGE_PENDING)
"""Positions at an edge beyond which a value could have been tried but was not: marked in bold."""


def _unselected_neighbours(trials: list[dict], best: dict, option: str) -> list[str]:
    """The sides ("below", "above") of ``best``'s value of ``option`` whose nearest trial on the
    line through ``best`` along ``option`` (the trials whose other tuned values are ``best``'s)
    kept fewer than K heads in step 1 (``zero_score_heads``, so not eligible): on such a side the
    value beats a run that selected no K heads, and the best selection may lie between the two."""
    value, sides = best["trial"][option], []
    line = [r for r in trials if option in r.get("trial", {}) and on_option_line(r["trial"], best["trial"], option)]
    for side, beyond in (("below", lambda v: v < value), ("above", lambda v: v > value)):
        neighbours = [r for r in line if beyond(r["trial"][option])]
        if neighbours:
            nearest = min(neighbours, key=lambda r: abs(r["trial"][option] - value))
            if nearest.get("zero_score_heads"):
                sides.append(side)
    return sides


def _positions(trials: list[dict], best: dict) -> list[tuple[str, object, str | None, list[str]]]:
    """Each tuned option of ``best`` as (option, value, where the value sits in its group's
    explored range, :func:`~lofit.experiments.grid.edge_step`, the sides on which that position
    rests on a trial that kept fewer than K heads, :func:`_unselected_neighbours`); trials
    recorded before edge extension (no ``tune_grid``) count their explored values as the base
    grid and a cap of 0. In a group whose trials all scored the same, each position is
    :func:`~lofit.experiments.grid.flat_step`'s."""
    positions = []
    tried, scores = [r.get("trial", {}) for r in trials], [tuning_score(r) for r in trials]
    flat = len(trials) > 1 and all_tied(scores)
    cap = max(r.get("tune_extend", 0) for r in trials)  # a raised cap is in the newer records
    for option, value in best.get("trial", {}).items():
        explored = [trial[option] for trial in tried if option in trial]
        base = best.get("tune_grid", {}).get(option, sorted(set(explored), key=explored.index))

        def accepts(new: object, option: str = option) -> bool:
            return admissible(best["method"], best.get("options", {}) | {option: new})

        if chooses_nothing(option, best.get("options", {})):
            position = NO_EFFECT
        elif flat:
            position, _ = flat_step(option, base, explored, cap, accepts)
        else:
            line, tied = option_line(tried, best["trial"], option), tied_on_line(tried, scores, best["trial"], option)
            position, _ = edge_step(option, base, explored, value, cap, accepts, line, tied)
        unselected = _unselected_neighbours(trials, best, option) if position in (INSIDE, EXTENDED_INSIDE) else []
        positions.append((option, value, position, unselected))
    return positions


def _marked(option: str, value: object, position: str | None, unselected: list[str]) -> str:
    """``option=value`` with its position, in bold where it is an unexplored edge, and the sides
    whose neighbouring trial kept fewer than K heads."""
    if unselected:
        position = f"{position}; the trial {' and '.join(unselected)} kept fewer than K heads"
    mark = f" (**{position}**)" if position in UNEXPLORED else f" ({position})" if position else ""
    return f"{option}={value}{mark}"


def unexplored_edges(records: list[dict]) -> list[str]:
    """The tuned choices of ``records`` that sit at an edge beyond which a value could have been
    tried but was not (:data:`UNEXPLORED`), one line each: task, arm, setting, option, value, position."""
    found = []
    for trials in _tuning_groups(records).values():
        best = _best(trials)
        for option, value, position, _ in _positions(trials, best):
            if position in UNEXPLORED:
                setting = _point(best) or "no sweep point"
                found.append(f"{best['task']}, {best['label']}, {setting}: {option}={value} ({position})")
    return found


def edge_warning(folder: Path) -> str:
    """A warning naming every tuned choice of ``folder``'s results at an unexplored edge
    (:func:`unexplored_edges`), or "" when there is none: such a choice is not an optimum."""
    edges = unexplored_edges(read_results(folder))
    if not edges:
        return ""
    return (
        f"warning: {len(edges)} tuned choice(s) sit at an unexplored edge of their range, so they are not "
        "known optima (run the experiment on with --tune to extend them; a cap is raised with tune_extend):\n"
        + "\n".join(f"  - {edge}" for edge in edges)
    )


def _tuning_summary(groups: dict[tuple, list[dict]]) -> str:
    """One row per (task, arm, point): the chosen values and their positions, the trials used, the examples."""
    lines = [
        "## Tuning (validation split)",
        "",
        "Per (task, arm, setting): the chosen trial (the highest validation score, the earlier trial on a tie) "
        "and where each tuned value sits in the range explored, judged along the line through the chosen trial "
        "(the trials whose other tuned values are the chosen trial's): *inside* the base grid's range, with a "
        "trial on each side of it on that line, both beaten (trials tied with it are passed over: a plateau "
        "counts as inside only where a lower trial lies beyond each of its ends); *inside after extension* "
        "(the same, after trials "
        f"beyond the base grid were added); **{EDGE_CAP}**: at an edge left unexplored because the extension cap "
        f"(`tune_extend`) was reached; *{EDGE_BOUND}*: at an edge beyond which the option takes no value (an "
        f"integer below 1, a fraction of heads of 1 or more); **{EDGE_PENDING}**: a trial on that line is due "
        "but has not run (one log step beyond an edge, or a value tried elsewhere but not at the chosen trial's "
        f"other values); *{FLAT}*: every trial of the group scored the same, so no value beats another, and each "
        "option was extended on both sides to the cap or a bound (the first trial is chosen); "
        f"*{NO_EFFECT}*: a step-1 option where every head is selected, so its value chooses nothing. An inside value "
        "whose nearest trial on a side kept fewer than K heads in step 1 says "
        "so: on that side it beat a run that selected no K heads, not a selection, and the best selection may lie "
        "between the two."
        + (
            " Trials recorded before edge extension existed (no tune grid in their records) were never extended: "
            f"their edges count as {EDGE_CAP}."
            if any("tune_grid" not in t[0] for t in groups.values())
            else ""
        ),
        "",
        "| task | arm | setting | chosen (position in the explored range) | score (%) | trials (base + extension) "
        "| validation examples |",
        "|---|---|---|---|---|---|---|",
    ]
    per_arm: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for trials in groups.values():
        best, extensions = _best(trials), sum(r.get("extends") is not None for r in trials)
        per_arm[best["label"]][0] += len(trials) - extensions
        per_arm[best["label"]][1] += extensions
        score = "" if best.get("score") is None else f"{100 * best['score']:.1f}"
        chosen = ", ".join(_marked(*position) for position in _positions(trials, best))
        lines.append(
            f"| {best['task']} | {best['label']} | {_point(best)} | {chosen} | "
            f"{score} | {len(trials) - extensions} + {extensions} | {best['metrics'].get('num_examples')} |"
        )
    lines += [
        "",
        "Trials per arm (base + extension, over every task and setting): "
        + "; ".join(f"{label} {base} + {extra}" for label, (base, extra) in per_arm.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def _tuning(records: list[dict]) -> str:
    """The tuning summary, then every trial (extension trials name the option they extend)."""
    trials = [r for r in records if r.get("phase") == "tune"]
    if not trials:
        return ""
    trials.sort(key=_grid_order(trials, "point"))
    lines = [
        "## Tuning trials (validation split)",
        "",
        "| task | arm | setting | trial | score (%) | examples | extends |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in trials:
        trial = _setting(r["trial"])
        score = "" if r.get("score") is None else f"{100 * r['score']:.1f}"
        if zeros := r.get("zero_score_heads"):
            score += f" (not eligible: {zeros} of its {len(r['selected_heads'])} heads scored 0 in step 1)"
        lines.append(
            f"| {r['task']} | {r['label']} | {_point(r)} | {trial} | {score} | "
            f"{r['metrics'].get('num_examples')} | {r.get('extends') or ''} |"
        )
    return _tuning_summary(_tuning_groups(trials)) + "\n" + "\n".join(lines) + "\n"


def _epochs(record: dict) -> tuple[str, str]:
    """The training epochs of one run, in words: the count, and what follows it."""
    options, method = record.get("options", {}), record["method"]
    if record.get("phase") == "ranking":
        return str(options.get("select_epochs")), " (step 1 alone)"
    if method == "lofit":
        trained = "A and v" if options.get("tune_scales") else "the biases"
        return str(
            options["tune_epochs"]
        ), f" (step 2, {trained}) + {options['select_epochs']} of step 1 spent choosing the heads"
    if f"{method}_epochs" in options:
        return str(options[f"{method}_epochs"] or options["select_epochs"] + options["tune_epochs"]), ""
    return "none", " (fitted to the training data)" if method in ("iti", "repe") else ""


def _one_of(counts: list[str]) -> str:
    """``["3", "6", "12"]`` as "3, 6 or 12" (numbers in increasing order)."""
    ordered = sorted(counts, key=lambda count: (not count.isdigit(), int(count) if count.isdigit() else 0, count))
    return ordered[0] if len(ordered) == 1 else f"{', '.join(ordered[:-1])} or {ordered[-1]}"


def _budgets(records: list[dict]) -> str:
    """Each arm's training epochs as run (its test runs, else its trials, else its step-1 rankings),
    the counts of runs that differ only in them listed once ("3, 6 or 12 (step 2, ...)"), and
    "(tuned)" where the epochs were a tuned option."""
    phases = ("test", "tune", "ranking")
    by_label: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=lambda r: phases.index(r["phase"]) if r.get("phase") in phases else len(phases)):
        if r.get("phase") in phases and "options" in r and "label" in r:
            by_label[r["label"]][r["phase"]].append(r)
    texts = []
    for label, runs_of in by_label.items():
        runs = next(runs_of[phase] for phase in phases if runs_of[phase])
        tuned = any(k.endswith("_epochs") for r in runs for k in r.get("trial", {}))
        counts_of: dict[str, list[str]] = defaultdict(list)
        for count, words in map(_epochs, runs):
            if count not in counts_of[words]:
                counts_of[words].append(count)
        budget = " or ".join(f"{_one_of(counts)}{words}" for words, counts in counts_of.items())
        texts.append(f"{label}: {budget}{' (tuned)' if tuned else ''}")
    return "Training budgets (epochs over the training set): " + "; ".join(texts) + "." if texts else ""


def cross_task(records: list[dict], folder: Path) -> str:
    """The matrix of LoFiT's primary metric with heads from task X (rows) tuned on task Y
    (columns), minus the diagonal cell of Y (heads from Y itself), in points; each
    off-diagonal cell with the paired bootstrap test against its diagonal over the seeds the
    two cells share (whole examples resampled, :func:`paired_bootstrap_over_seeds`)."""
    tests = [r for r in records if r.get("phase") == "test"]
    if not tests:  # only tuning trials so far: no matrix yet
        return ""
    by_cell: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in tests:
        by_cell[(r["point"].get("heads_task") or r["task"], r["task"])][r["seed"]] = r
    tasks = list(dict.fromkeys([t for pair in by_cell for t in pair]))
    lines = [
        "## Cross-task transfer: heads from task X (rows), biases tuned on task Y (columns)",
        "",
        "Cells: the metric's change in points against heads selected on Y itself (the diagonal shows its absolute "
        "value); "
        "p: paired bootstrap test over the seeds both cells ran (whole examples resampled), 10,000 resamples.",
        "",
        "| heads from \\ tuned on | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    matrix = []
    for x in tasks:
        cells, values = [], []
        for y in tasks:
            runs, diagonal = by_cell.get((x, y), {}), by_cell.get((y, y), {})
            if not runs:
                cells.append("missing")
                values.append(None)
                continue
            score = statistics.fmean(r["score"] for r in runs.values())
            if x == y:
                cells.append(f"**{100 * score:.1f}** ({runs[next(iter(runs))]['metric']})")
                values.append(0.0)
                continue
            if not set(runs) & set(diagonal):
                cells.append(f"{100 * score:.1f} (no diagonal)")
                values.append(None)
                continue
            test = _paired(runs, diagonal)
            if isinstance(test, str):
                cells.append(f"{100 * score:.1f} (not paired: {test})")
                values.append(None)
                continue
            cells.append(f"{_interval(test)}, p={test.p_value:.3f}")
            values.append(100 * test.difference)
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
        matrix.append(values)
    matrix_plot(
        matrix,
        tasks,
        tasks,
        folder / "cross_task.png",
        "change vs. heads from the same task (points)",
        "heads selected on",
        "biases tuned on",
        "",
    )
    return "\n".join(lines) + "\n\nFigure: `cross_task.png`.\n"


def out_of_domain(records: list[dict], folder: Path, spec: dict) -> str:
    """Each arm's main metric on each evaluation task (the part of a ``TRAIN:EVAL`` task after
    the colon) against the baseline arm (``baseline`` in the grid's report spec, default
    ``No-FT``): the baseline's absolute score, every other arm's change in points with the
    paired bootstrap test against the baseline over the seeds the two cells share (whole
    examples resampled, :func:`paired_bootstrap_over_seeds`), as in the paper's Table 5."""
    baseline = spec.get("baseline", "No-FT")
    by_cell: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in records:
        if r.get("phase") == "test":
            by_cell[(r["label"], r["task"])][r["seed"]] = r
    if not by_cell:
        return ""
    labels = list(dict.fromkeys(label for label, _ in by_cell))
    tasks = list(dict.fromkeys(task for _, task in by_cell))
    if baseline not in labels:
        return f"## Out-of-domain change\n\nNo {baseline} (baseline) runs yet: no comparison.\n"
    labels = [baseline] + [label for label in labels if label != baseline]
    metrics = {task: next(iter(runs.values()))["metric"] for (_, task), runs in by_cell.items()}
    names = [task.partition(":")[2] or task for task in tasks]
    columns = [f"{name} ({metrics[task]})" for name, task in zip(names, tasks)]
    lines = [
        f"## Out-of-domain change: each arm against {baseline}",
        "",
        f"Cells: the main metric (mean over seeds) and its change in points against {baseline} on the same "
        "questions [95% interval], p: paired bootstrap test over the seeds both cells ran (whole examples "
        "resampled), 10,000 resamples. A task `TRAIN:EVAL` was "
        "trained on TRAIN and evaluated on EVAL.",
        "",
        "| arm | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    matrix = []
    for label in labels:
        cells, values = [], []
        for task in tasks:
            runs, base = by_cell.get((label, task), {}), by_cell.get((baseline, task), {})
            if not runs:
                cells.append("missing")
                values.append(None)
                continue
            score = statistics.fmean(r["score"] for r in runs.values())
            seeds = sorted(set(runs) & set(base))
            if label == baseline or not seeds:
                cells.append(f"**{100 * score:.1f}**" if label == baseline else f"{100 * score:.1f} (no {baseline})")
                values.append(0.0 if label == baseline else None)
                continue
            test = _paired(runs, base)
            if isinstance(test, str):
                cells.append(f"{100 * score:.1f} (not paired: {test})")
                values.append(None)
                continue
            cells.append(f"{100 * score:.1f} ({_interval(test)}, p={test.p_value:.3f})")
            values.append(100 * test.difference)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        matrix.append(values)
    matrix_plot(
        matrix, labels, names, folder / "out_of_domain.png", f"change vs. {baseline} (points)", "arm", "evaluated on"
    )
    return "\n".join(lines) + "\n\nFigure: `out_of_domain.png`.\n"


def parse_compare_to(text: str) -> dict[str, str]:
    """``--compare-to``'s text as a ``compare_to`` spec: ``NAME=VALUE[,NAME=VALUE...]`` (``label``
    an arm's label, any other name a sweep option; a comma starts a new pair only where a name
    and ``=`` follow, so labels may hold commas), any other text an arm's label, '' none. A
    ValueError for an empty value or a name given twice."""
    text = text.strip()
    if not text or not re.match(r"[A-Za-z_][\w-]*=", text):
        return {"label": text} if text else {}
    spec: dict[str, str] = {}
    for part in re.split(r",(?=\s*[A-Za-z_][\w-]*=)", text):
        name, _, value = (piece.strip() for piece in part.partition("="))
        if not value or name in spec:
            raise ValueError(
                f"--compare-to takes LABEL or NAME=VALUE[,NAME=VALUE...], each name once, none empty; got {text!r}"
            )
        spec[name] = value
    return spec


def _matches(row: dict, wanted: dict) -> bool:
    """Whether a report row is the one ``wanted`` names (its arm's label, its sweep values; :func:`same_value`)."""
    return all(
        same_value(row["label"] if name == "label" else row["point_values"].get(name), value)
        for name, value in wanted.items()
    )


def comparison(records: list[dict], rows: list[dict], wanted: dict) -> str:
    """Every row of a task against its reference row (``wanted``: ``compare_to`` in the grid's
    report spec or ``lofit report --compare-to``), as the paired bootstrap test of the difference
    in mean per-example primary metric: a_i, b_i are test example i's scores averaged over the
    seeds both rows ran, and whole examples are resampled (:func:`paired_bootstrap_over_seeds`);
    the difference mean(a - b) in points, its 95% interval and p (10,000 resamples). A
    ValueError when ``wanted`` names an option that no row was swept over."""
    if not wanted or not rows:
        return ""
    swept = {name for row in rows for name in row["point_values"]}
    unknown = sorted(set(wanted) - swept - {"label"})
    if unknown:
        raise ValueError(
            f"compare_to names {', '.join(unknown)}, which no row was swept over; name label and "
            f"{', '.join(sorted(swept)) or 'no sweep option (none was swept)'}"
        )
    runs: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in records:
        if r.get("phase") == "test":
            runs[(r["task"], r["label"], json.dumps(r.get("point", {}), sort_keys=True))][r["seed"]] = r
    named = ", ".join(f"{name}={value}" for name, value in wanted.items())
    lines = [
        f"## Each row against {named}",
        "",
        "The paired bootstrap test on the same test examples (each example's scores averaged over the seeds "
        "both rows ran; whole examples resampled): the difference in points of the primary metric [95% "
        "interval] and p, 10,000 resamples.",
        "",
        "| task | arm | setting | metric (%) | difference (points) [95% interval] | p | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        references = [row for row in task_rows if _matches(row, wanted)]
        if len(references) != 1:
            found = "no row" if not references else f"{len(references)} rows"
            lines.append(f"| {task} | {found} with {named}: no comparison | | | | | |")
            continue
        [reference] = references
        base = runs[(task, reference["label"], json.dumps(reference["point_values"], sort_keys=True))]
        for row in task_rows:
            score = row.get(row["metric"]) if row["metric"] else None
            mean = f"{100 * score[0]:.1f}" if score else "no primary metric"
            cells = [task, row["label"], row["point"], f"**{mean}**" if row is reference else mean]
            compared = runs[(task, row["label"], json.dumps(row["point_values"], sort_keys=True))]
            if row is reference:
                outcome = ["reference", "", ",".join(map(str, sorted(base)))]
            else:
                test = _paired(compared, base)
                if isinstance(test, str):
                    outcome = [f"not paired ({test})", "", ""]
                else:
                    outcome = [_interval(test), f"{test.p_value:.3f}", ",".join(map(str, test.seeds))]
            lines.append("| " + " | ".join([*cells, *outcome]) + " |")
    return "\n".join(lines) + "\n"


def jaccard(a: set, b: set) -> float:
    """|A ∩ B| / |A ∪ B|: 1 for equal head sets, 0 for disjoint ones."""
    return len(a & b) / len(a | b) if a | b else 1.0


def _top_heads(ranking: dict, k: int | None = None) -> set:
    """The ``k`` best heads of a step-1 record (default: its own top_k)."""
    return set(HeadRanking.from_scores(torch.tensor(ranking["scores"])).top(k or ranking["top_k"]))


def layers(records: list[dict], folder: Path) -> str:
    """Per task, the layers of its top-K step-1 heads (lowest seed), the pairwise overlap
    of the tasks' head sets (the number of shared heads and the Jaccard index), and, where a
    task has rankings of several seeds, the overlap of each other seed's top K with the
    lowest seed's."""
    by_task: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in records:
        if r.get("phase") == "ranking":
            by_task[r["task"]].setdefault(r["seed"], r)
    if not by_task:
        return ""
    rankings = {task: seeds[min(seeds)] for task, seeds in by_task.items()}
    heads = {task: _top_heads(r) for task, r in rankings.items()}
    counts = {
        task: [sum(1 for layer, _ in heads[task] if layer == i) for i in range(len(r["scores"]))]
        for task, r in rankings.items()
    }
    layer_histograms(counts, folder / "layers.png", "top-K step-1 heads per layer")
    tasks = list(heads)
    lines = [
        "## Where the selected heads sit",
        "",
        "Seeds: " + ", ".join(f"{task} {r['seed']}" for task, r in rankings.items()) + ".",
        "",
        "| task | K | heads per layer (layer 0 first) | mean layer |",
        "|---|---|---|---|",
    ]
    for task in tasks:
        mean_layer = statistics.fmean(layer for layer, _ in heads[task])
        lines.append(f"| {task} | {len(heads[task])} | {' '.join(map(str, counts[task]))} | {mean_layer:.1f} |")
    lines += [
        "",
        "Overlap of the head sets (shared heads / Jaccard index |A∩B| / |A∪B|):",
        "",
        "| | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for a in tasks:
        lines.append(
            f"| {a} | "
            + " | ".join(f"{len(heads[a] & heads[b])} / {jaccard(heads[a], heads[b]):.2f}" for b in tasks)
            + " |"
        )
    stability = [
        (task, seed, _top_heads(r, len(heads[task])))
        for task, seeds in by_task.items()  # the same K for every seed
        for seed, r in sorted(seeds.items())[1:]
    ]
    if stability:
        lines += [
            "",
            "Across seeds (step 1 rerun with another seed: its data order, initialisation of A and, where the task "
            "samples its training set, the sample):",
            "",
            "| task | seeds | shared heads / Jaccard |",
            "|---|---|---|",
        ]
        lines += [
            f"| {task} | {rankings[task]['seed']}, {seed} | {len(heads[task] & top)} / "
            f"{jaccard(heads[task], top):.2f} |"
            for task, seed, top in stability
        ]
    return "\n".join(lines) + "\n\nFigure: `layers.png`.\n"


def _objective(options: dict) -> str:
    """The step-1 objective of a ranking's options, with its strength, learning rate and epochs."""
    if options.get("heads") == "bias-based":
        rate = options.get(selection_bias_lr_option(options))
        return f"bias-based, bias lr {rate}, {options.get('select_epochs')} epochs"
    if options.get("heads", "lofit") != "lofit":
        return options.get("heads", "?")
    strength = (
        f"group {options.get('group_lambda')}"
        if options.get("selection") == "group"
        else f"L1 {options.get('l1_lambda')}"
    )
    return f"{strength}, scale lr {options.get('scale_lr')}, {options.get('select_epochs')} epochs"


def _heads_tuned(record: dict, ranking: dict) -> int:
    """K of a cell that tuned ``ranking``'s heads: the heads it recorded as selected, else (records
    from before cells recorded their heads; none of the committed ones) the K the ranking was
    recorded with, which may be another cell's."""
    return len(record.get("selected_heads") or []) or ranking["top_k"]


def localization(records: list[dict]) -> str:
    """Every step-1 ranking's localization figures (:class:`~lofit.methods.lofit.localization.Localization`)
    for each K and arm that tuned its top K heads on its own task (a ranking serves cells of several K,
    num-heads, and of several arms, capacity), with the mean score of those tuning trials and test runs.
    Cells that tuned its heads on another task (cross-task) or were evaluated on one (``TRAIN:EVAL``)
    are left out: their scores are not of its task."""
    rankings = {r["key"]: r for r in records if r.get("phase") == "ranking"}
    if not rankings:
        return ""
    scores: dict[str, dict[tuple[int, str], dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )  # ranking key -> (K, arm) -> phase -> scores
    for r in records:
        ranking = rankings.get(r.get("ranking_key"))
        if ranking and r.get("score") is not None and r["task"] == ranking["task"]:
            scores[ranking["key"]][(_heads_tuned(r, ranking), r.get("label", ""))][r["phase"]].append(r["score"])

    def mean(found: list[float]) -> str:
        return f"{100 * statistics.fmean(found):.1f}% ({len(found)})" if found else ""

    lines = [
        "## Step-1 localization",
        "",
        "For each ranking and each K and arm that tuned its top K heads: the top K heads' share of the total score "
        "(and K / N, the share if every head scored the same), the effective number of heads (sum s)^2 / sum s^2, "
        f"the heads below {NEAR_ZERO:.0%} of the largest score (exactly 0), and whether the selection counts as "
        "localized (top share >= min(max(1/2, 2 K / N), (1 + K / N) / 2); at K = N no head is left out, so there "
        "is no selection to judge); then the mean score (and count) of that arm's tuning trials and test runs "
        "on the ranking's task.",
        "",
        "| task | seed | step 1 | arm | K | top-K share (uniform) | effective heads | near 0 (exactly 0) | localized "
        "| trials | test runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rankings.values(), key=lambda r: (r["task"], r["seed"], _objective(r.get("options", {})))):
        head_scores = torch.tensor(r["scores"])
        uses = scores.get(r["key"]) or {(r["top_k"], ""): {}}
        for (k, label), by_phase in sorted(uses.items()):
            figures = Localization.of(head_scores, k)
            lines.append(
                f"| {r['task']} | {r['seed']} | {_objective(r.get('options', {}))} | {label} "
                f"| {figures.k} of {figures.total} "
                f"| {100 * figures.top_share:.1f}% ({100 * figures.uniform_share:.1f}%) "
                f"| {figures.effective_heads:.0f} | {figures.near_zero} ({figures.exact_zero}) "
                f"| {figures.label} | {mean(by_phase.get('tune', []))} | {mean(by_phase.get('test', []))} |"
            )
    return "\n".join(lines) + "\n"


def _x_value(value: object, name: str) -> float:
    """A sweep value as a number on the curve's x axis (``num_heads``: % of the heads)."""
    if name == "num_heads":
        return 100.0 if value == "all" else 100 * float(value) if float(value) < 1 else float(value)
    return float(value)


def curve(rows: list[dict], folder: Path, x: str) -> str:
    panels: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if x in row["point_values"]:
            mean, std = row[row["metric"]]
            panels[row["task"]][row["label"]].append((_x_value(row["point_values"][x], x), 100 * mean, 100 * std))
    if not panels:
        return ""
    x_label = "% of heads (K)" if x == "num_heads" else x.replace("_", " ")
    curves({k: dict(v) for k, v in panels.items()}, folder / f"{x}.png", x_label, "score (%)", log_x=True)
    return f"Figure: `{x}.png` (mean ± std over seeds of each task's main metric).\n"


def _hardware(records: list[dict]) -> str:
    """Where the runs and trials ran (timings compare only within one kind of hardware)."""
    counts = Counter(r.get("hardware", UNRECORDED_HARDWARE) for r in records if r.get("phase") in ("test", "tune"))
    if not counts:
        return ""
    return "\n".join(["", "## Hardware", "", *(f"- {name}: {n} runs and trials" for name, n in sorted(counts.items()))])


ReportSection = Callable[[list[dict], list[dict], Path, dict], "str | None"]
"""A report kind's own section: from the records, the table's rows, the experiment folder and
the grid's ``report`` spec; None for none."""

REPORT_KINDS: dict[str, ReportSection] = {
    "table": lambda records, rows, folder, spec: None,
    "cross-task": lambda records, rows, folder, spec: cross_task(records, folder),
    "layers": lambda records, rows, folder, spec: layers(records, folder),
    "curve": lambda records, rows, folder, spec: curve(rows, folder, spec["x"]),
    "ood": lambda records, rows, folder, spec: out_of_domain(records, folder, spec),
}
"""A grid's ``report: {kind: NAME}`` -> the section it adds below the results table."""


def report_kind(kind: object) -> ReportSection:
    """The section of report kind ``kind``; a ValueError naming the known kinds for any other."""
    if kind not in REPORT_KINDS:
        raise ValueError(f"unknown report kind {kind!r}; known kinds: {', '.join(REPORT_KINDS)}")
    return REPORT_KINDS[kind]


def write_report(folder: Path, compare_to: dict[str, str] | None = None) -> Path:
    """Write report.md, report.csv and the figures of ``folder`` from its results.jsonl; return
    report.md's path. ``compare_to`` names the reference row of :func:`comparison` in place of
    the grid's own (``compare_to`` in its report spec)."""
    records = read_results(folder)
    if not records:
        raise FileNotFoundError(f"no results in {folder / 'results.jsonl'}")
    spec, name = records[-1].get("report", {"kind": "table"}), records[-1].get("experiment", folder.name)
    records, superseded = split_superseded_tests(records)
    rows = summarize(records)
    table, table_csv = _table(rows) if rows else ("", "")
    parts = [
        f"# {name}",
        "",
        records[-1].get("description", ""),
        "",
        f"{sum(r.get('phase') == 'test' for r in records)} test runs, {sum(r.get('phase') == 'tune' for r in records)} "
        f"tuning trials, {sum(r.get('phase') == 'ranking' for r in records)} step-1 rankings. Mean ± standard "
        "deviation "
        "over seeds (a single seed has none); best mean per task in bold.",
        "",
        _budgets(records),
        "",
    ] + ([table] if table else [])  # no table before the first test run
    if superseded:
        parts.append(_superseded_note(superseded))
    if unselected := _unselected_note(records):
        parts.append(unselected)
    compared = comparison(records, rows, compare_to if compare_to is not None else spec.get("compare_to", {}))
    section = report_kind(spec.get("kind"))(records, rows, folder, spec)  # may write figures: after the checks
    if section is not None:
        parts.append(section)
    if compared:  # a report without a reference row has no comparison section
        parts.append(compared)
    parts.append(localization(records))
    parts.append(_tuning(records))
    parts.append(_hardware(records))
    write_text(folder / "report.csv", table_csv)
    write_text(folder / "report.md", "\n".join(parts))
    return folder / "report.md"
