"""lm-evaluation-harness on lofit results, offline: a YAML task over a local JSONL file, a tiny model."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager

import lofit
import lofit.harness  # registers the model name "lofit"
from lofit.cli import main

from .conftest import COMMON, WORDS, randomize_adapter, word_tokenizer
from .tiny_run import write_task

TASKS = """\
task: {name}_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
  - metric: acc
"""
GENERATION = """\
task: {name}_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny model folder, a LoFiT adapter for it (random, large), and two harness tasks on local data."""
    root = tmp_path_factory.mktemp("harness")
    model_folder = root / "tiny"
    torch.manual_seed(0)  # a vocabulary of the tokenizer's words only, so that every generated token decodes to text
    AutoModelForCausalLM.from_config(LlamaConfig(**COMMON | {"vocab_size": len(WORDS)})).save_pretrained(model_folder)
    word_tokenizer().save_pretrained(model_folder)
    model, _ = lofit.load_model(str(model_folder))
    adapted = lofit.get_lofit_model(model)
    adapted.set_active_heads([(0, 1), (1, 2), (2, 3)])
    randomize_adapter(adapted, scale=1.0)
    adapted.save_pretrained(root / "adapter")
    tasks = root / "tasks"
    tasks.mkdir()
    data = write_task(root / "yesno.jsonl", rows=8)
    (tasks / "ll.yaml").write_text(TASKS.format(name="lofit_tiny", data=data))
    (tasks / "gen.yaml").write_text(GENERATION.format(name="lofit_tiny", data=data))
    return {"model": str(model_folder), "adapter": str(root / "adapter"), "tasks": str(tasks)}


def evaluate(setup: dict, extra: str = "") -> dict:
    return lm_eval.simple_evaluate(
        model="lofit",
        model_args=f"pretrained={setup['model']}{extra}",
        tasks=["lofit_tiny_ll", "lofit_tiny_gen"],
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=setup["tasks"], include_defaults=False),
    )


def generations(results: dict) -> list:
    return [sample["resps"] for sample in results["samples"]["lofit_tiny_gen"]]


def test_hooked_and_merged_adapters_score_alike_and_unlike_the_base_model(setup):
    base = evaluate(setup)
    hooked = evaluate(setup, f",adapter={setup['adapter']}")
    merged = evaluate(setup, f",adapter={setup['adapter']},merge=true")
    perplexity = {
        name: run["results"]["lofit_tiny_ll"]["perplexity,none"]
        for name, run in (("base", base), ("hooked", hooked), ("merged", merged))
    }
    assert perplexity["hooked"] == pytest.approx(perplexity["merged"], rel=1e-4)
    assert perplexity["hooked"] != pytest.approx(perplexity["base"], rel=1e-2)
    assert generations(hooked) == generations(merged)  # generation goes through the hooks too
    assert generations(hooked) != generations(base)


def test_merge_without_a_foldable_adapter_is_refused(setup):
    with pytest.raises(ValueError, match="merge=true needs an adapter"):
        lofit.harness.LofitLM(pretrained=setup["model"], merge=True)


def test_lofit_eval_harness_tasks_prints_and_writes_the_results(setup, tmp_path, capsys, monkeypatch):
    # Indexing lm-eval's thousands of built-in task files takes most of a run: this test needs only its own.
    monkeypatch.setattr(lofit.harness, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    # The bootstrap standard error of perplexity runs in this process: a fork()ed pool of copies of a
    # process holding a model and threads can hang (it did here, at the pool's terminate).
    monkeypatch.setattr(multiprocessing, "Pool", lambda *args, **kwargs: pytest.fail("lm-eval forked a pool"))
    assert (
        main(
            [
                "eval",
                "--harness-tasks",
                "lofit_tiny_ll",
                "--harness-include",
                setup["tasks"],
                "--model",
                setup["model"],
                "--adapter",
                setup["adapter"],
                "--output-dir",
                str(tmp_path),
                "--limit",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "lofit_tiny_ll" in out and "perplexity" in out
    saved = json.loads((tmp_path / "harness_results.json").read_text())
    assert saved["results"]["lofit_tiny_ll"]["perplexity,none"] > 1
    assert saved["results"]["lofit_tiny_ll"]["perplexity_stderr,none"] > 0  # bootstrapped, in this process
    assert "DISABLE_MULTIPROC" not in os.environ  # set for the evaluation only
    assert Path(saved["config"]["model_args"]["adapter"]) == Path(setup["adapter"])
