"""The command line: options from the dataclasses, YAML config with flag overrides, `lofit heads`."""

from __future__ import annotations

import huggingface_hub
import pytest
import torch
import transformers
import yaml

from lofit.cli import OptionsError, _configs, build_parser, main
from lofit.methods.lofit.ranking import HeadRanking
from lofit.runs.config import RunConfig


def parse(argv):
    return _configs(build_parser().parse_args(argv))[:3]


def test_defaults_come_from_the_dataclasses():
    run, lofit, _ = parse(["run"])
    assert run == RunConfig()
    assert (lofit.num_heads, lofit.bias_lr, lofit.tune_epochs) == (0.1, 5e-2, 4)


def test_yaml_config_is_overridden_by_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"run": {"task": "mquake", "limit": 5}, "lofit": {"bias_lr": 0.3, "num_heads": 9}})
    )
    run, lofit, _ = parse(["run", "--config", str(config), "--num-heads", "12", "--no-progress"])
    assert (run.task, run.limit, run.progress) == ("mquake", 5, False)
    assert (lofit.bias_lr, lofit.num_heads) == (0.3, 12)


def test_a_run_folder_config_yaml_round_trips(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"run": vars(RunConfig(task="truthfulqa", fold="all")), "lofit": {"seed": 7}}))
    run, lofit, _ = parse(["run", "--config", str(config)])
    assert (run.task, run.folds(), lofit.seed) == ("truthfulqa", [0, 1], 7)


def test_bad_options_are_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("bias_learning_rate: 0.1\n")
    with pytest.raises(OptionsError, match="unknown option 'bias_learning_rate'"):
        parse(["run", "--config", str(config)])
    with pytest.raises(OptionsError, match="heads must be"):
        parse(["run", "--num-heads", "0"])
    with pytest.raises(OptionsError, match="does not exist"):
        parse(["run", "--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(OptionsError, match="--compile with --gradient-checkpointing"):
        parse(["run", "--compile", "--gradient-checkpointing"])
    with pytest.raises(ValueError, match="fold must be 0, 1 or all"):
        RunConfig(fold="2").folds()


def test_heads_command_prints_the_ranking_and_writes_the_heatmap(tmp_path, capsys):
    HeadRanking.from_scores(torch.tensor([[0.1, 0.9], [0.5, 0.3]])).save(tmp_path / "head_ranking.json")
    assert main(["heads", str(tmp_path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == ["0", "0", "1", "0.90000"]
    assert (tmp_path / "heads.png").stat().st_size > 1000
    assert "step 1 localized: top 2 of 4 heads hold 77.8%" in out
    flat = tmp_path / "flat"
    HeadRanking.from_scores(torch.tensor([[0.5, 0.45], [0.48, 0.47]])).save(flat / "head_ranking.json")
    assert main(["heads", str(flat), "--top", "1"]) == 0
    assert "step 1 did not localize" in (out := capsys.readouterr().out) and "barely prefers its top heads" in out
    (flat / "config.yaml").write_text("lofit: {selection: group}\n")  # the run that wrote it used group
    assert main(["heads", str(flat), "--top", "1"]) == 0
    assert "step 1 did not localize" in (out := capsys.readouterr().out) and "raise --group-lambda" in out


def test_missing_files_exit_with_a_message(tmp_path, capsys):
    assert main(["heads", str(tmp_path / "nothing.json")]) == 2
    assert "no head ranking" in capsys.readouterr().err


@pytest.fixture
def library_progress_bars():
    """Re-enables the libraries' progress bars, which are process-wide, after the test."""
    yield
    huggingface_hub.utils.enable_progress_bars()
    transformers.utils.logging.enable_progress_bar()


def test_no_progress_also_silences_the_libraries_bars(tmp_path, library_progress_bars):
    assert main(["eval", "--adapter", str(tmp_path / "none"), "--no-progress"]) == 2
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert huggingface_hub.utils.are_progress_bars_disabled()


def test_yaml_values_are_converted_to_the_field_types(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("bias_lr: 5e-2\nfold: 1\nlimit: 3\n")
    run, lofit, _ = parse(["run", "--config", str(config)])
    assert (lofit.bias_lr, run.fold, run.limit) == (0.05, "1", 3)
    config.write_text("batch_size: many\n")
    with pytest.raises(OptionsError, match="batch_size must be of type int"):
        parse(["run", "--config", str(config)])


def test_method_options_come_from_each_method_config(tmp_path):
    run, _, _, configs = _configs(build_parser().parse_args(["run", "--method", "lora", "--lora-rank", "4"]))
    assert run.method == "lora" and configs["lora"].lora_rank == 4
    _, _, _, configs = _configs(
        build_parser().parse_args(["compare", "--methods", "zero-shot,reft", "--reft-layers", "1,2"])
    )
    assert configs == {"zero-shot": None, "reft": configs["reft"]} and configs["reft"].reft_layers == "1,2"
    with pytest.raises(OptionsError, match="unknown method"):
        _configs(build_parser().parse_args(["run", "--method", "prompting"]))
    with pytest.raises(OptionsError, match="reft_positions"):
        _configs(build_parser().parse_args(["run", "--method", "reft", "--reft-positions", "middle"]))


def test_options_of_another_method_are_refused_before_anything_loads(tmp_path, capsys):
    with pytest.raises(OptionsError, match="--reft-rank is an option of --method reft; this run uses lofit"):
        _configs(build_parser().parse_args(["run", "--reft-rank", "4"]))
    config = tmp_path / "c.yaml"
    config.write_text("method_options: {lora_rank: 4}\n")
    with pytest.raises(OptionsError, match="--lora-rank is an option of --method lora; this run uses red, reft"):
        _configs(build_parser().parse_args(["compare", "--methods", "red,reft", "--config", str(config)]))
    assert (
        main(
            [
                "run",
                "--task",
                str(tmp_path / "absent.jsonl"),
                "--reft-rank",
                "4",
                "--num-heads",
                "0",
                "--output-dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["lofit: error: --reft-rank is an option of --method reft; this run uses lofit"]
    assert not (tmp_path / "run").exists()
    assert main(["run", "--num-heads", "0", "--batch-size", "0", "--dtype", "float8"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 3  # one line per problem


def test_bad_data_and_paths_are_refused_before_the_model_loads_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    import lofit.runs.pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(lofit.runs.pipeline, "load_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n')
    out = tmp_path / "run"
    for argv, message in [
        (["run", "--task", str(bad)], "bad.jsonl:2: missing completion"),
        (["run", "--task", str(tmp_path / "empty.jsonl")], "is missing"),
        (
            ["run", "--task", str(good), "--heads", "file", "--heads-file", str(tmp_path / "none.json")],
            "no head ranking",
        ),
        (["run", "--task", str(good), "--resume"], "no run to continue"),
        (["tune", "--task", str(good), "--ranking", str(tmp_path / "none.json")], "no head ranking"),
        (["eval", "--task", str(good), "--adapter", str(tmp_path / "nowhere")], "nothing saved by lofit"),
    ]:
        assert main([*argv, "--output-dir", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
