"""Experiment cells on an engine: one tiny grid run one cell at a time, by 2 local worker processes,
by a local Ray with 2 CPUs and by submitit's local executor gives the same records; failed cells are
recorded and retried; the progress view; clear errors for executor options and missing extras."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from lofit.cli import main
from lofit.experiments import ModelPool, Runner, load_grid, progress
from lofit.experiments import runner as runner_module
from lofit.experiments.executors import RayExecutor, SlurmExecutor
from lofit.experiments.grid import ranking_key
from lofit.experiments.progress import claim_marker, read_failures, read_markers, remove_marker
from lofit.experiments.results import append_result, read_results

from .test_experiments import RED_TUNED, grid_file
from .tiny_run import tiny_model_folder, write_task

ARMS = [
    {"label": "LoFiT-2", "method": "lofit", "options": {"num_heads": 2}},
    {"label": "LoFiT-4", "method": "lofit", "options": {"num_heads": 4}},
    {"label": "RED", "method": "red"},
]
"""Two LoFiT cells sharing one step-1 ranking, and a cell that needs none (it may run beside step 1)."""
VARYING = {
    "seconds",
    "cpu_seconds",
    "fit_seconds",
    "eval_seconds",
    "ranking_seconds",
    "hardware",
    "finished_at",
    "run_folder",
}
"""What may differ between two runs of one cell: times, where it ran, its folder."""


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    model = tiny_model_folder(folder / "model")
    return {"model": str(model), "task": str(write_task(folder / "task.jsonl", rows=12)), "folder": folder}


def tiny_grid(setting, tmp_path):
    return grid_file(setting, tmp_path, sweep={}, arms=ARMS)


def comparable(folder) -> dict[str, dict]:
    """The records of an experiment folder by key, without what may differ between runs (and the
    trackers a run reported to, which change no result)."""
    records = {}
    for record in read_results(folder):
        record["options"].pop("report_to")
        records[record["key"]] = {k: v for k, v in record.items() if k not in VARYING}
    return records


@pytest.fixture(scope="module")
def sequential(setting, tmp_path_factory):
    """The tiny grid run one cell after another in this process: the reference records."""
    tmp = tmp_path_factory.mktemp("sequential")
    folder = tmp / "runs" / "tiny"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:  # what conftest's per-test fixtures set: float32, one thread
        patch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        torch.set_num_threads(1)
        Runner(load_grid(str(tiny_grid(setting, tmp))), folder, log=lambda _: None).run()
    torch.set_num_threads(threads)
    return comparable(folder)


def test_the_sequential_run_records_step_1_once_and_every_cell(sequential):
    phases = sorted(record["phase"] for record in sequential.values())
    assert phases == ["ranking", "test", "test", "test"]
    lofit = [r for r in sequential.values() if r["phase"] == "test" and r["method"] == "lofit"]
    assert len({r["ranking_key"] for r in lofit}) == 1 and sorted(len(r["selected_heads"]) for r in lofit) == [2, 4]


def test_two_local_workers_give_the_same_records(setting, tmp_path, sequential):
    folder = tmp_path / "runs" / "tiny"
    grid = tiny_grid(setting, tmp_path)
    code = main(
        [
            "experiment",
            "--grid",
            str(grid),
            "--output-dir",
            str(folder),
            "--executor",
            "local",
            "--workers",
            "2",
            "--no-progress",
            "--report-to",
            "tensorboard",
        ]
    )
    assert code == 0
    assert comparable(folder) == sequential
    order = [(r["phase"], r["method"]) for r in read_results(folder)]
    assert order.index(("ranking", "lofit")) < order.index(("test", "lofit"))  # step 1 before its cells
    assert not read_markers(folder) and not (folder / "failures").exists()
    assert len(list((folder / "trackers").glob("*/events.out.tfevents.*"))) == 4  # one run per job, from the workers


def test_on_two_workers_a_test_cell_evaluates_the_adapter_its_best_trial_trained(setting, tmp_path):
    grid = grid_file(setting, tmp_path, sweep={}, arms=[RED_TUNED], tune_extend=0)
    folder = tmp_path / "runs" / "tuned"
    options = ["--output-dir", str(folder), "--tune", "--workers", "2", "--no-progress"]
    assert main(["experiment", "--grid", str(grid), *options]) == 0
    records = read_results(folder)
    trials = [r for r in records if r["phase"] == "tune"]
    (test,) = [r for r in records if r["phase"] == "test"]
    grid_order = [tuple(r["tune_grid"][o].index(r["trial"][o]) for o in r["tune_grid"]) for r in trials]
    best = min(zip(trials, grid_order), key=lambda pair: (-pair[0]["score"], pair[1]))[0]  # a tie: the earlier trial
    assert len(trials) == 4 and test["trial"] == best["trial"] and test["trained_by"] == best["key"]
    assert test["per_example"] and test["fit_seconds"] is None  # evaluation of the trial's adapter only
    assert not read_markers(folder) and not (folder / "failures").exists()


def test_a_local_ray_with_two_workers_gives_the_same_records(setting, tmp_path, sequential):
    ray = pytest.importorskip("ray")
    folder = tmp_path / "runs" / "tiny"
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        executor = RayExecutor(runner_module.run_job, cell_cpus=1)
        assert not executor.started  # the Ray of this process is used, and left running
        Runner(load_grid(str(tiny_grid(setting, tmp_path))), folder, log=lambda _: None, executor=executor).run()
    finally:
        ray.shutdown()
        # ray.init's SIGTERM handler outlives shutdown; inherited by the fork()ed children of later
        # tests, it kept one from ending on SIGTERM and hung the suite (a multiprocessing pool's terminate)
        signal.signal(signal.SIGTERM, sigterm)
    assert comparable(folder) == sequential


def test_submitits_local_executor_gives_the_same_records(setting, tmp_path, sequential):
    pytest.importorskip("submitit")
    folder = tmp_path / "runs" / "tiny"
    executor = SlurmExecutor(
        runner_module.run_job, tmp_path / "submitit", time_minutes=10, cluster="local", poll_seconds=0.2
    )
    Runner(load_grid(str(tiny_grid(setting, tmp_path))), folder, log=lambda _: None, executor=executor).run()
    assert comparable(folder) == sequential


def test_a_failed_cell_is_recorded_the_others_finish_and_the_next_run_retries_it(
    setting, tmp_path, monkeypatch, sequential
):
    grid = load_grid(str(tiny_grid(setting, tmp_path)))
    folder = tmp_path / "runs" / "tiny"
    real_select, real_cell = runner_module.run_select, runner_module.run_cell

    def failing_cell(config, models):
        if config.run.method == "red":
            raise RuntimeError("RED ran out of memory")
        return real_cell(config, models)

    monkeypatch.setattr(runner_module, "run_cell", failing_cell)
    pool = ModelPool()
    runner = Runner(grid, folder, pool=pool, log=lambda _: None)
    runner.run()
    assert sorted(r["label"] for r in read_results(folder) if r["phase"] == "test") == ["LoFiT-2", "LoFiT-4"]
    [failure] = read_failures(folder).values()
    assert failure["label"] == "RED" and "RuntimeError: RED ran out of memory" in failure["error"]
    assert list(runner.failed) == [failure["key"]]
    status = Runner(grid, folder, pool=pool, log=lambda _: None).status()
    assert "failed   test" in status and "RED ran out of memory" in status
    assert "3 cells: 2 done, 0 running, 1 failed (retried by the next run), 0 waiting" in status

    def failing_select(*args, **kwargs):
        raise ValueError("step 1 broke")

    monkeypatch.setattr(runner_module, "run_cell", real_cell)
    monkeypatch.setattr(runner_module, "run_select", failing_select)
    other = tmp_path / "elsewhere" / "other"  # a ranking that fails fails the cells waiting for it
    assert main(["experiment", "--grid", str(tiny_grid(setting, tmp_path)), "--output-dir", str(other)]) == 1
    failures = read_failures(other)
    assert sorted(f["phase"] for f in failures.values()) == ["ranking", "test", "test"]
    assert all("step 1 broke" in f["error"] for f in failures.values())
    assert [r["label"] for r in read_results(other)] == ["RED"]

    monkeypatch.setattr(runner_module, "run_select", real_select)
    ran = []
    monkeypatch.setattr(runner_module, "run_cell", lambda config, models: ran.append(1) or real_cell(config, models))
    Runner(grid, folder, pool=pool, log=lambda _: None).run()
    assert len(ran) == 1 and comparable(folder) == sequential  # only the failed cell ran again


def test_status_shows_running_cells_of_a_live_driver_only(setting, tmp_path, capsys):
    grid = tiny_grid(setting, tmp_path)
    folder = tmp_path / "runs" / "tiny"
    runner = Runner(load_grid(str(grid)), folder, log=lambda _: None)
    red, lofit = runner.test_cells()[2], runner.test_cells()[0]
    assert claim_marker(folder, red.key, red.describe(), "ray") is None  # this process: a live driver
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"pid": int(ended.stdout)}
    _marker_of(folder, lofit.key, lofit.describe(), dead["pid"])
    checkpoints = folder / "cells" / runner_module.job_name(red) / "checkpoints" / "red"
    now = time.time()
    for step, written in ((2, now + 10), (4, now + 70)):  # 2 steps a minute apart, 6 to go: 3 minutes
        (checkpoints / f"step-{step}").mkdir(parents=True)
        (checkpoints / f"step-{step}" / "state.json").write_text(json.dumps({"step": step, "total_steps": 10}))
        os.utime(checkpoints / f"step-{step}", (written, written))
    assert main(["experiment", "--grid", str(grid), "--output-dir", str(folder), "--status"]) == 0
    printed = capsys.readouterr().out
    running = rf"{red.key}  running  {re.escape(red.describe())}: \d+\.\d min, ~\d+ min left"
    assert re.search(running + "; red checkpointed at step 4 of 10, ~3 min of it left", printed)
    assert f"{lofit.key}  waiting  " in printed  # its driver has ended: not running
    assert "3 cells: 0 done, 1 running, 0 failed (retried by the next run), 2 waiting" in printed
    assert "(running on ray)" in printed
    assert list(read_markers(folder)) == [red.key]


def _marker_of(folder, key, description, pid):
    """A marker for the job ``key`` as the driver process ``pid`` of this host would write it."""
    (folder / "running").mkdir(parents=True, exist_ok=True)
    marker = progress._marker(key, description, "local") | {"pid": pid}
    (folder / "running" / f"{key}.json").write_text(json.dumps(marker))


def test_a_job_another_live_driver_runs_is_left_to_it_with_the_cells_that_wait_for_it(
    setting, tmp_path, sequential, capsys
):
    grid = tiny_grid(setting, tmp_path)
    folder = tmp_path / "runs" / "tiny"
    lofit = Runner(load_grid(str(grid)), folder, log=lambda _: None).test_cells()[0]
    ranking = ranking_key(lofit.config)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a live driver
    command = ["experiment", "--grid", str(grid), "--output-dir", str(folder), "--no-progress"]
    try:
        _marker_of(folder, ranking, "step 1", other.pid)
        assert main(command) == 1
        printed = capsys.readouterr().out
        assert f"[{ranking}] ranking " in printed and f"run by another driver (process {other.pid} on " in printed
        assert printed.count("left to it") == 3  # step 1, and the two LoFiT cells waiting for its ranking
        assert "3 job(s) left to another driver that runs them" in printed
        assert [r["label"] for r in read_results(folder)] == ["RED"]
        assert list(read_markers(folder)) == [ranking]  # the other driver's marker stays
    finally:
        other.kill()
        other.wait()
    assert main(command) == 0  # its driver has ended: its marker is stale, and this run runs the rest
    assert comparable(folder) == sequential and not read_markers(folder)


def test_a_cell_another_driver_records_meanwhile_is_taken_in_not_run_again(setting, tmp_path, monkeypatch):
    grid = load_grid(str(tiny_grid(setting, tmp_path)))
    pool = ModelPool()
    Runner(grid, tmp_path / "reference", pool=pool, log=lambda _: None).run()
    (red_record,) = [r for r in read_results(tmp_path / "reference") if r["label"] == "RED"]
    folder = tmp_path / "runs" / "tiny"
    real_cell, ran, printed = runner_module.run_cell, [], []

    def run_cell(config, models):
        if not ran:  # while this driver runs its first cell, another driver records RED's
            append_result(folder, red_record)
        ran.append(1)
        return real_cell(config, models)

    monkeypatch.setattr(runner_module, "run_cell", run_cell)
    records = Runner(grid, folder, pool=pool, log=printed.append).run()
    assert len(ran) == 2 and red_record in records  # the two LoFiT cells only
    assert f"[{red_record['key']}] " in "\n".join(printed)
    assert any(line.endswith("recorded by another driver meanwhile, not run again") for line in printed)
    assert [r["label"] for r in read_results(folder)].count("RED") == 1 and not read_markers(folder)


def test_a_marker_is_claimed_by_one_driver_and_removed_only_by_it(tmp_path):
    folder = tmp_path / "experiment"
    claim = (
        "import sys, time; from pathlib import Path; "
        "from lofit.experiments.progress import claim_marker; "
        "folder = Path(sys.argv[1]); go, done = folder / 'go', folder / 'done'\n"
        "while not go.exists(): time.sleep(0.01)\n"
        "print('holder' if claim_marker(folder, 'cell', 'a cell', 'local') else 'claimed', flush=True)\n"
        "while not done.exists(): time.sleep(0.01)"
    )
    drivers = [
        subprocess.Popen([sys.executable, "-c", claim, str(folder)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    try:
        folder.mkdir()
        time.sleep(3)  # the drivers have imported lofit and wait for the signal
        (folder / "go").touch()
        outcomes = sorted(driver.stdout.readline().strip() for driver in drivers)
        assert outcomes == ["claimed", "holder", "holder"]
        (winner,) = read_markers(folder).values()
        assert winner["pid"] in [driver.pid for driver in drivers]
        assert claim_marker(folder, "cell", "a cell", "local") == winner  # a live driver's: left to it
        remove_marker(folder, "cell")
        assert list(read_markers(folder)) == ["cell"]  # not this process's to remove
    finally:
        (folder / "done").touch()
        for driver in drivers:
            driver.wait()
    assert claim_marker(folder, "cell", "a cell", "local") is None  # stale now: claimed here
    remove_marker(folder, "cell")
    assert not list((folder / "running").iterdir())


def test_executor_options_are_checked(setting, tmp_path, monkeypatch, capsys):
    grid = str(tiny_grid(setting, tmp_path))
    out = str(tmp_path / "out")

    def error(*options):
        assert main(["experiment", "--grid", grid, "--output-dir", out, *options]) == 2
        return capsys.readouterr().err

    assert "--slurm-time do(es) not apply to --executor ray" in error("--executor", "ray", "--slurm-time", "5")
    assert "--cell-gpus do(es) not apply to --executor local" in error("--cell-gpus", "1")
    assert "--workers must be >= 1" in error("--workers", "0")
    assert "--executor and its options do not apply" in error("--status", "--workers", "2")
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert "pip install lofit[ray]" in error("--executor", "ray")
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert "pip install lofit[slurm]" in error("--executor", "slurm")
    assert not (tmp_path / "out" / "results.jsonl").exists()
