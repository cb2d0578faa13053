"""Integration tests on the embedded default model (SmolLM2-135M-Instruct, from its GGUF)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lofit
from lofit import LofitConfig, LofitModel, get_lofit_model, head_layout
from lofit.cli import main
from lofit.data.batching import tokenize_pair
from lofit.methods.lofit.steps import select_heads, tune_biases
from lofit.models.loading import load_model
from lofit.tasks import get_task
from lofit.training.objectives import SFT

pytestmark = pytest.mark.integration
DATA = Path(os.environ.get("LOFIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def default_model():
    return lofit.load_model("default")


@pytest.fixture(scope="module")
def trained(default_model, tmp_path_factory):
    """A LoFiT adapter trained briefly on 16 CLUTRR stories and saved."""
    model, tokenizer = default_model
    task = get_task("clutrr")
    pairs = [tokenize_pair(tokenizer, p.prompt, p.completion) for p in task.sample_train(DATA, 16, seed=0)]
    lofit_model = get_lofit_model(
        model, LofitConfig(num_heads=6, select_epochs=1, tune_epochs=2, batch_size=8, bias_lr=5e-2)
    )
    ranking, _ = select_heads(lofit_model, SFT(pairs, tokenizer.pad_token_id), progress=False)
    log = tune_biases(lofit_model, SFT(pairs, tokenizer.pad_token_id), ranking.top(6), progress=False)
    directory = tmp_path_factory.mktemp("adapter")
    lofit_model.save_pretrained(directory)
    yield lofit_model, directory, log
    lofit_model.remove_hooks()


def test_default_model_geometry_and_tokens(default_model):
    model, tokenizer = default_model
    layout = head_layout(model)
    assert (layout.model_type, layout.shape) == ("llama", (30, 9, 64))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32
    assert tokenizer("Hi").input_ids[0] != tokenizer.bos_token_id  # adds no BOS


def test_training_on_clutrr_learns_and_round_trips(default_model, trained):
    model, tokenizer = default_model
    lofit_model, directory, log = trained
    assert log.epoch_losses[-1] < log.epoch_losses[0]
    ids = tokenizer(["Ann is Bob 's\n"], return_tensors="pt").input_ids
    with torch.no_grad():
        hooked = lofit_model(input_ids=ids).logits
        with lofit_model.disable_adapter():
            plain = lofit_model(input_ids=ids).logits
    assert (hooked - plain).abs().max() > 1e-3
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["model_type"] == "llama" and len(config["selected_heads"]) == 6
    assert (
        config["base_model"] == "default" and "/" not in config["base_model"]
    )  # as the user named it, no machine path


def test_merge_cli_writes_a_checkpoint_plain_transformers_loads(default_model, trained, tmp_path):
    model, tokenizer = default_model
    lofit_model, directory, _ = trained
    text = "Read the following story about a family. Ann is Bob 's\n"
    with torch.no_grad():
        expected = lofit_model(**tokenizer(text, return_tensors="pt")).logits
    assert (
        main(["merge", "--model", "default", "--adapter", str(directory), "--output-dir", str(tmp_path / "merged")])
        == 0
    )
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "path = sys.argv[1]\n"
        "model = AutoModelForCausalLM.from_pretrained(path).eval()\n"
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        "with torch.no_grad():\n"
        "    logits = model(**tokenizer(sys.argv[2], return_tensors='pt')).logits\n"
        "torch.save(logits, sys.argv[3])\n"
        "assert 'lofit' not in sys.modules\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "merged"), text, str(tmp_path / "logits.pt")], check=True
    )
    reloaded = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-4)


def test_merged_equals_hooked_on_the_default_model(trained, default_model):
    _, tokenizer = default_model
    lofit_model, directory, _ = trained
    fresh, _ = load_model("default")
    loaded = LofitModel.from_pretrained(fresh, directory)
    ids = tokenizer(["Bob is Ann 's\n"], return_tensors="pt").input_ids
    with torch.no_grad():
        hooked = loaded(input_ids=ids).logits
        merged = loaded.merge_and_unload()(input_ids=ids).logits
    difference = (merged - hooked).abs().max().item()
    scale = hooked.abs().max().item()
    print(f"merged vs hooked: max |difference| {difference:.2e} on logits up to {scale:.1f}")
    assert difference <= 1e-5 * scale


def test_run_command_writes_the_run_folder(tmp_path, capsys):
    output = tmp_path / "run"
    code = main(
        [
            "run",
            "--task",
            "clutrr",
            "--model",
            "default",
            "--data-dir",
            str(DATA),
            "--output-dir",
            str(output),
            "--train-size",
            "8",
            "--limit",
            "8",
            "--num-heads",
            "3",
            "--select-epochs",
            "1",
            "--tune-epochs",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    assert {p.name for p in output.iterdir()} >= {
        "adapter",
        "head_ranking.json",
        "heads.png",
        "metrics.json",
        "predictions.jsonl",
        "config.yaml",
    }
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["test_num_examples"] == 8 and 0 <= metrics["test_exact_match"] <= 1
    assert metrics["trained_parameters"] == 3 * 64
    assert len(json.loads((output / "head_ranking.json").read_text())["ranking"]) == 270
    assert "clutrr test exact match: " in capsys.readouterr().out


USER_DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    "train_file,eval_file,metric",
    [
        ("capitals_train.jsonl", "capitals_test.jsonl", "test_exact_match"),
        ("myths_preferences.csv", None, "test_accuracy"),
    ],
)
def test_user_files_train_and_evaluate_end_to_end(tmp_path, train_file, eval_file, metric):
    output = tmp_path / "run"
    arguments = [
        "run",
        "--task",
        str(USER_DATA / train_file),
        "--model",
        "default",
        "--output-dir",
        str(output),
        "--num-heads",
        "3",
        "--select-epochs",
        "1",
        "--tune-epochs",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    if eval_file:
        arguments += ["--eval-file", str(USER_DATA / eval_file)]
    assert main(arguments) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert 0 <= metrics[metric] <= 1 and metrics["trained_parameters"] == 3 * 64
    assert (output / "adapter" / "adapter_model.safetensors").is_file()


def test_compare_command_runs_baselines_and_evaluates_their_saved_results(tmp_path, capsys):
    output = tmp_path / "compare"
    code = main(
        [
            "compare",
            "--task",
            "clutrr",
            "--methods",
            "zero-shot,iti,red",
            "--data-dir",
            str(DATA),
            "--output-dir",
            str(output),
            "--train-size",
            "16",
            "--limit",
            "4",
            "--select-epochs",
            "1",
            "--tune-epochs",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    table = (output / "comparison.md").read_text()
    assert "| iti | 1,728 |" in table and "| red | 34,560 |" in table and "| zero-shot | 0 |" in table
    assert table in capsys.readouterr().out
    assert (
        main(
            [
                "eval",
                "--task",
                "clutrr",
                "--data-dir",
                str(DATA),
                "--adapter",
                str(output / "red" / "adapter"),
                "--limit",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    evaluated = json.loads((output / "red" / "eval-test" / "metrics.json").read_text())
    trained = json.loads((output / "red" / "metrics.json").read_text())
    assert evaluated["method"] == "red" and evaluated["test_exact_match"] == trained["test_exact_match"]
    assert evaluated["trained_parameters"] == 34_560
