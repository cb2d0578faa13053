"""--report-to: tracker runs through accelerate, read back from TensorBoard's event files: losses and
learning rates per step, step 1's localization figures, the final metrics and the configuration, for
`lofit run` and for each cell of an experiment; bad tracker names and missing packages refused."""

from __future__ import annotations

import json

import pytest

from lofit.cli import main
from lofit.experiments import Runner, load_grid
from lofit.experiments.grid import expand
from lofit.experiments.results import read_results
from lofit.training import trackers
from lofit.training.trackers import TrackerRun, check_trackers, log_training_step, tracking
from lofit.utils.compute import ComputeConfig

from .test_experiments import grid_file
from .tiny_run import tiny_model_folder, write_task

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``folder``: tag -> [(step, value)]."""
    reader = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trackers")
    model = tiny_model_folder(folder / "model")
    return {"model": str(model), "task": str(write_task(folder / "task.jsonl", rows=12)), "folder": folder}


def test_lofit_run_reports_steps_localization_metrics_and_config_to_tensorboard(setting, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--task", setting["task"], "--model", setting["model"], "--output-dir", str(out)]
    args += ["--select-epochs", "2", "--tune-epochs", "1", "--batch-size", "8", "--num-heads", "2", "--no-progress"]
    assert main([*args, "--report-to", "tensorboard"]) == 0
    logged = scalars(out / "trackers" / "run")
    select, tune = logged["select/loss"], logged["tune/loss"]
    assert [step for step, _ in select] == [1, 2, 3, 4]  # 12 examples in batches of 8, 2 epochs
    assert [step for step, _ in tune] == [5, 6]  # step 2 continues the run's step axis
    assert [step for step, _ in logged["tune/lr"]] == [5, 6] and logged["tune/lr"][0][1] > 0
    assert 0 < logged["localization/top_share"][0][1] <= 1 and logged["localization/k"][0][1] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert logged["final/test_exact_match"][0][1] == pytest.approx(metrics["test_exact_match"])
    assert logged["final/trained_parameters"][0][1] > 0
    hparams = list((out / "trackers" / "run").glob("*/hparams.yml"))
    assert len(hparams) == 1 and "select_epochs: 2" in hparams[0].read_text()  # the run configuration
    assert "report_to: tensorboard" in (out / "config.yaml").read_text()


def test_select_and_compare_report_too(setting, tmp_path):
    common = ["--task", setting["task"], "--model", setting["model"], "--batch-size", "8", "--no-progress"]
    common += ["--select-epochs", "1", "--report-to", "tensorboard"]
    assert main(["select", *common, "--output-dir", str(tmp_path / "sel"), "--num-heads", "3"]) == 0
    logged = scalars(tmp_path / "sel" / "trackers" / "sel")
    assert len(logged["select/loss"]) == 2 and logged["localization/k"][0][1] == 3
    assert (
        main(
            [
                "compare",
                *common,
                "--output-dir",
                str(tmp_path / "cmp"),
                "--methods",
                "zero-shot,red",
                "--red-epochs",
                "1",
            ]
        )
        == 0
    )
    logged = scalars(tmp_path / "cmp" / "trackers" / "cmp")
    assert len(logged["red/loss"]) == 2 and "final/red/test_exact_match" in logged
    assert "final/zero-shot/test_exact_match" in logged


def test_each_experiment_cell_is_one_tensorboard_run(setting, tmp_path):
    arms = [
        {"label": "LoFiT", "method": "lofit", "options": {"num_heads": 2}},
        {"label": "zero", "method": "zero-shot"},
    ]
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=arms)))
    folder = tmp_path / "tiny"
    Runner(grid, folder, {"report_to": "tensorboard"}, log=lambda _: None).run()
    records = {r["phase"] + "-" + r.get("label", ""): r for r in read_results(folder)}
    runs = sorted(path.name for path in (folder / "trackers").iterdir())
    ranking, lofit = records["ranking-LoFiT"], records["test-LoFiT"]
    assert runs == sorted(
        [f"ranking-{ranking['key']}", f"test-LoFiT-{lofit['key']}", f"test-zero-{records['test-zero']['key']}"]
    )
    step1 = scalars(folder / "trackers" / f"ranking-{ranking['key']}")
    assert len(step1["select/loss"]) == 2 and step1["localization/k"][0][1] == 2
    cell = scalars(folder / "trackers" / f"test-LoFiT-{lofit['key']}")
    assert len(cell["tune/loss"]) == 2 and "select/loss" not in cell  # step 1 ran once, in its own run
    assert cell["final/test_exact_match"][0][1] == pytest.approx(lofit["score"])
    assert cell["localization/k"][0][1] == 2  # the ranking's figures at this cell's K
    assert lofit["options"]["report_to"] == "tensorboard"
    assert lofit["key"] == expand(grid, "test", {})[0].key  # trackers do not change a cell's key


def test_the_step_axis_grows_across_stages_and_restarts():
    class Recorder(trackers.TrackerSession):
        def __init__(self):
            self.step, self.stage, self.logged = 0, None, []
            self.accelerator = self

        def log(self, values, step):  # stands in for accelerator.log
            self.logged.append((step, sorted(values)))

    session = Recorder()
    trackers._ACTIVE.append(session)
    try:
        for stage, step in [("select", 1), ("select", 2), ("tune", 1), ("tune", 2), ("tune", 1), ("lora", 4)]:
            log_training_step(stage, step, loss=1.0, lr=0.1)
    finally:
        trackers._ACTIVE.remove(session)
    assert [step for step, _ in session.logged] == [1, 2, 3, 4, 5, 6]
    assert session.logged[0][1] == ["select/loss", "select/lr"]
    log_training_step("select", 1, loss=1.0, lr=0.1)  # no run open: nothing happens, nothing fails


def test_report_to_names_are_checked(monkeypatch, tmp_path, setting, capsys):
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        ComputeConfig(report_to="tensorbored")
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        ComputeConfig(report_to="none,tensorboard")
    assert check_trackers("none") == [] and check_trackers("tensorboard,tensorboard") == ["tensorboard"]
    with tracking(TrackerRun("none", tmp_path, "p", "n")) as session:
        assert session is None and not any(tmp_path.iterdir())
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install lofit\[tensorboard\]; pip install wandb"):
        check_trackers("tensorboard,wandb")
    assert main(["eval", "--task", setting["task"], "--model", setting["model"], "--report-to", "tensorboard"]) == 2
    assert "lofit eval trains nothing" in capsys.readouterr().err
