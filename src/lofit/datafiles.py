"""Finding the data folder and reading data files with errors that name file and row."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DATA_ENV = "LOFIT_DATA"


class DataError(ValueError):
    """A data file that is missing or malformed; the message names the file and the row."""


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir`` if given, else ``$LOFIT_DATA``; it must be an existing folder."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not chosen:
        raise DataError(f"no data folder: pass --data-dir or set {DATA_ENV} (the folder holding clutrr/, truthfulqa/, mquake/)")
    path = Path(chosen)
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist")
    return path


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"data file {path} is missing")
    return path


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON file holding a list of objects."""
    try:
        rows = json.loads(require_file(path).read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
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
