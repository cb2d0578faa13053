"""Finding the data folder and reading data files with errors that name file and row.

Data files are UTF-8 (a byte-order mark is allowed); any problem reading one (missing,
not UTF-8, not valid JSON, a malformed row) raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import codecs
import json
import math
import os
from pathlib import Path
from typing import Any

DATA_ENV = "LOFIT_DATA"
TASK_FOLDERS = ("clutrr", "truthfulqa", "mquake")
"""The built-in tasks' sub-folders of the data folder."""
HOW_TO_GET_DATA = (
    "the built-in tasks read the LoFiT paper's splits, published in the folder dataset/ of "
    "https://github.com/fc2869/lo-fit: download that folder, rename its MQuAKE/ to mquake/, and pass it "
    "with --data-dir or the LOFIT_DATA environment variable (see docs/data.md)"
)


OOD_FOLDER = "ood"
"""The data folder's sub-folder of the out-of-domain evaluation sets (nq_open/, triviaqa/, mmlu/)."""
HOW_TO_GET_OOD_DATA = (
    "the out-of-domain sets (NQ-open, TriviaQA, MMLU; evaluation only) live in the data folder's ood/, written by "
    "its make_ood_data.py from public repositories at pinned commits (see docs/tasks.md)"
)


class DataError(ValueError):
    """A data file that is missing or malformed; the message names the file and the row."""


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir`` if given, else ``$LOFIT_DATA``; it must be an existing folder. The error
    for a missing one says where the data come from (:data:`HOW_TO_GET_DATA`)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not chosen:
        raise DataError(
            f"no data folder: pass --data-dir or set {DATA_ENV} (the folder holding clutrr/, truthfulqa/, "
            f"mquake/); {HOW_TO_GET_DATA}"
        )
    path = Path(chosen)
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist; {HOW_TO_GET_DATA}")
    return path


def shorten(text: str, limit: int = 160) -> str:
    """``text`` cut to ``limit`` characters (ending in "...") for error messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters for error messages."""
    return shorten(repr(value), limit)


def finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) of finite float value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def require_file(path: Path) -> Path:
    """``path`` if it is a file; else a DataError, which for a file of a built-in task's
    folder (:data:`TASK_FOLDERS`, or one under :data:`OOD_FOLDER`) also says where the data come from."""
    if not path.is_file():
        hint = f"; {HOW_TO_GET_DATA}" if path.parent.name in TASK_FOLDERS else ""
        hint = f"; {HOW_TO_GET_OOD_DATA}" if path.parent.parent.name == OOD_FOLDER else hint
        raise DataError(f"data file {path} is missing{hint}")
    return path


def read_text(path: Path) -> str:
    """The text of the UTF-8 file ``path`` (a byte-order mark dropped); a DataError naming the
    file and line when it is missing or holds bytes that are not UTF-8."""
    data = require_file(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x}); save the file as UTF-8"
        ) from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads(text)``, or a DataError starting with ``where`` (the file, and line)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as error:  # JSONDecodeError, or an integer of too many digits
        raise DataError(f"{where}: not valid JSON ({shorten(getattr(error, 'msg', str(error)))})") from None


def read_json_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) of every non-blank line of the JSON-lines file ``path``, ``where`` naming the file
    and line; a DataError there for a line that is not JSON or not an object."""
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        row = parse_json(line, where)
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, found {type(row).__name__}")
        rows.append((where, row))
    return rows


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON file holding a list of objects."""
    rows = parse_json(read_text(path), str(path))
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, found {type(rows).__name__}")
    return rows


def require_fields(path: Path, row_number: int, row: Any, fields: tuple[str, ...]) -> None:
    """Raise a DataError naming file and row unless ``row`` is an object with string ``fields``."""
    if not isinstance(row, dict):
        raise DataError(f"{path} row {row_number}: expected an object, found {type(row).__name__}")
    for name in fields:
        if name not in row:
            raise DataError(f"{path} row {row_number}: missing field {name!r}")
        if not isinstance(row[name], str) or not row[name].strip():
            raise DataError(f"{path} row {row_number}: field {name!r} must be a non-empty string")
