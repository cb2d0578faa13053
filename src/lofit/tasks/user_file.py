"""The user's own data: JSONL, CSV or Parquet files, or a ``datasets`` dataset, in one of three
schemas, validated before use.

| schema | columns | trains with | evaluated by |
|---|---|---|---|
| SFT | ``prompt``, ``completion`` | SFT on the completion | exact match (or containment) of the greedy answer |
| preference | ``prompt``, ``chosen``, ``rejected`` | DPO | accuracy: chosen scores above rejected |
| multiple choice | ``prompt``, ``choices``, ``label`` | (evaluation only) | accuracy (MC1) and MC2 by log-likelihood |

Where the rows come from (a *source*):

- a file ending in ``.jsonl``, ``.csv`` or ``.parquet`` (read with ``pyarrow``);
- otherwise a ``datasets`` dataset: a hub id ``owner/name`` or a local folder, loaded with
  ``datasets.load_dataset`` (a folder written by ``save_to_disk`` with ``load_from_disk``;
  a single saved ``Dataset`` has no splits and is used whole). ``SOURCE:SPLIT`` picks a
  split (``datasets`` split syntax, e.g. ``owner/name:train[:500]``); without one, training
  reads ``train`` and evaluation the split asked for (``--eval-split``). Needs the
  ``datasets`` package (``pip install 'lofit[data]'``).

``choices`` is a list of strings (in CSV: a JSON array in the cell); ``label`` is the index
of the correct choice (an integer, or a string or whole float holding one). Completions,
answers and choices are used exactly as written (start them with a space if the prompt
does not end with one). Files are UTF-8 (a byte-order mark is allowed); JSONL lines are
split at ``\n`` only, so a string may hold any other line separator (U+2028...). Every
malformed row is reported with its place (``file:line`` for JSONL and CSV, ``row N``,
from 1, for Parquet and datasets), and data with any malformed row are refused before
training starts: every problem raises :class:`~lofit.data.files.DataError`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lofit.data.files import DataError, parse_json, read_text, require_file, short_repr, shorten
from lofit.evaluation.multiple_choice import MultipleChoiceExample, choice_logprobs, mc_scores
from lofit.tasks.base import Evaluation, GenerationExample, GenerationTask, PromptCompletion, PromptPreference

SCHEMAS = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "multiple_choice": ("prompt", "choices", "label"),
}
MAX_REPORTED = 20


FILE_SUFFIXES = (".jsonl", ".csv", ".parquet")


def is_dataset_source(source: str) -> bool:
    """Whether ``source`` names a ``datasets`` dataset: not a file of :data:`FILE_SUFFIXES` nor
    an existing file, and (before any ``:SPLIT``) a name with a ``/`` or an existing folder."""
    name = source.partition(":")[0]
    return not source.endswith(FILE_SUFFIXES) and not Path(source).is_file() and ("/" in name or Path(name).is_dir())


def is_user_source(name: str) -> bool:
    """Whether ``name`` names the user's own data: a data file or a ``datasets`` dataset."""
    return name.endswith(FILE_SUFFIXES) or is_dataset_source(name)


def _file_rows(path: Path) -> list[tuple[str, Any]]:
    """(place, row) pairs of a .jsonl, .csv or .parquet file (blank JSONL lines skipped)."""
    if path.suffix not in FILE_SUFFIXES:
        raise DataError(
            f"{path}: data files must end in .jsonl or .csv or .parquet; a datasets dataset is named by "
            "its hub id or folder"
        )
    if path.suffix == ".parquet":
        try:
            import pyarrow
            import pyarrow.parquet
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs the pyarrow package: pip install 'lofit[data]'") from None
        try:
            rows = pyarrow.parquet.read_table(require_file(path)).to_pylist()
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"{path}: not a readable Parquet file ({shorten(str(error))})") from None
        return [(f"{path} row {number}", row) for number, row in enumerate(rows, start=1)]
    text = read_text(path)
    if path.suffix == ".jsonl":
        lines = enumerate(text.split("\n"), start=1)
        return [(f"{path}:{number}", parse_json(line, f"{path}:{number}")) for number, line in lines if line.strip()]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return [(f"{path}:{reader.line_num}", row) for row in reader]
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num + 1}: not valid CSV ({error})") from None  # the line being read


def _dataset_rows(source: str, split: str) -> list[tuple[str, Any]]:
    """(place, row) pairs of the ``datasets`` dataset ``source`` (``NAME`` or ``NAME:SPLIT``;
    ``split`` when it names none)."""
    name, _, chosen = source.partition(":")
    split = chosen or split
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the dataset {name!r} needs the datasets package: pip install 'lofit[data]'") from None
    whole = (Path(name) / "state.json").is_file()  # one Dataset written by save_to_disk: no splits, used whole
    saved = whole or (Path(name) / "dataset_dict.json").is_file()  # a DatasetDict written by save_to_disk
    try:
        loaded = datasets.load_from_disk(name) if saved else datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as error:  # not found, unreachable hub, unknown split, unreadable files
        raise DataError(f"cannot load split {split!r} of the dataset {name!r}: {shorten(str(error), 300)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"the dataset {name!r} has no split {split!r} (it has: {', '.join(loaded)})")
        loaded = loaded[split]
    where = name if whole else f"{name}, split {split},"
    return [(f"{where} row {number}", row) for number, row in enumerate(loaded, start=1)]


def read_rows(source: str | Path, split: str = "train") -> list[tuple[str, Any]]:
    """(place, row) pairs of ``source`` (see the module docstring), the place naming the file
    and line, or the dataset, split and row; ``split`` is the dataset split read when the
    source names none."""
    if is_dataset_source(str(source)):
        return _dataset_rows(str(source), split)
    return _file_rows(Path(source))


def _schema_of(where: str, rows: list[tuple[str, Any]]) -> str:
    if not rows:
        raise DataError(f"{where}: no rows")
    first_place, first = rows[0]
    if not isinstance(first, dict):
        raise DataError(f"{first_place}: expected an object with named fields")
    for name, columns in SCHEMAS.items():
        if all(c in first for c in columns):
            return name
    expected = "; ".join(" + ".join(c) for c in SCHEMAS.values())
    found = shorten(str(sorted(str(name) for name in first if name is not None)))  # None: csv's surplus cells
    raise DataError(f"{first_place}: fields {found} match no schema (expected {expected})")


def _label(value: Any) -> int | None:
    """``value`` as a choice index: an integer, a string holding one, or a whole float; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return value if isinstance(value, int) else None


def _choices(value: Any) -> list | None:
    """``value`` as a list: a list as is, a string parsed as a JSON array; else None."""
    if isinstance(value, str):
        try:
            value = parse_json(value, "choices")
        except DataError:
            return None
    return value if isinstance(value, list) else None


def _row_problem(row: Any, schema: str) -> str | None:
    if not isinstance(row, dict):
        return "expected an object with named fields"
    if None in row:  # csv.DictReader files a row's cells beyond the header under None
        return "more cells than the header has columns"
    missing = [c for c in SCHEMAS[schema] if c not in row or row[c] in (None, "")]
    if missing:
        return f"missing {', '.join(missing)}"
    text_columns = [c for c in SCHEMAS[schema] if c not in ("choices", "label")]
    if any(not isinstance(row[c], str) for c in text_columns):
        return f"{', '.join(text_columns)} must be strings"
    if schema == "multiple_choice":
        choices = _choices(row["choices"])
        if choices is None:
            return "choices must be a JSON array of strings"
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            return "choices must be a list of at least two non-empty strings"
        label = _label(row["label"])
        if label is None:
            return f"label must be an integer, got {short_repr(row['label'])}"
        if not 0 <= label < len(choices):
            return f"label {label} is not an index of the {len(choices)} choices"
        row["choices"], row["label"] = choices, label
    return None


def load_user_data(source: str | Path, split: str = "train") -> tuple[str, list[dict]]:
    """The schema and validated rows of ``source`` (``split``: see :func:`read_rows`); a
    DataError lists every malformed row."""
    rows = read_rows(source, split)
    schema = _schema_of(str(source), rows)
    problems = [f"{place}: {problem}" for place, row in rows if (problem := _row_problem(row, schema))]
    if problems:
        more = f"\n... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(
            f"{len(problems)} malformed row(s), nothing was trained:\n" + "\n".join(problems[:MAX_REPORTED]) + more
        )
    return schema, [row for _, row in rows]


class UserFileTask(GenerationTask):
    """Train on the source ``train_file`` and evaluate on ``eval_file`` (or the training source
    itself); each a file or a ``datasets`` dataset (see the module docstring)."""

    needs_data_dir = False

    def __init__(self, train_file: str | Path, eval_file: str | Path | None = None, match: str = "exact"):
        if match not in ("exact", "contains"):
            raise ValueError(f"match must be 'exact' or 'contains'; got {match!r}")
        self.train_file = train_file
        self.eval_file = eval_file or train_file
        self.name = Path(str(train_file).partition(":")[0] if isinstance(train_file, str) else train_file).name
        self.match = match

    def _data(self, source: str | Path, split: str) -> tuple[str, list[dict]]:
        """:func:`load_user_data` of ``source``, parsed once per task (:meth:`parsed`): a file is
        one key whatever the split (the training file evaluated on is not parsed again); a
        dataset's split is part of its key."""
        key = (str(source), split) if is_dataset_source(str(source)) else str(source)
        return self.parsed(key, lambda: load_user_data(source, split))

    def train_examples(self, data_dir: Path | None = None) -> list[PromptCompletion] | list[PromptPreference]:
        schema, rows = self._data(self.train_file, "train")
        if schema == "sft":
            return [PromptCompletion(self.prompt(r["prompt"]), r["completion"]) for r in rows]
        if schema == "preference":
            return [PromptPreference(self.prompt(r["prompt"]), r["chosen"], r["rejected"]) for r in rows]
        raise DataError(
            f"{self.train_file}: multiple-choice rows (prompt, choices, label) can be evaluated but not trained on"
        )

    def eval_examples(self, data_dir: Path | None = None, split: str = "test") -> list:
        """The evaluation rows: of the evaluation file, or of the dataset's split named in the
        source, else ``split``."""
        schema, rows = self._data(self.eval_file, split)
        if schema == "sft":
            return [GenerationExample(self.prompt(r["prompt"]), (r["completion"],)) for r in rows]
        if schema == "preference":
            return [
                MultipleChoiceExample(self.prompt(r["prompt"]), (r["chosen"], r["rejected"]), (1, 0), 0) for r in rows
            ]
        return [
            MultipleChoiceExample(
                self.prompt(r["prompt"]),
                tuple(r["choices"]),
                tuple(int(i == r["label"]) for i in range(len(r["choices"]))),
                r["label"],
            )
            for r in rows
        ]

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence,
        batch_size: int = 16,
        progress: bool = True,
    ) -> Evaluation:
        if not examples or isinstance(examples[0], GenerationExample):
            return super().evaluate(model, tokenizer, examples, batch_size, progress)
        scores = choice_logprobs(model, tokenizer, examples, progress=progress)
        records = [
            {"prompt": e.prompt, "choices": list(e.choices), "labels": list(e.labels), "scores": s, **mc_scores(s, e)}
            for e, s in zip(examples, scores)
        ]
        n = max(1, len(records))
        return Evaluation(
            {
                "accuracy": sum(r["mc1"] for r in records) / n,
                "mc2": sum(r["mc2"] for r in records) / n,
                "num_examples": len(records),
            },
            records,
        )
