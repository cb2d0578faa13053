"""Writing files so that an interruption never leaves one half-written.

Every helper writes into a temporary file in the destination's own folder (same file
system), flushes and fsyncs it, then ``os.replace``-s it over the destination: a reader
sees the old file or the new one, never a mix. A crash can leave a hidden
``.NAME.*.tmp`` file (or ``.NAME.staging-*`` folder) beside the destination; it is never
read and may be deleted. Parent folders are created as needed. Temporary files are
created with mode 0o666 less the umask, like an ordinary ``open(path, "w")``.

- :func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`save_safetensors`:
  one file.
- :func:`replacing`: a temporary path for any writer (``torch.save``, a YAML dump...),
  moved into place when the ``with`` block ends without an exception.
- :func:`staged_folder`: a temporary folder for several files written together (an
  adapter, ``save_pretrained`` output), moved into place when the block succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX only; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _temporary_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception the
    file written there is fsynced and replaces ``path``, otherwise it is deleted and
    ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path, ".tmp")
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with replacing(path) as temporary:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (UTF-8 unless told)."""
    write_bytes(path, text.encode(encoding))


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """Write ``value`` as JSON (then a newline) to ``path`` atomically."""
    write_text(path, json.dumps(value, indent=indent) + "\n")


def save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format, atomically."""
    with replacing(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


@contextlib.contextmanager
def staged_folder(directory: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``directory`` to write files into; when the
    block ends without an exception they are moved into ``directory``, otherwise they are
    deleted and ``directory`` is left as it was.

    When ``directory`` does not exist yet, the whole folder appears in one rename. When it
    exists, each staged file replaces its namesake in one rename (files already there under
    other names are kept), so a crash during the moves, a few renames long, can leave some
    files of the new save beside the rest of the old one, but never a partial file.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = _temporary_name(directory, ".staging")
    staging.mkdir()
    try:
        yield staging
        _move_contents(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_contents(staging: Path, directory: Path) -> None:
    for path in staging.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    if not directory.exists():
        os.replace(staging, directory)
        _fsync_folder(directory.parent)
        return
    for path in sorted(staging.rglob("*")):
        target = directory / path.relative_to(staging)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            os.replace(path, target)
    _fsync_folder(directory)
