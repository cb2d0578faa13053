"""The command line: options from the dataclasses, YAML config with flag overrides, `lofit heads`."""

from __future__ import annotations

import pytest
import torch
import yaml

from lofit.cli import _configs, build_parser, main
from lofit.pipeline import RunConfig
from lofit.steps import HeadRanking


def parse(argv):
    return _configs(build_parser().parse_args(argv))


def test_defaults_come_from_the_dataclasses():
    run, lofit = parse(["run"])
    assert run == RunConfig()
    assert (lofit.num_heads, lofit.bias_lr, lofit.tune_epochs) == (0.1, 5e-2, 4)


def test_yaml_config_is_overridden_by_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"task": "mquake", "limit": 5}, "lofit": {"bias_lr": 0.3, "num_heads": 9}}))
    run, lofit = parse(["run", "--config", str(config), "--num-heads", "12", "--no-progress"])
    assert (run.task, run.limit, run.progress) == ("mquake", 5, False)
    assert (lofit.bias_lr, lofit.num_heads) == (0.3, 12)


def test_a_run_folder_config_yaml_round_trips(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"run": vars(RunConfig(task="truthfulqa", fold="all")), "lofit": {"seed": 7}}))
    run, lofit = parse(["run", "--config", str(config)])
    assert (run.task, run.folds(), lofit.seed) == ("truthfulqa", [0, 1], 7)


def test_bad_options_are_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("bias_learning_rate: 0.1\n")
    with pytest.raises(SystemExit, match="unknown options"):
        parse(["run", "--config", str(config)])
    with pytest.raises(SystemExit, match="heads must be"):
        parse(["run", "--num-heads", "0"])
    with pytest.raises(SystemExit, match="does not exist"):
        parse(["run", "--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(ValueError, match="fold must be 0, 1 or all"):
        RunConfig(fold="2").folds()


def test_heads_command_prints_the_ranking_and_writes_the_heatmap(tmp_path, capsys):
    HeadRanking.from_scores(torch.tensor([[0.1, 0.9], [0.5, 0.3]])).save(tmp_path / "head_ranking.json")
    assert main(["heads", str(tmp_path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == ["0", "0", "1", "0.90000"]
    assert (tmp_path / "heads.png").stat().st_size > 1000


def test_missing_files_exit_with_a_message(tmp_path, capsys):
    assert main(["heads", str(tmp_path / "nothing.json")]) == 2
    assert "no head ranking" in capsys.readouterr().err


def test_yaml_values_are_converted_to_the_field_types(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("bias_lr: 5e-2\nfold: 1\nlimit: 3\n")
    run, lofit = parse(["run", "--config", str(config)])
    assert (lofit.bias_lr, run.fold, run.limit) == (0.05, "1", 3)
    config.write_text("batch_size: many\n")
    with pytest.raises(SystemExit, match="batch_size must be of type int"):
        parse(["run", "--config", str(config)])


def test_method_options_come_from_each_method_config(tmp_path):
    from lofit.cli import _method_config

    args = build_parser().parse_args(["run", "--method", "lora", "--lora-rank", "4", "--reft-layers", "1,2"])
    run, _ = _configs(args)
    assert run.method == "lora" and _method_config(args, "lora").lora_rank == 4
    assert _method_config(args, "reft").reft_layers == "1,2"
    assert _method_config(args, "zero-shot") is None
    with pytest.raises(ValueError, match="unknown method"):
        _method_config(build_parser().parse_args(["run", "--method", "prompting"]), "prompting")
    with pytest.raises(SystemExit, match="reft_positions"):
        _method_config(build_parser().parse_args(["run", "--reft-positions", "middle"]), "reft")
