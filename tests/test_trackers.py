"""--report-to: tracker runs through accelerate, read back from TensorBoard's event files, wandb's offline
run files and an MLflow file store: losses and learning rates per step, step 1's localization figures,
the final metrics and the configuration, for `lofit run` and for each cell of an experiment; bad
tracker names, missing packages and trackers that cannot start refused."""

from __future__ import annotations

import json
import struct

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


def wandb_runs(directory) -> list[dict]:
    """Every offline wandb run under ``directory``: its group, name and project, its configuration
    and its history rows (``{"_step": n, "select/loss": ...}``), read from the run's ``.wandb`` file
    (a LevelDB log of wandb's protobuf records after a 7-byte header; wandb has no reader of its own
    for it any more)."""
    wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    runs = []
    for path in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        data, position, block, chunks = path.read_bytes(), 7, 32768, []
        run = {"history": [], "config": {}}
        assert data[:4] == b":W&B"
        while position + 7 <= len(data):
            if block - position % block < 7:  # a block's tail too short for a record header is padding
                position += block - position % block
                continue
            _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
            chunks.append(data[position + 7 : position + 7 + length])
            position += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(b"".join(chunks))
                chunks = []
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    run |= {"group": record.run.run_group, "name": record.run.display_name}
                    run["project"] = record.run.project
                elif kind in ("history", "config"):
                    items = record.history.item if kind == "history" else record.config.update
                    values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
                    if kind == "history":
                        run["history"].append(values)
                    else:
                        run["config"] |= values
        runs.append(run)
    return runs


def history(rows: list[dict], name: str) -> list[tuple[int, float]]:
    """``name``'s (step, value) pairs in wandb history ``rows``."""
    return [(row["_step"], row[name]) for row in rows if name in row]


def mlflow_runs(uri: str) -> dict[str, dict]:
    """Every MLflow run in the store at ``uri``, by run name: its experiment, tags, parameters and
    each metric's (step, value) history."""
    tracking = pytest.importorskip("mlflow.tracking")
    client = tracking.MlflowClient(uri)
    runs = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            metrics = {
                name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
                for name in run.data.metrics
            }
            runs[run.info.run_name] = {
                "experiment": experiment.name,
                "tags": run.data.tags,
                "params": run.data.params,
                "metrics": metrics,
            }
    return runs


@pytest.fixture
def offline_trackers(monkeypatch, tmp_path):
    """wandb offline and an MLflow file store under ``tmp_path``: the store's URI."""
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


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


def test_lofit_run_reports_to_wandb_offline_and_an_mlflow_file_store(setting, tmp_path, offline_trackers):
    out = tmp_path / "run"
    args = ["run", "--task", setting["task"], "--model", setting["model"], "--output-dir", str(out)]
    args += ["--select-epochs", "2", "--tune-epochs", "1", "--batch-size", "8", "--num-heads", "2", "--no-progress"]
    assert main([*args, "--report-to", "wandb", "--report-to", "mlflow"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (run,) = wandb_runs(out / "trackers")
    assert run["name"] == "run" and run["project"] == "lofit"
    assert [step for step, _ in history(run["history"], "select/loss")] == [1, 2, 3, 4]
    assert [step for step, _ in history(run["history"], "tune/loss")] == [5, 6]
    assert history(run["history"], "localization/k") == [(6, 2)]
    assert history(run["history"], "final/test_exact_match")[0][1] == pytest.approx(metrics["test_exact_match"])
    assert run["config"]["select_epochs"] == 2 and run["config"]["report_to"] == "wandb,mlflow"
    stored = mlflow_runs(offline_trackers)["run"]
    assert stored["experiment"] == "lofit" and stored["params"]["select_epochs"] == "2"
    assert [step for step, _ in stored["metrics"]["select/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in stored["metrics"]["tune/loss"]] == [5, 6]
    assert stored["metrics"]["tune/loss"] == history(run["history"], "tune/loss")  # the same values in both
    assert stored["metrics"]["final/test_exact_match"][0][1] == pytest.approx(metrics["test_exact_match"])


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


def run_tiny_experiment(setting, tmp_path, report_to: str):
    """A LoFiT arm and a 0-shot arm run with ``report_to``: the grid, its folder, and its records by phase-label."""
    arms = [
        {"label": "LoFiT", "method": "lofit", "options": {"num_heads": 2}},
        {"label": "zero", "method": "zero-shot"},
    ]
    grid = load_grid(str(grid_file(setting, tmp_path, sweep={}, arms=arms)))
    folder = tmp_path / "tiny"
    Runner(grid, folder, {"report_to": report_to}, log=lambda _: None).run()
    return grid, folder, {r["phase"] + "-" + r.get("label", ""): r for r in read_results(folder)}


def test_each_experiment_cell_is_one_tensorboard_run(setting, tmp_path):
    grid, folder, records = run_tiny_experiment(setting, tmp_path, "tensorboard")
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


def test_each_experiment_cell_is_one_wandb_and_one_mlflow_run_grouped_by_the_experiment(
    setting, tmp_path, offline_trackers
):
    grid, folder, records = run_tiny_experiment(setting, tmp_path, "wandb,mlflow")
    names = sorted(f"{r['phase']}-{r['label']}-{r['key']}" for r in records.values() if r["phase"] == "test")
    names = sorted([*names, f"ranking-{records['ranking-LoFiT']['key']}"])
    runs = {run["name"]: run for run in wandb_runs(folder / "trackers")}
    assert sorted(runs) == names
    assert {(run["group"], run["project"]) for run in runs.values()} == {(grid.name, grid.name)}
    lofit = records["test-LoFiT"]
    cell = runs[f"test-LoFiT-{lofit['key']}"]
    assert history(cell["history"], "final/test_exact_match")[0][1] == pytest.approx(lofit["score"])
    assert cell["config"]["phase"] == "test" and cell["config"]["label"] == "LoFiT"
    stored = mlflow_runs(offline_trackers)
    assert sorted(stored) == names
    assert {run["experiment"] for run in stored.values()} == {grid.name}
    assert {run["tags"]["group"] for run in stored.values()} == {grid.name}
    assert len(stored[f"ranking-{records['ranking-LoFiT']['key']}"]["metrics"]["select/loss"]) == 2


def test_a_tracker_that_cannot_start_stops_the_command_before_training(
    setting, tmp_path, monkeypatch, capsys, offline_trackers
):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nowhere://store")  # a store MLflow has no client for
    out = tmp_path / "run"
    args = ["run", "--task", setting["task"], "--model", setting["model"], "--output-dir", str(out), "--no-progress"]
    assert main([*args, "--report-to", "wandb,mlflow"]) == 2
    error = capsys.readouterr().err
    assert "lofit: error: --report-to wandb,mlflow: a tracker could not start its run:" in error
    assert "nowhere" in error  # MLflow's own message names the store it could not use
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    assert wandb.run is None  # the wandb run started before MLflow failed was finished, not left open
    assert len(wandb_runs(out / "trackers")) == 1


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
    with pytest.raises(ValueError, match=r"pip install lofit\[tensorboard\]; pip install lofit\[wandb\]"):
        check_trackers("tensorboard,wandb")
    assert main(["eval", "--task", setting["task"], "--model", setting["model"], "--report-to", "tensorboard"]) == 2
    assert "lofit eval trains nothing" in capsys.readouterr().err
