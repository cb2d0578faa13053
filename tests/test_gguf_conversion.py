"""GGUF files are de-quantised once into a checkpoint folder in the cache, which every later load reads."""

from __future__ import annotations

import copy
import json
import os
import threading
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lofit.models import loading
from lofit.models.identity import fingerprint

TOKENS = [chr(code) for code in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ġt", "th", "the"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A two-layer Llama GGUF with a byte-pair tokenizer of 33 tokens; its matrices in Q8_0."""
    rng = np.random.default_rng(seed)
    hidden, layers, heads, kv_heads, ffn = 32, 2, 4, 2, 64
    vocab = TOKENS + SPECIAL
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * len(TOKENS) + [3] * len(SPECIAL))
    writer.add_token_merges(["Ġ t", "t h", "th e"])
    writer.add_bos_token_id(len(vocab) - 2)
    writer.add_eos_token_id(len(vocab) - 1)
    writer.add_add_bos_token(True)  # as Gemma's file: save_pretrained loses this flag

    def tensor(name: str, *shape: int) -> None:
        values = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if len(shape) == 1:  # norms stay float32, as in real files
            writer.add_tensor(name, values)
            return
        packed = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    tensor("token_embd.weight", len(vocab), hidden)
    kv_width = kv_heads * hidden // heads
    for layer in range(layers):
        block = f"blk.{layer}"
        tensor(f"{block}.attn_norm.weight", hidden)
        tensor(f"{block}.attn_q.weight", hidden, hidden)
        tensor(f"{block}.attn_k.weight", kv_width, hidden)
        tensor(f"{block}.attn_v.weight", kv_width, hidden)
        tensor(f"{block}.attn_output.weight", hidden, hidden)
        tensor(f"{block}.ffn_norm.weight", hidden)
        tensor(f"{block}.ffn_gate.weight", ffn, hidden)
        tensor(f"{block}.ffn_up.weight", ffn, hidden)
        tensor(f"{block}.ffn_down.weight", hidden, ffn)
    tensor("output_norm.weight", hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _conversions(cache: Path) -> list[Path]:
    return [path for path in (cache / "gguf").glob("model-*") if path.is_dir()]


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    ours, theirs = first.state_dict(), second.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_gguf_file_is_converted_once_and_every_later_load_reads_the_conversion(tmp_path, cache, monkeypatch):
    path = write_tiny_gguf(tmp_path / "model.gguf")
    direct_model, direct_tokenizer = loading._load_gguf_file(path, {"dtype": torch.float32})

    model, tokenizer = loading.load_model(str(path))
    (folder,) = _conversions(cache)
    assert folder == loading.gguf_conversion_folder(path)
    record = json.loads((folder / loading.CONVERSION_RECORD).read_text())
    assert record["source"] == "model.gguf" and len(record["source_sha256"]) == 64
    assert _same_weights(model, direct_model) and fingerprint(model) == fingerprint(direct_model)
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    assert model.name_or_path == str(path) and model.lofit_base_name == "model.gguf"
    for text in ("the theta", "a b  c\n", "<|im_start|>the<|im_end|>"):
        assert tokenizer(text).input_ids == direct_tokenizer(text).input_ids
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == ("<|im_start|>", "<|im_end|>", "<|im_end|>")

    assert tokenizer.add_bos_token and tokenizer("the").input_ids[0] == tokenizer.bos_token_id
    for loaded in (tokenizer, direct_tokenizer):  # the flag is kept: changing another rebuilds alike
        loaded.add_eos_token = False
    assert tokenizer("the theta").input_ids == direct_tokenizer("the theta").input_ids

    def no_second_conversion(*_):
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(loading, "_load_gguf_file", no_second_conversion)
    again, _ = loading.load_model(str(path), dtype="bfloat16")
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.model.embed_tokens.weight, direct_model.model.embed_tokens.weight.bfloat16())
    assert loading.model_config.__wrapped__(str(path)).num_hidden_layers == 2  # read from the conversion


def test_a_changed_gguf_file_gets_a_conversion_of_its_own(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "model.gguf", seed=0)
    first, _ = loading.load_model(str(path))
    write_tiny_gguf(path, seed=1)
    second, _ = loading.load_model(str(path))
    assert len(_conversions(cache)) == 2
    assert not torch.equal(first.model.embed_tokens.weight, second.model.embed_tokens.weight)
    direct, _ = loading._load_gguf_file(path, {"dtype": torch.float32})
    assert _same_weights(second, direct)


def test_processes_converting_one_file_at_once_convert_it_once(tmp_path, cache, monkeypatch):
    """Threads stand in for torchrun's processes: the file lock excludes both alike. (Only the
    conversion runs in threads: ``from_pretrained`` itself is not safe to run in several.)"""
    path = write_tiny_gguf(tmp_path / "model.gguf")
    conversions, read = [], loading._load_gguf_file

    def counted(*args):
        conversions.append(args[0])
        return read(*args)

    monkeypatch.setattr(loading, "_load_gguf_file", counted)
    folders, errors = [], []

    def convert() -> None:
        try:
            folders.append(loading.gguf_conversion(path))
        except Exception as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and conversions == [path] and folders == [loading.gguf_conversion_folder(path)] * 3
    assert _conversions(cache) == folders[:1]  # and nothing half-written beside it
    assert not [name for name in (cache / "gguf").iterdir() if "staging" in name.name]
    model, _ = loading.load_model(str(path))
    assert conversions == [path] and _same_weights(model, read(path, {"dtype": torch.float32})[0])


def test_a_cache_that_cannot_be_written_falls_back_to_the_gguf_file_and_says_so(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "model.gguf")
    (tmp_path / "not-a-folder").write_text("a file where the cache should be")
    monkeypatch.setenv("LOFIT_CACHE", str(tmp_path / "not-a-folder"))
    with pytest.warns(UserWarning, match="cannot keep or read a converted copy of model.gguf .* Set LOFIT_CACHE"):
        model, tokenizer = loading.load_model(str(path))
    direct, _ = loading._load_gguf_file(path, {"dtype": torch.float32})
    assert _same_weights(model, direct) and tokenizer("the").input_ids == [len(TOKENS) + 1, TOKENS.index("the")]
    assert loading.model_config.__wrapped__(str(path)).num_hidden_layers == 2  # read from the file's metadata


def test_a_disk_that_fills_while_writing_the_conversion_falls_back_without_reading_the_file_again(
    tmp_path, cache, monkeypatch
):
    path = write_tiny_gguf(tmp_path / "model.gguf")
    direct, _ = loading._load_gguf_file(path, {"dtype": torch.float32})
    reads = []
    read = loading._load_gguf_file

    def counted(*arguments):
        reads.append(arguments[0])
        return read(*arguments)

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loading, "_load_gguf_file", counted)
    monkeypatch.setattr(loading, "_write_conversion", full)
    modules = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
    per_module = dict.fromkeys(modules, "cpu")
    placements = [("auto", None), ("bfloat16", None), ("bfloat16", "auto"), ("float32", per_module)]
    for dtype, device_map in placements:  # one device, and maps that transformers spreads over devices
        with pytest.warns(UserWarning, match="cannot keep or read a converted copy of model.gguf .*No space left"):
            model, tokenizer = loading.load_model(str(path), dtype=dtype, device_map=device_map)
        wanted = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        assert model.dtype == wanted and _same_weights(model, copy.deepcopy(direct).to(wanted)) and not model.training
        assert tokenizer("the").input_ids == [len(TOKENS) + 1, TOKENS.index("the")]
    assert reads == [path] * len(placements)  # once per load: the de-quantised copy served the fallback
    assert not _conversions(cache)


def test_a_file_rewritten_with_the_same_size_and_time_is_converted_again_in_the_same_process(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "model.gguf", seed=0)
    first, _ = loading.load_model(str(path))
    times = path.stat()
    time.sleep(0.05)  # so that the rewrite's change time differs even on a coarse clock
    write_tiny_gguf(path, seed=1)
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert path.stat().st_size == times.st_size and path.stat().st_mtime_ns == times.st_mtime_ns
    second, _ = loading.load_model(str(path))
    assert not torch.equal(first.model.embed_tokens.weight, second.model.embed_tokens.weight)


def test_a_conversion_left_incomplete_is_replaced_and_its_files_are_readable_as_ordinary_files(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "model.gguf")
    folder = loading.gguf_conversion_folder(path)
    folder.mkdir(parents=True)  # an interrupted delete: files left, the record gone
    (folder / "chat_template.jinja").write_text("{{ 'left over' }}")
    stale = folder.parent / f".{folder.name}.0badf00d.staging"  # a killed conversion's staging folder
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    umask = os.umask(0o022)
    try:
        model, tokenizer = loading.load_model(str(path))
    finally:
        os.umask(umask)
    assert not (folder / "chat_template.jinja").exists() and tokenizer.chat_template is None
    assert not stale.exists() and (folder / loading.CONVERSION_RECORD).is_file()
    assert {written.name: written.stat().st_mode & 0o777 for written in folder.iterdir()} == {
        written.name: 0o644 for written in folder.iterdir()
    }
    assert _same_weights(model, loading._load_gguf_file(path, {"dtype": torch.float32})[0])


def test_a_conversion_this_user_cannot_read_falls_back_and_a_broken_gguf_file_is_not_blamed_on_the_cache(
    tmp_path, cache, monkeypatch
):
    path = write_tiny_gguf(tmp_path / "model.gguf")
    loading.gguf_conversion(path)

    def unreadable(*_):
        raise PermissionError(13, "Permission denied", "model.safetensors")

    monkeypatch.setattr(loading, "_load_conversion", unreadable)
    with pytest.warns(UserWarning, match="cannot keep or read a converted copy of model.gguf"):
        model, _ = loading.load_model(str(path))
    assert _same_weights(model, loading._load_gguf_file(path, {"dtype": torch.float32})[0])
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file's own error, not a warning about the cache
        with pytest.raises(Exception) as raised:
            loading.load_model(str(broken))
    assert not isinstance(raised.value, (loading.ConversionCacheError, UserWarning))
    assert not [folder for folder in (cache / "gguf").glob("broken-*") if folder.is_dir()]
