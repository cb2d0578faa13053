"""One place per concept, and each piece of work done once per `lofit run`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from lofit.cli import main
from lofit.experiments.grid import STEP2_ONLY, UNHASHED
from lofit.experiments.report import REPORT_KINDS, report_kind
from lofit.methods import METHODS
from lofit.methods.lofit import method as lofit_method
from lofit.methods.lofit.config import SELECTORS
from lofit.models import identity
from lofit.runs.config import RESUME_IGNORES, CellConfig, RunConfig, cell_config
from lofit.tasks import clutrr, user_file
from lofit.training import TrainingRun

from .tiny_run import tiny_model_folder, write_task


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


def tiny_run(tmp_path: Path, model: Path, *options: str) -> Path:
    task = write_task(tmp_path / "train.jsonl")
    folder = tmp_path / "run"
    argv = ["run", "--model", str(model), "--task", str(task), "--output-dir", str(folder), "--num-heads", "2"]
    argv += ["--select-epochs", "1", "--tune-epochs", "1", "--batch-size", "8", "--no-progress", *options]
    assert main(argv) == 0
    return folder


# -- registries and option groups ---------------------------------------------------------------


def test_methods_and_selectors_register_themselves():
    assert list(METHODS) == ["lofit", "zero-shot", "iti", "repe", "lora", "red", "reft"]
    assert list(SELECTORS) == ["lofit", "random", "probe-layers", "bias-based", "iti", "file"]
    assert all(callable(function) for function in SELECTORS.values())


def test_an_unknown_report_kind_is_refused_with_the_known_names():
    assert report_kind("table") is REPORT_KINDS["table"]
    with pytest.raises(ValueError, match="unknown report kind 'layer'; known kinds: table, cross-task, layers, curve"):
        report_kind("layer")


def test_option_groups_are_read_from_field_metadata():
    assert RESUME_IGNORES == {"resume", "progress", "save_steps", "eval_batch_size", "limit"}
    unhashed = {"output_dir", "data_dir", "progress", "resume", "save_steps", "eval_batch_size", "report_to", "compile"}
    assert UNHASHED == unhashed
    assert STEP2_ONLY == {
        "num_heads",
        "tune_epochs",
        "bias_init_std",
        "tune_scales",
        "eval_split",
        "limit",
        "eval_file",
        "match",
        "heads_file",
        "method",
        "recipe",
    }


def test_one_conversion_of_flat_options_and_keyword_only_configs():
    cell = cell_config({"task": "mquake", "red_lr": 0.01, "num_heads": 3}, "red")
    assert (cell.run.task, cell.method.red_lr, cell.lofit.num_heads) == ("mquake", 0.01, 3)
    with pytest.raises(ValueError, match="--red-lr is an option of --method red; this run uses lofit"):
        cell_config({"red_lr": 0.01}, "lofit")
    with pytest.raises(TypeError):
        CellConfig(RunConfig())  # keyword-only
    with pytest.raises(TypeError):
        TrainingRun([], 0.1)  # keyword-only


# -- work done once -------------------------------------------------------------------------------


def test_each_data_file_is_parsed_once_per_task(tmp_path, monkeypatch):
    folder = tmp_path / "clutrr"
    folder.mkdir()
    row = {"clean_story": "[A] is the son of [B].", "query": "('A', 'B')", "target_text": "son"}
    for split in ("train", "test"):
        (folder / f"{split}.json").write_text(json.dumps([row, row]))
    parsed: list[Path] = []
    real = clutrr.read_json_rows
    monkeypatch.setattr(clutrr, "read_json_rows", lambda path: parsed.append(path) or real(path))
    task = clutrr.Clutrr()
    for _ in range(3):
        assert len(task.sample_train(tmp_path, 1, seed=0)) == 1 and len(task.eval_examples(tmp_path, "test")) == 2
    assert sorted(path.name for path in parsed) == ["test.json", "train.json"]


def test_a_run_parses_its_data_file_once_and_writes_the_adapter_once(tmp_path, tiny_model, monkeypatch):
    parses, staged, fingerprints = [], [], []
    real_load, real_staged, real_fingerprint = (
        user_file.load_user_data,
        lofit_method.staged_folder,
        identity.fingerprint,
    )
    monkeypatch.setattr(user_file, "load_user_data", lambda *args: parses.append(args) or real_load(*args))
    monkeypatch.setattr(identity, "fingerprint", lambda model: fingerprints.append(1) or real_fingerprint(model))

    @contextlib.contextmanager
    def staged_folder(directory):
        staged.append(Path(directory))
        with real_staged(directory) as staging:
            yield staging

    monkeypatch.setattr(lofit_method, "staged_folder", staged_folder)
    folder = tiny_run(tmp_path, tiny_model)
    assert len(parses) == 1  # the training file is also the evaluation file: parsed once
    assert staged == [folder / "adapter"] and len(fingerprints) == 1
    saved = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert saved["metrics"]["test_exact_match"] == json.loads((folder / "metrics.json").read_text())["test_exact_match"]


def strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def test_a_saved_adapter_records_no_path_of_this_machine(tmp_path, tiny_model):
    folder = tiny_run(tmp_path, tiny_model)
    for path in [*(folder / "adapter").glob("*.json"), folder / "head_ranking.json"]:
        values = strings(json.loads(path.read_text()))
        assert not [v for v in values if v.startswith("/") or str(tmp_path) in v], path
    metrics = json.loads((folder / "adapter" / "adapter_config.json").read_text())["metrics"]
    assert (metrics["task"], metrics["model"]) == ("train.jsonl", "model") and "run_folder" not in metrics


# -- validation before the model loads -------------------------------------------------------------


def test_what_the_model_config_rules_out_is_refused_before_loading(tmp_path, tiny_model, monkeypatch, capsys):
    import lofit.runs.pipeline

    def no_model(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lofit.runs.pipeline, "load_model", no_model)
    task = write_task(tmp_path / "train.jsonl")
    folder = tmp_path / "run"
    common = ["run", "--model", str(tiny_model), "--task", str(task), "--output-dir", str(folder), "--no-progress"]
    assert main([*common, "--num-heads", "5000"]) == 2
    assert "asked for 5000 heads but the model has only 12 heads" in capsys.readouterr().err
    assert main([*common, "--bias-lr", "nan"]) == 2
    assert "bias_lr must be a finite number" in capsys.readouterr().err
    assert main([*common, "--method", "iti", "--iti-num-heads", "13"]) == 2
    assert "asked for 13 heads" in capsys.readouterr().err
    assert not folder.exists()  # no run folder, config.yaml or checkpoints/ left behind


def test_the_run_folder_is_the_one_writer_of_a_run():
    import lofit.runs.pipeline

    writers = {"write_json", "write_text", "save_safetensors", "staged_folder", "replacing"}
    assert not writers & set(vars(lofit.runs.pipeline))
