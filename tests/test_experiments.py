"""The experiment runner on tiny models: grids, keys, results per cell, resume, ranking
reuse, tuning (log grids, edge extension, equal budgets), reports rebuilt from results.jsonl
alone, the bootstrap test, --dry-run."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from lofit.cli import main
from lofit.experiments import ModelPool, Runner, load_grid
from lofit.experiments import grid as grid_module
from lofit.experiments import report as report_module
from lofit.experiments import runner as runner_module
from lofit.experiments.bootstrap import paired_bootstrap, paired_bootstrap_over_seeds
from lofit.experiments.executors import InlineExecutor, call
from lofit.experiments.grid import (
    Arm,
    Grid,
    all_tied,
    check_searches,
    check_tuning,
    chooses_nothing,
    config_key,
    edge_step,
    expand,
    make_cell,
    measurement_key,
    option_line,
    ranking_key,
    same_value,
    shipped_grids,
    step_beyond,
    tied_on_line,
)
from lofit.experiments.report import edge_warning, jaccard, parse_compare_to, unexplored_edges, write_report
from lofit.experiments.results import RESULTS, append_result, read_results
from lofit.methods import METHODS
from lofit.methods.lofit.config import LofitConfig
from lofit.runs import plots
from lofit.runs.config import CellConfig, RunConfig
from lofit.runs.pipeline import load_fresh, run_cell
from lofit.training import loop as training
from lofit.utils.compute import hardware, resolve_device

from .tiny_run import tiny_model_folder, write_task

FAST = {"select_epochs": 1, "tune_epochs": 1, "red_epochs": 1, "batch_size": 8, "progress": False}
LOFIT_TUNED = {"label": "LoFiT", "method": "lofit", "tune": {"bias_lr": [1e-2, 5e-2], "l1_lambda": [1e-3, 5e-3]}}
RED_TUNED = {"label": "RED", "method": "red", "tune": {"red_lr": [1e-2, 2e-2], "red_epochs": [1, 2]}}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experiment")
    model = tiny_model_folder(folder / "model")
    return {"model": str(model), "task": str(write_task(folder / "task.jsonl", rows=12)), "folder": folder}


def here() -> str:
    """The hardware a cell records here and now: the device, its threads and the autocast precision
    (conftest pins float32)."""
    return f"{hardware(resolve_device('auto'))}, no"


def grid_file(setting, tmp_path, **changes):
    grid = {
        "name": "tiny",
        "description": "a tiny grid",
        "tasks": [setting["task"]],
        "seeds": [1],
        "options": {"model": setting["model"]} | FAST,
        "sweep": {"num_heads": [2, 4]},
        "arms": [LOFIT_TUNED, RED_TUNED],
    } | changes
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


class CountingPool(ModelPool):
    loads = 0

    def __init__(self):
        super().__init__(self.counted_load)

    def counted_load(self, name, compute):
        CountingPool.loads += 1
        return load_fresh(name, compute)


def test_grid_expands_to_keyed_cells(setting, tmp_path):
    grid = load_grid(str(grid_file(setting, tmp_path, seeds=[1, 2])))
    cells = expand(grid, "test", {})
    assert len(cells) == 2 * 2 * 2  # arms x sweep points x seeds
    assert [c.seed for c in cells] == [1] * 4 + [2] * 4  # seed first: a stopped run has whole seeds
    assert len({c.key for c in cells}) == len(cells)
    assert [c.key for c in expand(grid, "test", {"progress": True, "output_dir": "elsewhere"})] == [
        c.key for c in cells
    ]
    assert [c.key for c in expand(grid, "test", {"bias_lr": 0.3})][0] != cells[0].key
    trials = expand(grid, "tune", {})
    assert len(trials) == 2 * 2 * 4 and {c.config["eval_split"] for c in trials} == {"val"}
    assert {c.config["limit"] for c in trials} == {300}  # tune_limit's default
    assert (
        "red_epochs" not in cells[0].config and cells[2].config["red_epochs"] == 1
    )  # another method's option: left out
    with pytest.raises(ValueError, match="not options of method red"):
        expand(
            load_grid(
                str(grid_file(setting, tmp_path, arms=[{"label": "RED", "method": "red", "options": {"lora_rank": 4}}]))
            ),
            "test",
            {},
        )
    with pytest.raises(ValueError, match="no_such_option"):
        expand(grid, "test", {"no_such_option": 1})


def test_a_derived_grid_replaces_its_bases_keys_and_merges_its_arms_by_label(setting, tmp_path):
    base = grid_file(setting, tmp_path, seeds=[1, 2])
    derived = tmp_path / "derived.yaml"
    red_options = {"red_epochs": 2}
    lora = {"label": "LoRA", "method": "lora", "tune": {"lora_lr": [1e-3, 2e-3], "lora_rank": [2, 4]}}
    derived.write_text(
        yaml.safe_dump(
            {"base": "grid.yaml", "seeds": [3], "arms": [{"label": "RED", "options": red_options}, lora]},
            sort_keys=False,
        )
    )
    grid = load_grid(str(derived))
    assert grid.name == "derived" and grid.seeds == [3]  # its own name and the keys it gives
    assert grid.description == "a tiny grid" and grid.sweep == {"num_heads": [2, 4]}  # the rest its base's
    assert [arm.label for arm in grid.arms] == ["LoFiT", "RED", "LoRA"]  # the base's order, new arms after
    red = grid.arms[1]
    assert red.method == "red" and red.options == red_options and red.tune == RED_TUNED["tune"]
    (tmp_path / "flat").mkdir()
    flat_arms = [LOFIT_TUNED, RED_TUNED | {"options": red_options}, lora]
    flat = load_grid(str(grid_file(setting, tmp_path / "flat", name="derived", seeds=[3], arms=flat_arms)))
    for phase in ("tune", "test"):  # the same cells as the grid written out whole, under the same keys
        assert [cell.key for cell in expand(grid, phase, {})] == [cell.key for cell in expand(flat, phase, {})]
    derived.write_text(yaml.safe_dump({"base": "grid.yaml", "drop_arms": ["RED"]}))
    assert [arm.label for arm in load_grid(str(derived)).arms] == ["LoFiT"]
    for changes, message in (
        ({"drop_arms": ["LoRA"]}, r"drop_arms names no arm of its base: \['LoRA'\] \(its arms: LoFiT, RED\)"),
        ({"base": "no-such-grid.yaml"}, "derived.yaml: no base grid 'no-such-grid.yaml': name one of capacity, "),
        ({"base": "derived.yaml"}, r"its bases form a circle \(derived.yaml -> derived.yaml\)"),
        ({"arms": [{"method": "red"}]}, "each arm is a mapping with a label"),
    ):
        derived.write_text(yaml.safe_dump({"base": "grid.yaml"} | changes))
        with pytest.raises(ValueError, match=message):
            load_grid(str(derived))
    base.write_text(yaml.safe_dump({"drop_arms": ["RED"]}))
    with pytest.raises(ValueError, match="drop_arms drops arms of a base grid; name it with base"):
        load_grid(str(base))


def test_shipped_grids_derived_from_table3_key_its_cells_as_table3_does():
    """table3-budget's LoFiT, LoRA and LoReFT trials at its 5-epoch budget are table3's (they share
    the cells table3 measured), its RED trials are its own; data-efficiency keeps three of table3's arms."""
    table3 = {cell.describe(): cell.key for cell in expand(load_grid("table3"), "tune", {})}
    budget = {cell.describe(): cell.key for cell in expand(load_grid("table3-budget"), "tune", {})}
    shared = [name for name in budget if not name.split(" seed")[0].endswith("RED")]
    assert len(shared) == 4 * 6 * 3 and all(budget[name] == table3[name] for name in shared)
    assert not {budget[name] for name in budget if name not in shared} & set(table3.values())
    assert [arm.label for arm in load_grid("data-efficiency").arms] == ["LoFiT", "LoRA", "RED"]


def test_a_search_whose_values_would_be_one_cell_is_refused(setting, tmp_path):
    group = {"label": "LoFiT", "method": "lofit", "options": {"selection": "group"}}
    tuned = load_grid(str(grid_file(setting, tmp_path, arms=[group | {"tune": LOFIT_TUNED["tune"]}])))
    message = r"arm LoFiT on .*: searches l1_lambda, which its cells do not read \(l1_lambda is read only with "
    with pytest.raises(ValueError, match=message + r"selection: l1 \(here selection: group\)\)"):
        check_searches(tuned, {}, tune=True)
    check_searches(tuned, {}, tune=False)  # without --tune the tune grid is not searched
    swept = load_grid(str(grid_file(setting, tmp_path, arms=[group], sweep={"l1_lambda": [1e-3, 5e-3]})))
    with pytest.raises(ValueError, match=message):
        check_searches(swept, {}, tune=False)
    plain = {"label": "LoFiT", "method": "lofit"}
    with pytest.raises(ValueError, match=r"here selection: group from the command line"):
        check_searches(
            load_grid(str(grid_file(setting, tmp_path, arms=[plain | {"tune": LOFIT_TUNED["tune"]}]))),
            {"selection": "group"},
            tune=True,
        )
    with pytest.raises(ValueError, match=r"arm LoFiT: the command line sets bias_lr, which --tune searches"):
        check_searches(tuned, {"bias_lr": 0.05}, tune=True)
    mixed = load_grid(  # bias-based cells read select_bias_lr, so the sweep is accepted
        str(
            grid_file(
                setting,
                tmp_path,
                arms=[plain],
                sweep={"heads": ["lofit", "bias-based"], "select_bias_lr": [1e-2, 2e-2]},
            )
        )
    )
    check_searches(mixed, {}, tune=False)
    l1 = load_grid(str(grid_file(setting, tmp_path, arms=[plain], sweep={"l1_lambda": [1e-3, 5e-3]})))
    check_searches(l1, {}, tune=False)
    assert len({cell.key for cell in expand(l1, "test", {})}) == 2
    tuned_bias = plain | {"tune": {"bias_lr": [1e-2, 5e-2]}}
    untuned_group = group | {"label": "group"}  # no tune grid: under --tune it is only tested
    beside = load_grid(
        str(grid_file(setting, tmp_path, arms=[tuned_bias, untuned_group], sweep={"l1_lambda": [1e-3, 5e-3]}))
    )
    with pytest.raises(ValueError, match=r"arm group on .*: searches l1_lambda, which its cells do not read"):
        check_searches(beside, {}, tune=True)
    check_searches(
        load_grid(str(grid_file(setting, tmp_path, arms=[tuned_bias, plain | {"label": "untuned"}]))), {}, tune=True
    )


@pytest.mark.parametrize("name", sorted(shipped_grids()))
def test_every_shipped_grid_searches_distinct_cells(name):
    grid = load_grid(name)
    check_searches(grid, {}, tune=True)
    for phase in ("tune", "test"):
        cells = expand(grid, phase, {})
        assert len({cell.key for cell in cells}) == len(cells), f"{name} {phase}: two cells share a key"


def test_cells_that_set_an_option_to_what_unset_means_measure_what_the_same_cell_elsewhere_does():
    table3, cross_task, data_efficiency = load_grid("table3"), load_grid("cross-task"), load_grid("data-efficiency")
    lofit = next(arm for arm in table3.arms if arm.label == "LoFiT")

    def measures(grid, arm, task, point, trial, training_examples=None):
        cell = make_cell(grid, "tune", arm, task, 42, point, trial, {})
        return measurement_key(cell.method, cell.phase, cell.config, training_examples), cell.key

    trial = {"bias_lr": 5e-2, "l1_lambda": 2e-2}
    for task in table3.tasks:  # cross-task's diagonal: the task's own heads
        diagonal = measures(cross_task, cross_task.arms[0], task, {"heads_task": task}, trial)
        reference = measures(table3, lofit, task, {}, trial)
        assert diagonal[0] == reference[0] and diagonal[1] != reference[1]  # same measurement, own key
    off_diagonal = measures(cross_task, cross_task.arms[0], "clutrr", {"heads_task": "mquake"}, trial)
    assert off_diagonal[0] != measures(table3, lofit, "clutrr", {}, trial)[0]
    # CLUTRR's default training set is 300 stories; MQuAKE's is all of its examples, so a size of at
    # least as many as it has (134 in the shared data) samples what no size does, once that is known
    settings = [("clutrr", 300, None, True), ("clutrr", 100, None, False), ("mquake", 300, None, False)]
    settings += [("mquake", 300, 134, True), ("mquake", 134, 134, True), ("mquake", 100, 134, False)]
    for arm in data_efficiency.arms:
        same = next(other for other in table3.arms if other.label == arm.label)
        first = {option: values[0] for option, values in arm.tune.items()}
        for task, size, count, equal in settings:
            ours = measures(data_efficiency, arm, task, {"train_size": size}, first, count)[0]
            assert (ours == measures(table3, same, task, {}, first, count)[0]) is equal
    with_size = make_cell(cross_task, "tune", cross_task.arms[0], "clutrr", 42, {"heads_task": "mquake"}, trial, {})
    sized = with_size.config | {"train_size": 300}  # step 1 then samples 300 of MQuAKE's examples, not all of them
    assert measurement_key("lofit", "tune", sized) != measurement_key("lofit", "tune", with_size.config)
    assert measurement_key("lofit", "ranking", sized) != measurement_key("lofit", "ranking", with_size.config)
    assert measurement_key("lofit", "tune", sized, 134) != measurement_key("lofit", "tune", with_size.config, 134)
    ood = {"task": "truthfulqa:nq_open", "heads_task": "truthfulqa", "seed": 1}  # step 1 on the training task
    assert measurement_key("lofit", "ranking", ood) == measurement_key("lofit", "ranking", ood | {"task": "truthfulqa"})


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _runner_measures(grid, arm, task, point, trial, phase):
    """What the runner takes a cell (``phase`` tune) or its step 1 (``phase`` ranking) to measure."""
    cell = make_cell(grid, "tune", arm, task, 42, point, trial, {})
    options = runner_module._ranking_options(cell) if phase == "ranking" else cell.config
    return runner_module._measures(cell.method, phase, options)


@pytest.mark.skipif(not (SHARED_DATA / "mquake").is_dir(), reason="needs the shared data folder, as CI has")
def test_the_runner_counts_a_tasks_examples_to_tell_a_size_above_them_measures_what_no_size_does(monkeypatch):
    monkeypatch.setenv("LOFIT_DATA", str(SHARED_DATA))
    table3, data_efficiency = load_grid("table3"), load_grid("data-efficiency")
    examples = len((SHARED_DATA / "mquake" / "train.jsonl").read_text().splitlines())
    for arm in data_efficiency.arms:
        same = next(other for other in table3.arms if other.label == arm.label)
        first = {option: values[0] for option, values in arm.tune.items()}
        for phase in ("tune", "ranking") if arm.method == "lofit" else ("tune",):
            reference = _runner_measures(table3, same, "mquake", {}, first, phase)
            for size, equal in ((examples + 166, True), (examples, True), (examples - 34, False)):
                ours = _runner_measures(data_efficiency, arm, "mquake", {"train_size": size}, first, phase)
                assert (ours == reference) is equal
            clutrr = _runner_measures(data_efficiency, arm, "clutrr", {"train_size": 300}, first, phase)
            assert clutrr == _runner_measures(table3, same, "clutrr", {}, first, phase)
    assert runner_module._training_examples({"task": "clutrr", "seed": 42, "fold": 0}) is None


def test_tuned_numbers_are_log_grids(setting, tmp_path):
    def tuned(**tune):
        arms = [{"label": "arm", "method": "lora", "tune": tune}]
        return load_grid(str(grid_file(setting, tmp_path, arms=arms))).arms[0].tune

    compact = tuned(lora_lr={"low": 1e-3, "high": 1e-1, "points": 5})
    assert compact == {"lora_lr": [1e-3, 3.162e-3, 1e-2, 3.162e-2, 1e-1]}
    assert tuned(lora_rank={"low": 2, "high": 32, "points": 5}) == {"lora_rank": [2, 4, 8, 16, 32]}
    assert tuned(lora_lr=[1e-2, 1e-3, 3.16e-3], lora_rank=[4, 16], lora_targets=["q_proj", "v_proj"])["lora_lr"] == [
        1e-2,
        1e-3,
        3.16e-3,
    ]  # any order, 3 significant digits; categorical values as a list
    assert tuned(lora_rank=[4, 7, 12])["lora_rank"] == [4, 7, 12]  # integers: log-spaced within rounding
    refusals = {
        "not log-spaced": dict(lora_lr=[3e-4, 1e-3, 3e-3]),
        "not log-spaced ": dict(lora_rank=[4, 9, 16]),
        "whole number >= 1": dict(lora_rank=[0.5, 2]),
        "> 0": dict(lora_lr=[0.0, 1e-3]),
        "repeat": dict(lora_rank={"low": 1, "high": 4, "points": 5}),
        "as text": dict(lora_lr=["1e-3", "1e-2"]),
        "compact grid": dict(lora_lr={"low": 1e-2, "high": 1e-3, "points": 3}),
    }
    for message, tune in refusals.items():
        with pytest.raises(ValueError, match=rf"grid tiny, arm arm, option {next(iter(tune))}: .*({message})"):
            tuned(**tune)
    assert step_beyond("bias_lr", 0.05, 2.5, True) == 0.125 and step_beyond("lora_rank", 2, 4.0, False) == 1
    assert step_beyond("lora_rank", 1, 4.0, False) is None and step_beyond("lora_rank", 3, 1.4, True) == 4


def test_an_equal_budget_fixes_every_training_arms_epochs(setting, tmp_path):
    arms = [
        {"label": "LoFiT", "method": "lofit", "tune": {"bias_lr": [1e-2, 5e-2]}},
        {"label": "RED", "method": "red", "tune": {"red_lr": [1e-2, 2e-2]}},
        {"label": "0-shot", "method": "zero-shot"},
    ]
    options = {"model": setting["model"], "select_epochs": 1, "progress": False}
    grid = load_grid(str(grid_file(setting, tmp_path, arms=arms, options=options, budget=3)))
    check_tuning(grid)  # one searched option is enough where the budget fixes the epochs
    trained = {c.label: c.config for c in expand(grid, "tune", {})}
    assert trained["LoFiT"]["tune_epochs"] == 3 and trained["RED"]["red_epochs"] == 3
    assert "0-shot" not in trained  # an arm without a tune grid is only tested, and trains nothing to budget
    zero_shot = [c for c in expand(grid, "test", {}) if c.label == "0-shot"]
    assert zero_shot and all(c.config["tune_epochs"] == LofitConfig().tune_epochs for c in zero_shot)
    with pytest.raises(ValueError, match=r"command line sets red_epochs, tune_epochs \(--option\), which the grid's"):
        check_searches(grid, {"tune_epochs": 5, "red_epochs": 2}, tune=True)
    check_searches(grid, {"select_epochs": 2}, tune=True)
    with pytest.raises(ValueError, match="at least two hyper-parameters"):
        check_tuning(load_grid(str(grid_file(setting, tmp_path, arms=arms, options=options))))

    assert dataclasses.replace(grid).budget_options(grid.arms[1], setting["task"]) == {"red_epochs": 3}  # no mutation
    per_task = load_grid(str(grid_file(setting, tmp_path, arms=arms, options=options, budget={setting["task"]: 2})))
    assert {c.config["tune_epochs"] for c in expand(per_task, "tune", {}) if c.label == "LoFiT"} == {2}
    with pytest.raises(
        ValueError, match=r"budget \(.*: 2 epochs for every training arm\) gives no epochs for task 'x'"
    ):
        per_task.budget_options(per_task.arms[0], "x")
    iti = {"label": "ITI", "method": "iti", "tune": {"iti_alpha": [10, 20]}}  # no epochs for a budget to fix
    with pytest.raises(ValueError, match="at least two hyper-parameters.*ITI tunes iti_alpha$"):
        check_tuning(load_grid(str(grid_file(setting, tmp_path, arms=[arms[0], iti], options=options, budget=3))))

    refusals = {
        "budget is a whole number of epochs >= 1, or one per task (": dict(budget=0),
        "; got '48'": dict(budget="48"),
        "; got True": dict(budget=True),
        "; got {'clutrr': 48} (no budget for ": dict(budget={"clutrr": 48}),
        "; got {'clutrr': 0}": dict(budget={"clutrr": 0}),
        "arm RED: its tune grid gives red_epochs, which the grid's budget (3 epochs": dict(
            budget=3, arms=[arms[0], RED_TUNED | {"tune": {"red_lr": [1e-2, 2e-2], "red_epochs": [1, 2]}}]
        ),
        "arm LoFiT: its options gives tune_epochs, which the grid's budget": dict(
            budget=3, arms=[arms[0] | {"options": {"tune_epochs": 2}}]
        ),
        "grid tiny: its sweep give tune_epochs, which the grid's budget": dict(budget=3, sweep={"tune_epochs": [1, 2]}),
        "grid tiny: its options give red_epochs, which the grid's budget": dict(
            budget=3, options=options | {"red_epochs": 2}
        ),
    }
    for message, changes in refusals.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            load_grid(str(grid_file(setting, tmp_path, **({"arms": arms, "options": options} | changes))))


def test_tuning_needs_two_hyper_parameters_and_equal_base_grids(setting, tmp_path):
    arms = [
        {"label": "LoFiT", "method": "lofit", "tune": {"bias_lr": [1e-2, 5e-2], "l1_lambda": [1e-3, 5e-3]}},
        {"label": "RED", "method": "red", "tune": {"red_lr": [1e-2, 3e-2], "red_epochs": [2]}},
    ]
    with pytest.raises(ValueError, match="same size"):
        check_tuning(load_grid(str(grid_file(setting, tmp_path, arms=arms))))
    arms[1]["tune"] = {"red_lr": [1e-2, 3e-2, 9e-2, 2.7e-1], "red_epochs": [2]}  # 4 trials, one searched option
    with pytest.raises(ValueError, match="at least two hyper-parameters.*RED tunes red_lr$"):
        check_tuning(load_grid(str(grid_file(setting, tmp_path, arms=arms))))
    arms[1]["tune"] = {"red_lr": [1e-2, 3e-2], "red_epochs": [1, 2]}
    check_tuning(load_grid(str(grid_file(setting, tmp_path, arms=arms))))


def test_runner_records_each_cell_reuses_rankings_and_model_and_resumes(setting, tmp_path, monkeypatch):
    grid = load_grid(str(grid_file(setting, tmp_path)))
    folder = tmp_path / "out"
    selects, cells_run = [], []
    real_select, real_cell = runner_module.run_select, runner_module.run_cell

    def counting_select(*args, **kwargs):
        selects.append(args[0].task)
        return real_select(*args, **kwargs)

    def failing_cell(config, models):
        if len(cells_run) == 2:
            raise KeyboardInterrupt  # the experiment is stopped during its third cell
        cells_run.append(config.run.method)
        return real_cell(config, models)

    monkeypatch.setattr(runner_module, "run_select", counting_select)
    monkeypatch.setattr(runner_module, "run_cell", failing_cell)
    CountingPool.loads = 0
    pool = CountingPool()
    base = pool(setting["model"], runner_module.ComputeConfig())[0]
    probe = torch.tensor([[1, 2, 3, 4]])
    before = base(probe).logits
    with pytest.raises(KeyboardInterrupt):
        Runner(grid, folder, tune=False, pool=pool, log=lambda _: None).run()
    records = read_results(folder)
    assert [r["phase"] for r in records] == ["ranking", "test", "test"]  # appended the moment each finished
    assert len(selects) == 1 and CountingPool.loads == 1
    assert torch.equal(base(probe).logits, before)  # each cell left the base model clean

    cells_run.clear()
    monkeypatch.setattr(runner_module, "run_cell", real_cell)
    resumed = Runner(grid, folder, pool=pool, log=lambda _: None).run()
    assert len(resumed) == 4 and len(read_results(folder)) == 1 + 4  # the 2 finished cells were skipped
    assert len(selects) == 1 and CountingPool.loads == 1  # one step 1 per (task, seed), one model load
    lofit = [r for r in resumed if r["method"] == "lofit"]
    assert {r["ranking_key"] for r in lofit} == {records[0]["key"]}
    assert [len(r["selected_heads"]) for r in lofit] == [2, 4]
    assert all(len(r["per_example"]) == 12 and r["score"] == sum(r["per_example"]) / 12 for r in resumed)
    assert not any((folder / "cells").glob("*/checkpoints"))
    assert all(r["hardware"] == here() for r in [records[0], *resumed])
    assert torch.equal(base(probe).logits, before)
    assert (
        Runner(grid, folder, pool=pool, log=lambda _: None)
        .listing()
        .endswith("4 cells, 4 done, 1 step-1 rankings recorded; nothing to run")
    )

    report = write_report(folder)
    assert "| LoFiT |" in report.read_text() and (folder / "report.csv").read_text().count("\n") == 1 + 4


def test_a_record_keeps_the_cells_cpu_time_which_leaves_out_time_spent_waiting(setting, tmp_path, monkeypatch):
    """``cpu_seconds`` is the process's CPU time over the cell: a cell that waits (here a sleep,
    standing for a paused process or one waiting for a core) adds to ``seconds`` but not to it."""
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=[{"label": "LoFiT", "method": "lofit"}])))
    real_select, real_cell = runner_module.run_select, runner_module.run_cell

    def waiting_select(*args, **kwargs):
        time.sleep(0.5)
        return real_select(*args, **kwargs)

    def waiting_cell(config, models):
        time.sleep(0.5)
        return real_cell(config, models)

    monkeypatch.setattr(runner_module, "run_select", waiting_select)
    monkeypatch.setattr(runner_module, "run_cell", waiting_cell)
    Runner(grid, tmp_path / "out", tune=False, pool=ModelPool(), log=lambda _: None).run()
    records = read_results(tmp_path / "out")
    assert {r["phase"] for r in records} == {"ranking", "test"}
    for record in records:
        assert 0 < record["cpu_seconds"] <= record["seconds"] * torch.get_num_threads() + 0.5
        assert record["seconds"] - record["cpu_seconds"] >= 0.45, record


def test_a_sibling_experiments_ranking_is_reused_not_recomputed(setting, tmp_path, monkeypatch):
    lofit_only = [{"label": "LoFiT", "method": "lofit"}]
    first = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=lofit_only)))
    selects = []
    real_select = runner_module.run_select

    def counting_select(*args, **kwargs):
        selects.append(args[0].task)
        return real_select(*args, **kwargs)

    monkeypatch.setattr(runner_module, "run_select", counting_select)
    pool = ModelPool()
    Runner(first, tmp_path / "experiments" / "first", pool=pool, log=lambda _: None).run()
    second = load_grid(str(grid_file(setting, tmp_path, name="second", sweep={"num_heads": [3]}, arms=lofit_only)))
    (tmp_path / "experiments" / "unrelated").mkdir()
    (tmp_path / "experiments" / "unrelated" / RESULTS).write_text("torn")
    monkeypatch.chdir(tmp_path)  # a relative folder: the sibling is named relative too, as given
    records = Runner(second, Path("experiments") / "second", pool=pool, log=lambda _: None).run()
    assert len(selects) == 1  # step 1 ran for the first experiment only
    ranking = [r for r in read_results(tmp_path / "experiments" / "second") if r["phase"] == "ranking"]
    assert len(ranking) == 1 and ranking[0]["experiment"] == "second"
    assert ranking[0]["reused_from"] == str(Path("experiments") / "first")
    assert ranking[0]["top_k"] == 3  # this experiment's K, not the first's
    assert records[0]["ranking_key"] == ranking[0]["key"] and len(records[0]["selected_heads"]) == 3
    assert (tmp_path / "experiments" / "second" / "rankings" / ranking[0]["key"] / "head_ranking.json").is_file()
    layers = load_grid(
        str(
            grid_file(
                setting,
                tmp_path,
                name="layers",
                sweep={},
                report={"kind": "layers"},
                arms=[{"label": "step 1", "method": "lofit", "options": {"select_only": True, "num_heads": 2}}],
            )
        )
    )
    [record] = Runner(layers, tmp_path / "experiments" / "layers", pool=pool, log=lambda _: None).run()
    assert len(selects) == 1 and record["phase"] == "ranking" and record["label"] == "step 1"
    assert record["scores"] == ranking[0]["scores"] and record["top_k"] == 2  # its own K, not a sibling's


def test_a_cell_a_sibling_measured_under_another_key_is_copied_with_this_experiments_key(
    setting, tmp_path, monkeypatch
):
    lofit_only = [{"label": "LoFiT", "method": "lofit"}]
    own_heads = load_grid(str(grid_file(setting, tmp_path, sweep={"num_heads": [2]}, arms=lofit_only)))
    pool = ModelPool()
    records = Runner(own_heads, tmp_path / "experiments" / "own", pool=pool, log=lambda _: None).run()
    measured = next(record for record in records if record["phase"] == "test")
    fits = []
    monkeypatch.setattr(runner_module, "run_cell", lambda *args: fits.append(args) or {})
    monkeypatch.setattr(runner_module, "run_select", lambda *args: fits.append(args) or {})
    # as if the task's default training set were its 12 rows: train_size 12 then means what unset does
    monkeypatch.setattr(grid_module, "TASKS", {setting["task"]: type("Tiny", (), {"default_train_size": 12})})
    point = {"heads_task": [setting["task"]], "train_size": [12]}
    diagonal = load_grid(str(grid_file(setting, tmp_path, name="diagonal", sweep=point, arms=lofit_only)))
    folder = tmp_path / "experiments" / "diagonal"
    runner = Runner(diagonal, folder, {"num_heads": 2}, pool=pool, log=lambda _: None)
    [cell] = runner.test_cells()
    assert cell.key != measured["key"] and "1 measured by an experiment beside this one" in runner.listing()
    runner.run()
    assert not fits  # nothing ranked or trained again
    [ranking] = [r for r in read_results(folder) if r["phase"] == "ranking"]
    [copied] = [r for r in read_results(folder) if r["phase"] == "test"]
    assert ranking["key"] == ranking_key(cell.config) != measured["ranking_key"]  # under this experiment's key
    for record, key in ((copied, config_key), (ranking, lambda _, options: ranking_key(options))):
        assert record["key"] == key("lofit", {k: v for k, v in record["options"].items() if k != "method"})
    assert copied["key"] == cell.key and copied["ranking_key"] == ranking["key"]
    assert copied["options"]["train_size"] == 12 and copied["point"] == {
        "heads_task": setting["task"],
        "train_size": 12,
    }
    assert copied["per_example"] == measured["per_example"] and copied["reused_from"].endswith("own")
    [row] = [line for line in report_module.localization([ranking, copied]).splitlines() if "| 2 of " in line]
    assert row.endswith(f"| {100 * copied['score']:.1f}% (1) |")  # the copy joins its ranking in the report


def fake_fit(monkeypatch, score, calls: list):
    """run_cell replaced by ``score(red_lr, red_epochs)`` on validation (0.5 on test); each call's options kept."""

    def fake_cell(config, models):
        calls.append((config.method.red_lr, config.method.red_epochs) if config.method else None)
        if len(calls) == fake_cell.stop_at:
            raise KeyboardInterrupt
        folder = runner_module.Path(config.run.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "predictions.jsonl").write_text(json.dumps({"correct": True}) + "\n")
        value = score(*calls[-1]) if config.run.eval_split == "val" else 0.5
        split = config.run.eval_split
        return {
            f"{split}_exact_match": value,
            f"{split}_num_examples": 12,
            "metric_keys": [f"{split}_exact_match"],
            "trained_parameters": 0,
        }

    fake_cell.stop_at = None
    monkeypatch.setattr(runner_module, "run_cell", fake_cell)
    monkeypatch.setattr(ModelPool, "total_heads", lambda self, name, compute: 8)
    return fake_cell


def test_a_best_value_is_inside_only_when_the_line_through_the_best_trial_brackets_it():
    """table2-v2's case: the epochs were extended at the rate best at 6 epochs, so at the best
    trial's 48 epochs no other rate was tried; the rate's range over all trials brackets it, the
    line through the best trial does not, so its neighbours at 48 epochs are due."""
    trials = [{"bias_lr": lr, "tune_epochs": 6} for lr in (0.0125, 0.025, 0.05)] + [
        {"bias_lr": 0.025, "tune_epochs": epochs} for epochs in (12, 24, 48)
    ]
    best, accepts = trials[-1], lambda value: True
    line = option_line(trials, best, "bias_lr")
    assert line == [0.025] and option_line(trials, best, "tune_epochs") == [6, 12, 24, 48]
    explored = [trial["bias_lr"] for trial in trials]
    assert edge_step("bias_lr", [0.0125, 0.025, 0.05], explored, 0.025, 3, accepts) == ("inside", [])  # all trials
    assert edge_step("bias_lr", [0.0125, 0.025, 0.05], explored, 0.025, 3, accepts, line) == (
        "edge (pending)",
        [0.0125, 0.05],  # the nearest rates tried elsewhere, below and above
    )
    # past every explored value a side is extended one log step, up to the cap, or ends at a bound
    assert edge_step("bias_lr", [0.0125, 0.025], [0.0125, 0.025], 0.025, 1, accepts) == ("edge (pending)", [0.05])
    assert edge_step("bias_lr", [0.0125, 0.025], [0.0125, 0.025, 0.05], 0.05, 1, accepts) == ("edge (cap)", [])
    assert edge_step("red_epochs", [1, 2], [1, 2], 1, 3, accepts) == ("edge (bound)", [])  # no epoch count below 1
    assert edge_step("red_epochs", [1, 2, 4], [1, 2, 4], 2, 3, accepts) == ("inside", [])
    assert edge_step("red_epochs", [1, 2, 4], [1, 2, 4, 8], 4, 3, accepts, [2, 4, 8]) == ("inside after extension", [])
    assert edge_step("method", ["a", "b"], ["a", "b"], "a", 3, accepts) == (None, [])  # categorical


def test_a_trial_tied_with_the_best_does_not_close_a_side_of_its_range():
    """table2-v3's TruthfulQA random heads: 1.25e-2 and 6.25e-3 both scored 28.0%, and no rate
    below 6.25e-3 was tried. The best, 1.25e-2, is beaten above (2.5e-2) but not below: a plateau
    that reaches the edge of the range may rise beyond it, so one step past its end is due."""
    rates, scores = [0.00625, 0.0125, 0.025, 0.05, 0.1], [0.28, 0.28, 0.268, 0.171, 0.195]
    trials, accepts = [{"bias_lr": rate} for rate in rates], lambda value: True
    best = trials[1]  # the earlier trial of the tie in the search's order (the base grid's)
    tied = tied_on_line(trials, scores, best, "bias_lr")
    assert tied == [0.00625, 0.0125]
    base = [0.025, 0.05, 0.1]
    assert edge_step("bias_lr", base, rates, 0.0125, 5, accepts, rates) == ("inside after extension", [])  # before
    position, due = edge_step("bias_lr", base, rates, 0.0125, 5, accepts, rates, tied)
    assert position == "edge (pending)" and due == [pytest.approx(0.003125)]
    below = [0.003125, *rates]
    assert edge_step("bias_lr", base, below, 0.0125, 5, accepts, below, tied) == ("inside after extension", [])
    # a lower score between the best and a tied value closes the side: the tie lies beyond a dip
    dip = tied_on_line(trials, [0.28, 0.2, 0.28, 0.1, 0.1], trials[2], "bias_lr")
    position, due = edge_step("bias_lr", base, rates, 0.025, 5, accepts, rates, dip)
    assert dip == [0.00625, 0.025] and (position, due) == ("inside after extension", [])
    # at the cap the plateau's side stays an unexplored edge
    capped = edge_step("bias_lr", [0.0125, 0.025], [0.0125, 0.025, 0.05], 0.025, 1, accepts, None, [0.025, 0.05])
    assert capped == ("edge (cap)", [])


def test_step_1_options_choose_nothing_where_every_head_is_selected():
    """With num_heads: all the ranking chooses no head over another, so L1 lambda's trials are
    the same training (num-heads-v2's K = all tied at 61.7% over three lambdas): the tuning does
    not judge or extend it, and the report says why."""
    assert chooses_nothing("l1_lambda", {"num_heads": "all"}) and chooses_nothing("scale_lr", {"num_heads": "all"})
    assert not chooses_nothing("l1_lambda", {"num_heads": 0.1}) and not chooses_nothing("bias_lr", {"num_heads": "all"})
    tune_grid = {"bias_lr": [0.0125, 0.025], "l1_lambda": [0.005, 0.02]}

    def record(lr, lam, score):
        trial = {"bias_lr": lr, "l1_lambda": lam}
        return {
            "trial": trial,
            "score": score,
            "tune_grid": tune_grid,
            "tune_extend": 3,
            "method": "lofit",
            "options": {"num_heads": "all", "bias_lr": lr, "l1_lambda": lam},
        }

    rates = (0.00625, 0.0125, 0.025)
    records = [record(lr, lam, 0.6 if lr == 0.0125 else 0.3) for lr in rates for lam in (0.005, 0.02)]
    positions = report_module._positions(records, report_module._best(records))
    assert [(option, position) for option, _, position, _ in positions] == [
        ("bias_lr", "inside after extension"),
        ("l1_lambda", "no effect: all heads"),
    ]


def test_the_extension_cap_counts_steps_beyond_the_base_grid_not_trials():
    """table3-v2's TruthfulQA group arm: one step of the penalty below its base grid (0.008), then
    three bias rates tried at it. Those are three trials but one step, so with a cap of 3 the
    penalty is still due its next step down (0.0032), as the runner had added it."""
    trials = [{"bias_lr": lr, "group_lambda": mu} for lr in (0.025, 0.05, 0.1) for mu in (0.02, 0.05)]
    trials += [{"bias_lr": 0.0125, "group_lambda": 0.02}]  # the first trial's rate extended
    trials += [{"bias_lr": lr, "group_lambda": 0.008} for lr in (0.025, 0.0125, 0.05)]
    best, accepts = trials[-2], lambda value: True
    explored, line = [t["group_lambda"] for t in trials], option_line(trials, best, "group_lambda")
    position, due = edge_step("group_lambda", [0.02, 0.05], explored, 0.008, 3, accepts, line)
    assert position == "edge (pending)" and due == [pytest.approx(0.0032)]
    steps = [0.008, 0.0032, 0.00128]  # three steps down (7 trials): at the cap of 3
    explored += [mu for mu in steps[1:] for _ in range(2)]
    assert edge_step("group_lambda", [0.02, 0.05], explored, 0.00128, 3, accepts, [0.02, *steps]) == ("edge (cap)", [])


def test_tuning_extends_past_the_edge_until_the_best_is_inside_and_resumes(setting, tmp_path, monkeypatch):
    arms = [RED_TUNED, {"label": "zero", "method": "zero-shot"}]
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=arms)))
    calls = []  # the best lr is 0.04, two log steps above the base grid; fewer epochs score higher
    fake = fake_fit(monkeypatch, lambda lr, epochs: 0.5 - 0.1 * abs(math.log2(lr / 0.04)) - 0.01 * epochs, calls)
    folder = tmp_path / "tuned"
    fake.stop_at = 6  # stopped during the second extension trial
    with pytest.raises(KeyboardInterrupt):
        Runner(grid, folder, tune=True, pool=ModelPool(), log=lambda _: None).run()
    first = read_results(folder)
    assert [r["trial"] for r in first] == [
        {"red_lr": 0.01, "red_epochs": 1},
        {"red_lr": 0.01, "red_epochs": 2},
        {"red_lr": 0.02, "red_epochs": 1},
        {"red_lr": 0.02, "red_epochs": 2},
        {"red_lr": 0.04, "red_epochs": 1},
    ]  # one step beyond lr's top edge
    assert [r["extends"] for r in first] == [None] * 4 + ["red_lr"] and first[4]["tune_grid"] == RED_TUNED["tune"]
    assert first[0]["options"]["eval_split"] == "val" and first[0]["options"]["limit"] == 300
    listing = Runner(grid, folder, tune=True, pool=ModelPool(), log=lambda _: None).listing()
    assert "(red_lr=0.08, red_epochs=1; extends red_lr)" in listing and "may be added" in listing
    # and red_epochs 2 at the best lr: the line through the best trial lacks the epochs above it
    assert "(red_lr=0.04, red_epochs=2; extends red_epochs)" in listing and listing.count("  tune ") == 7
    red_test = [line for line in listing.splitlines() if "  test " in line and " RED " in line]
    assert red_test[0].endswith("seed 1")  # the untuned setting until tuning has settled

    calls.clear()
    fake.stop_at = None
    records = Runner(grid, folder, tune=True, pool=ModelPool(), log=lambda _: None).run()
    # the recorded extension was not recomputed; then the tests, zero-shot's first: its group had
    # nothing to tune, so it waited from the start, behind the trials only
    assert calls == [(0.08, 1), (0.04, 2), None, (0.04, 1)]
    assert [r["phase"] for r in records] == ["tune"] * 7 + ["test", "test"]
    assert records[7]["label"] == "RED" and records[7]["trial"] == {"red_lr": 0.04, "red_epochs": 1}
    settled = Runner(grid, folder, tune=True, pool=ModelPool(), log=lambda _: None)
    assert "may be added" not in settled.listing() and settled.run() == records and len(calls) == 4

    report = write_report(folder).read_text()
    assert "| red_lr=0.04 (inside after extension), red_epochs=1 (edge (bound)) | 49.0 | 4 + 3 | 12 |" in report
    assert "Trials per arm (base + extension, over every task and setting): RED 4 + 3." in report
    assert "zero: none; RED: 1 (tuned)" in report  # the budgets as run, arms in the order of the test rows


class TwoWorkers(InlineExecutor):
    """Two jobs at once on a simulated clock: a job takes as many minutes as its trial's epochs
    (a test cell 1), runs when submitted, and :meth:`wait` returns the one that ends first."""

    capacity = 2

    def __init__(self, pool):
        super().__init__(functools.partial(runner_module.run_job, pool=pool))
        self.clock, self.events = 0.0, []

    def submit(self, job_id, job):
        self.events.append((self.clock, "start", job.cell.phase, dict(job.cell.trial)))
        ends = self.clock + dict(job.cell.trial).get("red_epochs", 1) + 0.001 * job_id  # ties: the earlier job
        self.queue.append((ends, job_id, job))

    def wait(self):
        self.queue.sort(key=lambda entry: entry[0])
        self.clock, job_id, job = self.queue.pop(0)
        return (job_id, *call(self.work, job))


def test_extensions_and_settled_groups_tests_start_as_soon_as_they_can(setting, tmp_path, monkeypatch):
    arms = [RED_TUNED, {"label": "zero", "method": "zero-shot"}]
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=arms)))
    fake_fit(monkeypatch, lambda lr, epochs: 0.5 - 0.1 * abs(math.log2(lr / 0.04)) - 0.01 * epochs, [])
    executor = TwoWorkers(ModelPool())
    Runner(grid, tmp_path / "out", tune=True, pool=ModelPool(), executor=executor, log=lambda _: None).run()
    starts = [(clock, phase, trial) for clock, _, phase, trial in executor.events]
    last_trial_ends = max(clock + trial["red_epochs"] for clock, phase, trial in starts if phase == "tune")
    zero_test = next(clock for clock, phase, trial in starts if phase == "test" and not trial)
    assert zero_test < last_trial_ends  # on the worker the trials left free, not after all of them
    extensions = [trial for _, phase, trial in starts if phase == "tune"][4:]
    assert extensions == [
        {"red_lr": 0.04, "red_epochs": 1},
        {"red_lr": 0.08, "red_epochs": 1},
        {"red_lr": 0.04, "red_epochs": 2},
    ]


def test_a_trial_a_sibling_records_while_it_waits_here_is_run_and_recorded_once(setting, tmp_path, monkeypatch):
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=[RED_TUNED])))
    fake_fit(monkeypatch, lambda lr, epochs: 0.5 - 0.1 * abs(math.log2(lr / 0.04)) - 0.01 * epochs, [])
    folder, sibling = tmp_path / "experiments" / "here", tmp_path / "experiments" / "other"
    waiting = Runner(grid, folder, tune=True, pool=ModelPool(), log=lambda _: None).trials()[3]

    class SiblingWrites(TwoWorkers):
        def wait(self):
            outcome = super().wait()
            if outcome[0] == 0:  # the first job has ended; the fourth trial is queued here
                sibling.mkdir(parents=True, exist_ok=True)
                append_result(sibling, {"key": waiting.key, "phase": "tune", "score": 0.01, "seconds": 1.0})
            return outcome

    executor = SiblingWrites(ModelPool())
    Runner(grid, folder, tune=True, pool=ModelPool(), executor=executor, log=lambda _: None).run()
    keys = [r["key"] for r in read_results(folder)]
    assert len(keys) == len(set(keys))
    (record,) = [r for r in read_results(folder) if r["key"] == waiting.key]
    assert "reused_from" not in record and record["score"] > 0.01  # its own run, not the copy


@pytest.mark.skipif(not (SHARED_DATA / "ood").is_dir(), reason="needs the shared data folder, as CI has")
def test_a_transfer_task_is_tuned_as_its_training_task_and_each_of_its_cells_runs_that_choice(monkeypatch, tmp_path):
    """ood's tasks truthfulqa:EVAL have no validation split and evaluate TruthfulQA's adapter: every
    trial runs on TruthfulQA's validation split, and the setting it chooses is the one each
    truthfulqa:EVAL cell of the arm runs, with every seed."""
    monkeypatch.setenv("LOFIT_DATA", str(SHARED_DATA))
    grid, folder = load_grid("ood"), tmp_path / "ood"
    middle = {arm.label: {option: values[len(values) // 2] for option, values in arm.tune.items()} for arm in grid.arms}

    def score(label: str, trial: dict) -> float:  # peaks at the middle of each base grid (the higher of two values)
        return 0.5 - sum(abs(math.log(trial[option] / best)) for option, best in middle[label].items()) / 100

    def due() -> list:  # the trials known now that have no record yet
        recorded = {record["key"] for record in read_results(folder)}
        return [
            cell for cell in Runner(grid, folder, tune=True, log=lambda _: None).trials() if cell.key not in recorded
        ]

    rounds = 0
    while new := due():
        rounds += 1
        for cell in new:
            assert cell.task == "truthfulqa" and cell.config["eval_split"] == "val", cell.describe()
            append_result(folder, trial_record(cell, "mc1", score(cell.label, dict(cell.trial)), 82))
    runner = Runner(grid, folder, tune=True, log=lambda _: None)
    assert rounds >= 2 and runner.pending_tuning() == 0  # extension trials came after the base grid
    tuned = [arm.label for arm in grid.arms if arm.tune]
    chosen = runner.chosen()
    assert sorted(chosen) == sorted(("truthfulqa", label, ()) for label in tuned)  # one tuning per arm
    tests = runner.test_cells()
    assert len(tests) == len(grid.tasks) * len(grid.arms) * len(grid.seeds)
    for cell in tests:
        assert dict(cell.trial) == (middle[cell.label] if cell.label in tuned else {}), cell.describe()
        assert cell.config["eval_split"] == "test"
    assert not unexplored_edges(read_results(folder))


GROUP_TUNED = {
    "label": "LoFiT",
    "method": "lofit",
    "options": {"num_heads": 2, "selection": "group"},
    "tune": {"group_lambda": [1e-2, 1e-1], "bias_lr": [1e-2, 2e-2]},
}


def trial_record(cell, metric: str, score: float, examples: int) -> dict:
    """The record of tuning trial ``cell`` as run, scoring ``score`` on ``examples`` validation examples."""
    return {
        "key": cell.key,
        "phase": "tune",
        "label": cell.label,
        "task": cell.task,
        "seed": cell.seed,
        "method": cell.method,
        "point": {},
        "trial": dict(cell.trial),
        "options": cell.config,
        "metric": metric,
        "score": score,
        "metrics": {metric: score, "num_examples": examples},
    }


def record_group_trials(folder: Path, grid, arm: dict, outcome) -> None:
    """Record every base trial of ``arm`` as run, with ``outcome(trial)`` = (its score, how many
    of its 2 heads scored 0 in step 1)."""
    for cell in Runner(grid, folder, tune=True, log=lambda _: None).trials():
        score, zeros = outcome(dict(cell.trial))
        append_result(
            folder,
            trial_record(cell, "exact_match", score, 12)
            | {
                "selected_heads": [[0, 0], [0, 1]],
                "zero_score_heads": zeros,
                "extends": None,
                "tune_grid": arm["tune"],
                "tune_extend": 0,
            },
        )


def test_a_trial_whose_step_1_kept_fewer_than_k_heads_is_never_chosen(setting, tmp_path):
    """The stronger penalty left 1 of the 2 heads it trained at a score of 0 (picked in index
    order, chosen by nothing): however well it scores, the tuning and the report choose the trial
    that kept its K heads, and the report says why the other is not eligible."""
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=[GROUP_TUNED], tune_extend=0)))
    folder = tmp_path / "runs" / "group"

    def outcome(trial: dict) -> tuple[float, int]:  # the strong penalty scores higher, but trained a head at zero
        strong = trial["group_lambda"] == 1e-1
        return (0.75 if strong else 0.25) - 5 * trial["bias_lr"], int(strong)

    record_group_trials(folder, grid, GROUP_TUNED, outcome)
    best = {"group_lambda": 1e-2, "bias_lr": 1e-2}
    assert list(Runner(grid, folder, tune=True, log=lambda _: None).chosen().values()) == [best]
    records = read_results(folder)
    assert report_module._best(records)["trial"] == best
    rows = report_module._tuning(records)
    assert rows.count("(not eligible: 1 of its 2 heads scored 0 in step 1)") == 2
    assert "| 70.0 (not eligible: 1 of its 2 heads scored 0 in step 1) |" in rows
    assert "| 20.0 | 4 + 0 | 12 |" in rows  # the chosen trial's score in the summary


def test_the_report_says_when_a_chosen_value_is_inside_only_beside_a_trial_that_kept_fewer_than_k_heads(
    setting, tmp_path
):
    """The penalty's best eligible value 1e-2 has an eligible trial below it and, above it, only a
    trial whose step 1 kept fewer than K heads: inside, and the report says which side is a non-selection."""
    arm = GROUP_TUNED | {"tune": {"group_lambda": [1e-3, 1e-2, 1e-1], "bias_lr": [1e-2, 2e-2, 4e-2]}}
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=[arm], tune_extend=0)))
    folder = tmp_path / "runs" / "group"

    def outcome(trial: dict) -> tuple[float, int]:  # 1e-1 would score highest, but kept 1 of its 2 heads
        lam, lr = trial["group_lambda"], trial["bias_lr"]
        score = 0.5 - 0.1 * abs(math.log10(lam / 1e-2)) - 0.1 * abs(math.log2(lr / 2e-2))
        return score + (0.3 if lam == 1e-1 else 0.0), int(lam == 1e-1)

    record_group_trials(folder, grid, arm, outcome)
    summary = report_module._tuning(read_results(folder))
    assert (
        "| group_lambda=0.01 (inside; the trial above kept fewer than K heads), bias_lr=0.02 (inside) | 50.0 |"
        in summary
    )
    assert unexplored_edges(read_results(folder)) == []


def test_a_step_2_cell_records_how_many_of_its_heads_scored_0_in_step_1_and_its_report_says_so(setting, tmp_path):
    """A group penalty far above every head's gradient sets all scales to 0: both heads the cell
    trained are index-order picks among heads at zero."""
    arms = [GROUP_TUNED | {"options": GROUP_TUNED["options"] | {"group_lambda": 1e3}, "tune": {}}]
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=arms)))
    folder = tmp_path / "runs" / "zeros"
    (test,) = Runner(grid, folder, log=lambda _: None).run()
    (ranking,) = [r for r in read_results(folder) if r["phase"] == "ranking"]
    assert not any(any(row) for row in ranking["scores"])
    assert test["selected_heads"] == [[0, 0], [0, 1]] and test["zero_score_heads"] == 2
    report = report_module.write_report(folder).read_text()
    assert "Not a selection: 1 test runs trained heads that their step 1 scored exactly 0" in report
    assert f"- {test['task']}, LoFiT, no sweep point, seed {test['seed']}: 2 of its 2 heads" in report


def test_the_reports_localization_has_a_row_for_each_k_and_arm_that_tuned_a_shared_ranking():
    """One step-1 ranking serves cells of three K (num-heads) and two arms (capacity): a row per K
    and arm, each with that K's figures and only its own cells' scores; at K = N there is no
    selection to judge. A cell that tuned the heads on another task (cross-task) or was evaluated
    on one is no score of the ranking's task. A cell without recorded heads counts at the ranking's
    K. A ranking no cell tuned keeps one row, at its own K."""
    options = {"l1_lambda": 0.02, "scale_lr": 5e-3, "select_epochs": 5}
    ranking = {"key": "r1", "phase": "ranking", "task": "clutrr", "seed": 42, "options": options, "top_k": 1}
    unused = ranking | {"key": "r2", "seed": 43}
    records = [ranking | {"scores": [[4.0, 0.0, 0.0, 0.0]]}, unused | {"scores": [[1.0, 1.0, 1.0, 1.0]]}]
    cells = [
        ("v", "clutrr", 1, 0.5),
        ("v", "clutrr", 0, 0.7),  # no selected_heads recorded: the ranking's K, 1
        ("A and v", "clutrr", 1, 0.2),
        ("v", "clutrr", 2, 0.3),
        ("v", "clutrr", 4, 0.9),
        ("v", "mquake", 1, 0.1),  # the clutrr heads tuned on MQuAKE
        ("v", "clutrr:mquake", 1, 0.1),  # tuned on CLUTRR, evaluated on MQuAKE
    ]
    for label, task, heads, score in cells:
        selected = {"selected_heads": [[0, 0]] * heads} if heads else {}
        records.append({"phase": "tune", "label": label, "task": task, "ranking_key": "r1", "score": score} | selected)
    prefix = "| clutrr | 42 | L1 0.02, scale lr 0.005, 5 epochs | "
    rows = [line for line in report_module.localization(records).splitlines() if line.startswith("| clutrr")]
    assert rows == [
        prefix + "A and v | 1 of 4 | 100.0% (25.0%) | 1 | 3 (3) | localized | 20.0% (1) |  |",
        prefix + "v | 1 of 4 | 100.0% (25.0%) | 1 | 3 (3) | localized | 60.0% (2) |  |",
        prefix + "v | 2 of 4 | 100.0% (50.0%) | 1 | 3 (3) | localized | 30.0% (1) |  |",
        prefix + "v | 4 of 4 | 100.0% (100.0%) | 1 | 3 (3) | no selection (all heads) | 90.0% (1) |  |",
        prefix.replace("42", "43") + " | 1 of 4 | 25.0% (25.0%) | 4 | 0 (0) | NOT localized |  |  |",
    ]


def test_the_best_trials_adapter_is_the_test_cells_of_its_seed(setting, tmp_path, monkeypatch):
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=[RED_TUNED], seeds=[1, 2])))
    trained, evaluated = [], []
    real_cell, real_eval = runner_module.run_cell, runner_module.run_eval
    warned = {"warnings": ["the loss is diverging"]}  # what a training warned of reaches the cells evaluating it
    monkeypatch.setattr(
        runner_module, "run_cell", lambda c, m: trained.append(c.run.eval_split) or real_cell(c, m) | warned
    )
    monkeypatch.setattr(
        runner_module, "run_eval", lambda *a, **k: evaluated.append(a[0].eval_split) or real_eval(*a, **k)
    )
    records = Runner(grid, tmp_path / "out", tune=True, pool=ModelPool(), log=lambda _: None).run()
    trials = {r["key"]: r for r in records if r["phase"] == "tune"}
    first, second = (r for r in records if r["phase"] == "test")
    best = max(trials.values(), key=lambda r: r["score"])  # the first of equal scores wins, as in tuning
    assert first["seed"] == 1 and first["trial"] == best["trial"] and first["trained_by"] == best["key"]
    assert second["seed"] == 2 and second["trained_by"] is None  # another seed trains anew
    assert trained == ["val"] * len(trials) + ["test"] and evaluated == ["test"]  # one training per seed and trial
    assert first["trained_parameters"] == best["trained_parameters"] and len(first["per_example"]) == 12
    assert first["warnings"] == second["warnings"] == best["warnings"] == warned["warnings"]


def test_an_edge_left_unexplored_at_the_cap_is_marked(setting, tmp_path, monkeypatch, capsys):
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, tune_extend=1, arms=[RED_TUNED])))
    fake_fit(monkeypatch, lambda lr, epochs: 10 * lr + 0.01 * epochs, calls := [])  # higher is better for both
    Runner(grid, tmp_path / "capped", tune=True, pool=ModelPool(), log=lambda _: None).run()
    # the base trials; one step beyond each edge of the best (0.02, 2); then the epochs the line
    # through the new best (0.04, 2) lacks on each side; then the test of (0.04, 4)
    assert calls == [(0.01, 1), (0.01, 2), (0.02, 1), (0.02, 2), (0.04, 2), (0.02, 4), (0.04, 1), (0.04, 4), (0.04, 4)]
    report = write_report(tmp_path / "capped").read_text()
    assert "| red_lr=0.04 (**edge (cap)**), red_epochs=4 (**edge (cap)**) | 44.0 | 4 + 4 | 12 |" in report
    records = read_results(tmp_path / "capped")
    edges = [
        f"{records[0]['task']}, RED, no sweep point: {value} (edge (cap))" for value in ("red_lr=0.04", "red_epochs=4")
    ]
    assert unexplored_edges(records) == edges
    assert edge_warning(tmp_path / "capped").endswith("\n  - " + "\n  - ".join(edges))
    capsys.readouterr()
    assert main(["report", str(tmp_path / "capped")]) == 0
    assert capsys.readouterr().err == edge_warning(tmp_path / "capped") + "\n"  # lofit report warns


def test_a_group_whose_trials_all_score_the_same_is_extended_on_both_sides_and_marked_flat(
    setting, tmp_path, monkeypatch
):
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, tune_extend=2, arms=[RED_TUNED])))
    fake_fit(monkeypatch, lambda lr, epochs: 0.0, calls := [])  # fails at every setting
    Runner(grid, tmp_path / "flat", tune=True, pool=ModelPool(), log=lambda _: None).run()
    base = [(0.01, 1), (0.01, 2), (0.02, 1), (0.02, 2)]
    # the first trial's line is extended below lr (epochs have no value below 1); then, settled with
    # no value best, each option one step beyond its lowest and highest value per round, at the first
    # trial's other values, to the cap; then the first trial's test
    flat_rounds = [(0.0025, 1), (0.04, 1), (0.01, 4), (0.08, 1), (0.01, 8)]
    assert calls == [*base, (0.005, 1), *flat_rounds, (0.01, 1)]
    report = write_report(tmp_path / "flat").read_text()
    assert "| red_lr=0.01 (flat), red_epochs=1 (flat) | 0.0 | 4 + 6 | 12 |" in report
    assert unexplored_edges(read_results(tmp_path / "flat")) == []

    def works_below(lr, epochs):  # a method that diverges on the base grid, as LoReFT did on Gemma 3
        return 0.0 if lr > 0.005 else (0.3 if lr == 0.005 else 0.2) - 0.01 * epochs

    fake_fit(monkeypatch, works_below, calls := [])
    # in another parent folder, so that nothing is copied from the first
    Runner(grid, tmp_path / "apart" / "found", tune=True, pool=ModelPool(), log=lambda _: None).run()
    # the first trial's line finds lr 0.005 before the search is flat: no trial on the flat rounds
    assert calls == [*base, (0.005, 1), (0.0025, 1), (0.005, 2), (0.005, 1)]
    report = write_report(tmp_path / "apart" / "found").read_text()
    assert "| red_lr=0.005 (inside after extension), red_epochs=1 (edge (bound)) | 29.0 | 4 + 3 | 12 |" in report


def test_ties_are_broken_in_the_searchs_order_and_trials_that_count_for_nothing_do_not_break_a_flat_group():
    grid = {"red_lr": [0.01, 0.02], "red_epochs": [1, 2]}

    def trial(lr, epochs, score, extends=None):
        return {"trial": {"red_lr": lr, "red_epochs": epochs}, "score": score, "tune_grid": grid, "extends": extends}

    # recorded out of the grid's order (two drivers): the search's first trial wins the tie, as it was tested
    records = [trial(0.02, 1, 0.5), trial(0.005, 1, 0.5, "red_lr"), trial(0.01, 2, 0.5), trial(0.01, 1, 0.5)]
    assert report_module._best(records)["trial"] == {"red_lr": 0.01, "red_epochs": 1}
    assert all_tied([0.0, float("-inf"), 0.0]) and all_tied([float("-inf")] * 2) and not all_tied([0.0, 0.1])


def test_siblings_are_named_from_the_working_directory_even_for_the_folder_dot(setting, tmp_path, monkeypatch):
    lofit_only = [{"label": "LoFiT", "method": "lofit"}]
    first = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=lofit_only)))
    Runner(first, tmp_path / "experiments" / "first", pool=ModelPool(), log=lambda _: None).run()
    here = tmp_path / "experiments" / "second"
    here.mkdir()
    (tmp_path / "experiments" / "link-to-second").symlink_to(here)  # this experiment under another name
    monkeypatch.chdir(here)
    second = load_grid(str(grid_file(setting, tmp_path, name="second", sweep={}, arms=lofit_only)))
    shared = Runner(second, Path("."), pool=ModelPool(), log=lambda _: None).shared
    assert {r["reused_from"] for r in shared.values()} == {str(Path("..") / "first")}  # no absolute path
    assert {key for key, _ in shared} == {r["key"] for r in read_results(tmp_path / "experiments" / "first")}


def test_a_sibling_experiments_cells_are_copied_not_run_again(setting, tmp_path, monkeypatch):
    fake_fit(monkeypatch, lambda lr, epochs: 10 * lr + 0.01 * epochs, calls := [])
    swept = {"num_heads": [3]}  # a sweep point there, a plain option here: the same cells
    first = load_grid(str(grid_file(setting, tmp_path, sweep=swept, tune_extend=1, arms=[RED_TUNED])))
    Runner(first, tmp_path / "experiments" / "first", tune=True, pool=ModelPool(), log=lambda _: None).run()
    assert len(calls) == 9  # 4 base trials, 4 extensions, the test
    arms = [RED_TUNED | {"label": "RED again"}, {"label": "zero", "method": "zero-shot"}]
    options = {"model": setting["model"], "num_heads": 3} | FAST
    second = load_grid(
        str(grid_file(setting, tmp_path, name="second", options=options, sweep={}, tune_extend=1, arms=arms))
    )
    folder = tmp_path / "experiments" / "second"
    listing = Runner(second, folder, tune=True, pool=ModelPool(), log=lambda _: None).listing()
    assert listing.count("     shared  ") == 9 and "(red_lr=0.04, red_epochs=2; extends red_lr)" in listing
    assert "10 cells, 0 done, 9 measured by an experiment beside this one" in listing
    status = Runner(second, folder, tune=True, pool=ModelPool(), log=lambda _: None).status()
    assert "10 cells: 0 done, 9 shared (copied when the experiment runs), 0 running" in status
    assert status.count("  shared   tune ") == 8 and "measured in " in status

    records = Runner(second, folder, tune=True, pool=ModelPool(), log=lambda _: None).run()
    assert len(calls) == 10 and calls[-1] is None  # only the zero-shot cell ran
    copied = [r for r in records if r["method"] == "red"]
    assert len(copied) == 9 and all(r["reused_from"].endswith("first") for r in copied)
    assert {r["label"] for r in copied} == {"RED again"} and {r["experiment"] for r in copied} == {"second"}
    assert sum(r.get("extends") == "red_lr" for r in copied) == 1 and copied[-1]["phase"] == "test"
    assert copied[-1]["trial"] == {"red_lr": 0.04, "red_epochs": 4} and all(r["point"] == {} for r in copied)
    report = write_report(folder).read_text()
    chosen = "| red_lr=0.04 (**edge (cap)**), red_epochs=4 (**edge (cap)**) | 44.0 | 4 + 4 | 12 |"
    assert f"| RED again |  {chosen}" in report  # this grid's tuning fields, the first's scores
    assert Runner(second, folder, tune=True, pool=ModelPool(), log=lambda _: None).run() == records


def _scored_record(key: str, label: str, task: str, seed: int, point: dict, per_example: list, **fields) -> dict:
    """A test record of results.jsonl scoring exact match over 4 examples, with ``fields`` on top."""
    return {
        "key": key,
        "phase": "test",
        "label": label,
        "task": task,
        "seed": seed,
        "method": "lofit",
        "point": point,
        "trial": {},
        "metric": "exact_match",
        "score": sum(per_example) / 4,
        "metrics": {"exact_match": sum(per_example) / 4, "num_examples": 4},
        "per_example": per_example,
        "seconds": 60.0,
    } | fields


def test_report_is_rebuilt_from_results_jsonl_alone(tmp_path):
    def record(key, task, heads_task, seed, per_example):
        return _scored_record(
            key,
            "LoFiT",
            task,
            seed,
            {"heads_task": heads_task},
            per_example,
            trained_parameters=64,
            experiment="cross-task",
            report={"kind": "cross-task"},
        )

    for line in [
        record("a", "x", "x", 1, [1, 1, 1, 1]),
        record("b", "x", "y", 1, [0, 0, 0, 0]),
        record("c", "y", "y", 1, [1, 0, 1, 0]),
        record("d", "y", "x", 1, [1, 0, 1, 0]),
    ]:
        append_result(tmp_path, line)
    with open(tmp_path / RESULTS, "a") as file:
        file.write('{"key": "torn')  # an interrupted write
    report = write_report(tmp_path).read_text()
    assert "-100.0 [-100.0, -100.0], p=0.000" in report  # heads from y, tuned on x: all wrong vs all right
    assert "+0.0 [+0.0, +0.0], p=1.000" in report
    assert (tmp_path / "cross_task.png").stat().st_size > 0
    assert "**100.0 (1 seed)**" in report and "4 test runs" in report
    assert "- not recorded: 4 runs and trials" in report  # where they ran: not in these records
    assert "| 1.0 |" in report  # minutes per run

    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path)]) == 0 and (tmp_path / "report.md").read_text() == report
    append_result(tmp_path, {"key": "after-the-torn-line", "phase": "other"})
    assert [r["key"] for r in read_results(tmp_path)] == ["a", "b", "c", "d", "after-the-torn-line"]


def test_a_cross_task_report_without_test_runs_lists_its_trials(tmp_path):
    append_result(
        tmp_path,
        {
            "key": "t",
            "phase": "tune",
            "label": "LoFiT",
            "task": "x",
            "seed": 1,
            "method": "lofit",
            "point": {"heads_task": "y"},
            "trial": {"bias_lr": 0.01},
            "metric": "exact_match",
            "score": 0.5,
            "metrics": {"num_examples": 4},
            "seconds": 1.0,
            "experiment": "cross-task",
            "report": {"kind": "cross-task"},
        },
    )
    report = write_report(tmp_path).read_text()
    assert "| x | LoFiT | heads_task=y | bias_lr=0.01 | 50.0 | 4 |" in report and "Cross-task" not in report
    assert not (tmp_path / "cross_task.png").exists()


def test_summary_keeps_each_tasks_rows_together():
    def record(task, heads):
        return _scored_record("", "LoFiT", task, 1, {"heads": heads}, [1, 1, 0, 0])

    records = [record("x", "a"), record("y", "a"), record("x", "b"), record("y", "b")]  # x's "b" finished after y's "a"
    assert [(row["task"], row["point_values"]["heads"]) for row in report_module.summarize(records)] == [
        ("x", "a"),
        ("x", "b"),
        ("y", "a"),
        ("y", "b"),
    ]


def test_summary_groups_arms_and_orders_numeric_points():
    def record(label, size):
        return _scored_record("", label, "x", 1, {"train_size": size}, [1, 1, 0, 0])

    records = [
        record("LoFiT", 10),
        record("RED", 10),
        record("RED", 300),
        record("LoFiT", 300),
        record("LoFiT", 100),
        record("RED", "all"),
    ]
    assert [(row["label"], row["point_values"]["train_size"]) for row in report_module.summarize(records)] == [
        ("LoFiT", 10),
        ("LoFiT", 100),
        ("LoFiT", 300),
        ("RED", 10),
        ("RED", 300),
        ("RED", "all"),
    ]


def test_tuning_trials_are_listed_with_their_arm_when_one_finished_late():
    def trial(task, label, lr):
        return _scored_record("", label, task, 1, {}, [1, 1, 0, 0]) | {"phase": "tune", "trial": {"lr": lr}}

    # a resumed run finished x's RED trial at 0.03 after every trial of task y
    records = [trial("x", "LoFiT", 0.01), trial("x", "RED", 0.01), trial("y", "LoFiT", 0.01), trial("x", "RED", 0.03)]
    listing = report_module._tuning(records).split("## Tuning trials")[1]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in listing.splitlines()
        if line.startswith(("| x", "| y"))
    ]
    assert [(task, arm, trial) for task, arm, _, trial, *_ in rows] == [
        ("x", "LoFiT", "lr=0.01"),
        ("x", "RED", "lr=0.01"),
        ("x", "RED", "lr=0.03"),
        ("y", "LoFiT", "lr=0.01"),
    ]


@pytest.mark.parametrize("method", ["red", "lofit"])  # RED's cell resumes; LoFiT's step-1 ranking does
def test_a_job_resumed_mid_training_records_the_steps_it_did_not_run(setting, tmp_path, monkeypatch, method):
    options = {"model": setting["model"]} | FAST | {"red_epochs": 3, "select_epochs": 3, "save_steps": 1}
    arm = {"label": "RED" if method == "red" else "LoFiT", "method": method}
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, options=options, arms=[arm])))
    folder, original, steps = tmp_path / "out", training._step, []

    def interrupted_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt  # a checkpoint after each of the first two steps
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        Runner(grid, folder, pool=ModelPool(), log=lambda _: None).run()
    monkeypatch.setattr(training, "_step", original)
    (record,) = Runner(grid, folder, pool=ModelPool(), log=lambda _: None).run()
    if method == "lofit":
        (ranking,) = [r for r in read_results(folder) if r["phase"] == "ranking"]
        assert ranking["resumed_steps"] == 2 and record["resumed_steps"] == 0
        assert [w.split(":")[0] for w in ranking["warnings"]] == ["step 1 did not localize"]  # from metrics.json
        return
    assert record["resumed_steps"] == 2
    rows = [
        line for line in write_report(folder).read_text().splitlines() if line.startswith(f"| {setting['task']} | RED")
    ]
    assert len(rows) == 1 and rows[0].endswith("(resumed from a checkpoint: the steps before it are not counted) |")
    runner = Runner(grid, folder, pool=ModelPool(), log=lambda _: None)
    assert runner.estimate(runner.test_cells()[0])[1] is False  # a resumed cell's seconds time no cell to come


def test_budgets_list_each_arms_epochs_once_in_increasing_order():
    def trial(label, epochs, **options):
        base = {"tune_epochs": epochs, "select_epochs": 5} | options
        return {"phase": "tune", "label": label, "method": "lofit", "options": base, "trial": {"tune_epochs": epochs}}

    records = [trial("v", 12), trial("v", 3), trial("v", 48), trial("v", 3), trial("A and v", 6, tune_scales=True)]
    assert report_module._budgets(records) == (
        "Training budgets (epochs over the training set): v: 3, 12 or 48 (step 2, the biases) + 5 of step 1 spent "
        "choosing the heads (tuned); A and v: 6 (step 2, A and v) + 5 of step 1 spent choosing the heads (tuned)."
    )


def test_estimates_scale_measured_seconds_by_each_cells_rough_cost(setting, tmp_path):
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=[RED_TUNED])))
    runner = Runner(grid, tmp_path / "out", tune=True, pool=ModelPool(), log=lambda _: None)
    one, two = [c for c in runner.trials() if dict(c.trial)["red_lr"] == 0.01]  # 1 and 2 epochs
    rough_one, measured = runner.estimate(one)
    assert not measured
    finished = {"key": one.key, "phase": "tune", "method": "red", "task": one.task, "options": one.config}
    runner.done[one.key] = finished | {"seconds": 10 * rough_one, "hardware": here()}  # 10x slower than rough
    assert runner.estimate(one) == (pytest.approx(10 * rough_one), True)
    rough_two = runner_module._rough_seconds(two.config, "red", "tune", True)
    assert runner.estimate(two) == (pytest.approx(10 * rough_two), True)
    assert runner.estimate(two)[0] > 1.5 * runner.estimate(one)[0]  # twice the epochs, the same evaluation


def test_example_counts_follow_the_data_folder_lofit_data_names(tmp_path, monkeypatch):
    row = {"clean_story": "[Ann] is the mother of [Bob].", "query": "('Bob', 'Ann')", "target_text": "mother"}
    for name, stories in (("small", 2), ("large", 5)):
        (tmp_path / name / "clutrr").mkdir(parents=True)
        for split in ("train", "val"):
            (tmp_path / name / "clutrr" / f"{split}.json").write_text(json.dumps([row] * stories))
    options = {"task": "clutrr", "fold": 0, "all_pairs": False, "eval_file": None, "match": None, "data_dir": None}
    options |= {"train_size": None, "seed": 1, "eval_split": "val", "limit": None}
    counts = {}
    for name in ("small", "large", "small"):
        monkeypatch.setenv("LOFIT_DATA", str(tmp_path / name))
        counts[name] = runner_module._example_counts(options)
    assert counts == {"small": (2, 2), "large": (5, 5)}  # not the counts of the folder read first
    monkeypatch.setenv("LOFIT_DATA", str(tmp_path / "large"))
    assert runner_module._example_counts(options | {"limit": 3}) == (5, 3)
    assert runner_module._example_counts(options | {"limit": 3, "data_dir": str(tmp_path / "small")}) == (2, 2)


def test_minutes_per_run_are_not_averaged_across_hardware():
    runs = [{"seconds": 60.0, "hardware": "cuda: a GPU"}, {"seconds": 1200.0, "hardware": "cpu: a CPU, 2 threads"}]
    assert report_module._minutes(runs) == "20.0 on cpu: a CPU, 2 threads; 1.0 on cuda: a GPU"
    assert report_module._minutes(runs[:1] * 2) == "1.0"
    resumed = {"seconds": 6.0, "hardware": "cuda: a GPU", "resumed_steps": 90}
    assert report_module._minutes([runs[0], resumed]) == "1.0"  # a resumed run's time misses its first steps
    evaluated = {"seconds": 3.0, "hardware": "cuda: a GPU", "trained_by": "abc"}
    assert report_module._minutes([resumed, evaluated]) == (
        "0.1 (resumed from a checkpoint: the steps before it are not counted)"
    )
    assert report_module._minutes([evaluated]) == "0.1 (evaluation only: another cell trained the adapter)"


def test_log_scale_curves_are_ticked_at_the_measured_values(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: saved.append(figure))
    plots.curves(
        {"task": {"LoFiT": [(30, 50.0, 1.0), (10, 40.0, 2.0)], "RED": [(300, 60.0, 0.5)]}},
        tmp_path / "n.png",
        "train size",
        "score (%)",
        log_x=True,
    )
    (ax,) = saved[0].axes
    assert [label.get_text() for label in ax.get_xticklabels()] == ["10", "30", "300"]
    assert ax.xaxis.get_minorticklocs().size == 0


def test_layers_report_counts_heads_per_layer_and_overlap(tmp_path):
    def ranking(key, task, scores):
        return {
            "key": key,
            "phase": "ranking",
            "task": task,
            "seed": 1,
            "top_k": 2,
            "scores": scores,
            "seconds": 1.0,
            "experiment": "layers",
            "report": {"kind": "layers"},
        }

    append_result(tmp_path, ranking("a", "x", [[3.0, 2.0], [0.0, 1.0]]))  # top 2: (0,0), (0,1)
    append_result(tmp_path, ranking("b", "y", [[3.0, 0.0], [2.0, 1.0]]))  # top 2: (0,0), (1,0)
    # Seed 2's record was made for another K (a sibling experiment's): compared at seed 1's K of 2.
    append_result(
        tmp_path, ranking("c", "x", [[0.0, 2.0], [3.0, 1.0]]) | {"seed": 2, "top_k": 1}
    )  # top 2: (1,0), (0,1)
    report = write_report(tmp_path).read_text()
    assert "| x | 2 | 2 0 | 0.0 |" in report and "| y | 2 | 1 1 | 0.5 |" in report  # seed 1's ranking
    assert "| x | 1, 2 | 1 / 0.33 |" in report and "| y | 1, 2 |" not in report
    assert "| x | 2 / 1.00 | 1 / 0.33 |" in report and (tmp_path / "layers.png").is_file()
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


def test_paired_bootstrap_known_answers():
    same = paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0], resamples=500)
    assert same.difference == 0 and same.p_value == 1.0
    opposite = paired_bootstrap([1] * 30, [0] * 30, resamples=999)
    assert (
        opposite.difference == 1 and opposite.p_value == pytest.approx(1 / 1000) and opposite.low == opposite.high == 1
    )
    small = paired_bootstrap([1] + [0] * 99, [0] * 100, resamples=2000)  # one example of 100 differs: not significant
    assert small.difference == pytest.approx(0.01) and small.p_value > 0.3 and small.low == 0
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])


def test_seeds_are_paired_by_example_and_whole_examples_resampled():
    a, b = [1, 1, 0, 1, 0, 1, 1, 0], [0, 1, 0, 0, 0, 1, 0, 0]
    one_run = paired_bootstrap(a, b)
    agreeing = paired_bootstrap_over_seeds({1: a, 2: a}, {1: b, 2: b, 3: a})  # seeds that agree add no examples
    assert agreeing == dataclasses.replace(one_run, seeds=(1, 2))
    concatenated = paired_bootstrap(a + a, b + b)  # the same answers as 16 independent pairs: too narrow
    assert concatenated.high - concatenated.low < agreeing.high - agreeing.low
    mixed = paired_bootstrap_over_seeds({1: [1, 1, 0, 0], 2: [0, 1, 1, 0]}, {1: [0, 0, 0, 0], 2: [0, 1, 0, 0]})
    averaged = paired_bootstrap([0.5, 1, 0.5, 0], [0, 0.5, 0, 0])
    assert mixed.difference == pytest.approx(0.375) and mixed == dataclasses.replace(averaged, seeds=(1, 2))
    for runs, message in [
        ({3: a}, "no seed run by both systems"),
        ({1: a[:4]}, "scored different numbers of examples: \\[4, 8\\]"),
        ({1: []}, "the first system's run of seed\\(s\\) \\[1\\] has no per-example scores"),
    ]:
        with pytest.raises(ValueError, match=message):
            paired_bootstrap_over_seeds(runs, {1: b})


def test_dry_run_lists_cells_and_runs_nothing(setting, tmp_path, capsys):
    out = tmp_path / "dry"
    assert (
        main(
            [
                "experiment",
                "--grid",
                str(grid_file(setting, tmp_path)),
                "--output-dir",
                str(out),
                "--dry-run",
                "--seeds",
                "1,2",
                "--tune",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("  tune ") == 16 and printed.count("  test ") == 8
    assert "24 cells, 0 done, 0 step-1 rankings" in printed
    assert "0 of 24 missing cells timed by finished cells" in printed and "extension trials may be added" in printed
    assert not out.exists()
    assert main(["experiment", "table3", "--grid", "x.yaml", "--dry-run"]) == 2
    assert main(["experiment", "no-such-experiment", "--dry-run"]) == 2
    shutil.rmtree(tmp_path / "dry", ignore_errors=True)


@pytest.mark.parametrize("name", sorted(shipped_grids()))
def test_show_grid_prints_what_grid_reads_back_to_the_same_cells(name, tmp_path, capsys):
    assert main(["experiment", name, "--show-grid", "--seeds", "7"]) == 0
    printed = tmp_path / "shown.yaml"
    printed.write_text(capsys.readouterr().out)
    shown, grid = load_grid(str(printed)), load_grid(name)
    grid.seeds = [7]
    assert "base" not in yaml.safe_load(printed.read_text()) and shown.seeds == [7]
    for phase in ("tune", "test"):
        assert [c.key for c in expand(shown, phase, {})] == [c.key for c in expand(grid, phase, {})]


def test_show_grid_dry_run_and_status_are_one_at_a_time(capsys):
    assert main(["experiment", "table3", "--show-grid", "--dry-run"]) == 2
    assert "give one of --show-grid, --dry-run and --status, not --show-grid and --dry-run" in capsys.readouterr().err
    assert main(["experiment", "table3", "--show-grid", "--workers", "2"]) == 2
    assert "--show-grid runs nothing: --executor and its options do not apply" in capsys.readouterr().err


def test_time_estimates_come_from_cells_finished_on_this_hardware(setting, tmp_path):
    grid = load_grid(str(grid_file(setting, tmp_path)))
    runner = Runner(grid, tmp_path / "out", log=lambda _: None)
    cell = runner.test_cells()[0]
    current = here()
    alike = {"method": cell.method, "task": cell.task, "phase": cell.phase, "options": cell.config}
    runner.done = {
        "a": alike | {"seconds": 100.0, "hardware": current},
        "b": alike | {"seconds": 2.0, "hardware": "cuda: a GPU"},
    }
    assert runner.estimate(cell) == (pytest.approx(100.0), True)
    runner.done["c"] = alike | {"seconds": 50.0}  # hardware unrecorded
    assert runner.estimate(cell) == (pytest.approx(75.0), True)
    for name, value in [("model", "another-model"), ("dtype", "bfloat16")]:  # not timed by other models or dtypes
        runner.done[name] = alike | {"seconds": 1000.0, "options": cell.config | {name: value}}
    assert runner.estimate(cell) == (pytest.approx(75.0), True)
    cells = runner.test_cells()
    alike = sum((c.method, c.task, c.phase) == (cell.method, cell.task, cell.phase) for c in cells)
    assert (
        0 < alike < len(cells) and f"{alike} of {len(cells)} missing cells timed by finished cells" in runner.listing()
    )


@pytest.mark.parametrize("method", ["lora", "reft"])
def test_a_cell_gives_the_lent_model_back_clean(setting, tmp_path, method):
    pool = ModelPool()
    compute = runner_module.ComputeConfig()
    base = pool(setting["model"], compute)[0]
    names = [name for name, _ in base.named_modules()]
    probe = torch.tensor([[1, 2, 3, 4]])
    before = base(probe).logits
    method_config = METHODS[method].config_class(**{f"{method}_epochs": 1})
    run = RunConfig(
        task=setting["task"], model=setting["model"], method=method, output_dir=str(tmp_path / method), progress=False
    )
    summary = run_cell(
        CellConfig(run=run, lofit=LofitConfig(batch_size=8), compute=compute, method=method_config), pool
    )
    assert summary["trained_parameters"] > 0
    assert pool(setting["model"], compute)[0] is base  # lent again: no hooks left
    assert [name for name, _ in base.named_modules()] == names and torch.equal(base(probe).logits, before)


def test_each_row_is_compared_with_the_grids_reference_row_by_the_paired_bootstrap(tmp_path, capsys):
    def record(key, label, seed, per_example, point):
        return _scored_record(
            key, label, "x", seed, point, per_example, report={"kind": "table", "compare_to": {"heads": "lofit"}}
        )

    for line in [
        record("a", "L", 1, [1, 1, 0, 0], {"heads": "lofit"}),
        record("b", "L", 1, [1, 1, 1, 1], {"heads": "random"}),  # +50 points on seed 1
        record("c", "L", 2, [0, 0, 0, 0], {"heads": "lofit"}),
        record("d", "L", 2, [0, 0, 0, 1], {"heads": "random"}),  # +25 on seed 2
        record("e", "L", 3, [1, 1, 1, 1], {"heads": "iti"}),  # no seed shared with the reference
    ]:
        append_result(tmp_path, line)
    report = write_report(tmp_path).read_text()
    assert "## Each row against heads=lofit" in report
    assert "| x | L | heads=lofit | **25.0** | reference |  | 1,2 |" in report
    both = paired_bootstrap([0.5, 0.5, 0.5, 1], [0.5, 0.5, 0, 0])  # each example's seeds averaged, paired
    assert both.difference == 3 / 8
    interval = f"+37.5 [{100 * both.low:+.1f}, {100 * both.high:+.1f}]"
    assert f"| x | L | heads=random | 62.5 | {interval} | {both.p_value:.3f} | 1,2 |" in report
    assert "| x | L | heads=iti | 100.0 | not paired (no seed run by both systems" in report

    def rebuilt(*compare_to: str) -> str:
        assert main(["report", str(tmp_path), *compare_to]) == 0
        return (tmp_path / "report.md").read_text()

    assert "| x | L | heads=lofit | 25.0 | -37.5 [" in rebuilt("--compare-to", "heads=random")
    assert "| x | no row with label=M: no comparison |" in rebuilt("--compare-to", "label=M")  # said, not guessed
    assert "| x | 3 rows with label=L: no comparison |" in rebuilt("--compare-to", "L")
    assert "Each row against" not in rebuilt("--compare-to", "")
    before = (tmp_path / "report.md").read_text()
    for bad, message in [
        ("heads=", "--compare-to takes LABEL or NAME=VALUE"),
        ("heads=lofit,heads=iti", "each name once"),
        ("head=lofit", "compare_to names head, which no row was swept over; name label and heads"),
    ]:
        assert main(["report", str(tmp_path), "--compare-to", bad]) != 0
        assert message in capsys.readouterr().err
        assert (tmp_path / "report.md").read_text() == before  # a refused reference rewrites nothing

    # Labels may hold commas and "=", sweep values match as numbers, records without scores are said to be.
    assert parse_compare_to("L1 paper (5e-3, lr 5e-4, 5 epochs)") == {"label": "L1 paper (5e-3, lr 5e-4, 5 epochs)"}
    assert parse_compare_to("LoFiT (K=3%)") == {"label": "LoFiT (K=3%)"}
    assert parse_compare_to("label=a, b,num_heads=1e-1") == {"label": "a, b", "num_heads": "1e-1"}
    assert same_value(0.1, "1e-1") and same_value(3, "3.0") and not same_value("lofit", "0")
    folder = tmp_path / "numbers"
    append_result(folder, record("f", "L", 1, [1, 0, 0, 0], {"num_heads": 0.1}) | {"report": {}})
    unscored = record("g", "L", 1, [0, 0, 0, 0], {"num_heads": 0.5})
    del unscored["per_example"]  # a record of an older lofit
    append_result(folder, unscored)
    append_result(folder, record("h", "L", 1, [0, 0, 0, 0], {"num_heads": 0.2}) | {"metric": None})
    text = write_report(folder, {"num_heads": "1e-1"}).read_text()
    assert "| x | L | num_heads=0.1 | **25.0** | reference |" in text
    unpaired = "not paired (the first system's run of seed(s) [1] has no per-example scores)"
    assert f"| x | L | num_heads=0.5 | 0.0 | {unpaired}" in text
    assert "| x | L | num_heads=0.2 | no primary metric |" in text


def test_a_grids_reference_row_must_single_out_one_row():
    def grid(compare_to, arms=("L",), sweep=None):
        return Grid(
            "g",
            "",
            ["x"],
            [1],
            [Arm(label, "lofit") for label in arms],
            sweep=sweep or {},
            report={"kind": "table", "compare_to": compare_to},
        )

    grid({"label": "L"})
    grid({"heads": "lofit"}, sweep={"heads": ["lofit", "random"]})
    grid({"label": "M", "num_heads": "1e-1"}, arms=("L", "M"), sweep={"num_heads": [0.1, 0.5]})
    for compare_to, arms, sweep, message in [
        ({"label": "M"}, ("L",), None, "names no arm's label: 'M' (labels: L)"),
        ({"label": ["L"]}, ("L",), None, "names no arm's label"),
        ({"heads": "lofit"}, ("L",), None, "names heads: neither label nor a swept option (none)"),
        ("L", ("L",), None, "maps label and swept options"),
        ({"heads": "lofit"}, ("L", "M"), {"heads": ["lofit", "random"]}, "needs a label: the grid has 2 arms"),
        ({"label": "L", "heads": "lofti"}, ("L",), {"heads": ["lofit"]}, "heads='lofti' is not among its swept"),
        ({"label": "L"}, ("L",), {"heads": ["lofit", "random"]}, "needs a value of heads"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            grid(compare_to, arms, sweep)


def test_test_runs_of_a_superseded_choice_are_left_out_of_the_rows_and_named(tmp_path):
    def trial(key, epochs, score, extends=None):
        return {
            "key": key,
            "phase": "tune",
            "label": "LoFiT",
            "task": "x",
            "seed": 1,
            "method": "lofit",
            "point": {"heads": "a"},
            "trial": {"tune_epochs": epochs},
            "extends": extends,
            "metric": "exact_match",
            "score": score,
            "metrics": {"num_examples": 4},
            "seconds": 1.0,
        }

    def test(key, seed, epochs, per_example):
        return _scored_record(key, "LoFiT", "x", seed, {"heads": "a"}, per_example, trial={"tune_epochs": epochs})

    for line in [
        trial("t3", 3, 0.25),
        trial("t6", 6, 0.5),
        test("old1", 1, 6, [1, 0, 0, 0]),
        test("old2", 2, 6, [1, 1, 0, 0]),
        trial("t12", 12, 0.75, extends="tune_epochs"),  # beats 6 epochs: the two runs above are of a stale choice
        test("new1", 1, 12, [1, 1, 1, 0]),
    ]:
        append_result(tmp_path, line)
    current, superseded = report_module.split_superseded_tests(read_results(tmp_path))
    assert [r["key"] for r in superseded] == ["old1", "old2"] and "new1" in [r["key"] for r in current]
    report = write_report(tmp_path).read_text()
    assert "| x | LoFiT | heads=a; tune_epochs=12 | 75.0 (1 seed) | 1 |" in report and "1 test runs" in report
    assert "Left out: 2 test runs of choices that a later tuning trial superseded" in report
    assert "- x, LoFiT, heads=a, tune_epochs=6: seed 1: 25.0, seed 2: 50.0" in report
