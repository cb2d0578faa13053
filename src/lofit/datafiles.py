"""Compatibility module: ``lofit.datafiles`` before the package was split into layers. It only
re-exports :mod:`lofit.data.files`; new code imports from there."""

from lofit.data.files import (
    DATA_ENV,
    HOW_TO_GET_DATA,
    TASK_FOLDERS,
    DataError,
    finite_number,
    parse_json,
    read_json_rows,
    read_text,
    require_fields,
    require_file,
    resolve_data_dir,
    short_repr,
    shorten,
)

__all__ = [
    "DATA_ENV",
    "DataError",
    "HOW_TO_GET_DATA",
    "TASK_FOLDERS",
    "finite_number",
    "parse_json",
    "read_json_rows",
    "read_text",
    "require_fields",
    "require_file",
    "resolve_data_dir",
    "short_repr",
    "shorten",
]
