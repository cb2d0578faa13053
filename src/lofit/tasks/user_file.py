"""The user's own data: JSONL or CSV files in one of three schemas, validated before use.

| schema | columns | trains with | evaluated by |
|---|---|---|---|
| SFT | ``prompt``, ``completion`` | SFT on the completion | exact match (or containment) of the greedy answer |
| preference | ``prompt``, ``chosen``, ``rejected`` | DPO | accuracy: chosen scores above rejected |
| multiple choice | ``prompt``, ``choices``, ``label`` | (evaluation only) | accuracy (MC1) and MC2 by log-likelihood |

``choices`` is a list of strings (in CSV: a JSON array in the cell); ``label`` is the index
of the correct choice (an integer, or a string or whole float holding one). Completions,
answers and choices are used exactly as written (start them with a space if the prompt
does not end with one). Files are UTF-8 (a byte-order mark is allowed); JSONL lines are
split at ``\n`` only, so a string may hold any other line separator (U+2028...). Every
malformed row is reported with file and line, and a file with any malformed row is
refused before training starts: every problem raises :class:`~lofit.datafiles.DataError`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..datafiles import DataError, parse_json, read_text, short_repr, shorten
from ..multiple_choice import MultipleChoiceExample, choice_logprobs, mc_scores
from .base import Evaluation, GenerationExample, GenerationTask, PromptCompletion, PromptPreference

SCHEMAS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"), "multiple_choice": ("prompt", "choices", "label")}
MAX_REPORTED = 20


def read_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, row) pairs of a .jsonl or .csv file (blank JSONL lines skipped)."""
    if path.suffix not in (".jsonl", ".csv"):
        raise DataError(f"{path}: data files must end in .jsonl or .csv")
    text = read_text(path)
    if path.suffix == ".jsonl":
        lines = enumerate(text.split("\n"), start=1)
        return [(number, parse_json(line, f"{path}:{number}")) for number, line in lines if line.strip()]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num + 1}: not valid CSV ({error})") from None  # the line being read


def _schema_of(path: Path, rows: list[tuple[int, dict]]) -> str:
    if not rows:
        raise DataError(f"{path}: no rows")
    first_line, first = rows[0]
    if not isinstance(first, dict):
        raise DataError(f"{path}:{first_line}: expected an object with named fields")
    for name, columns in SCHEMAS.items():
        if all(c in first for c in columns):
            return name
    expected = "; ".join(" + ".join(c) for c in SCHEMAS.values())
    found = shorten(str(sorted(str(name) for name in first if name is not None)))  # None: csv's surplus cells
    raise DataError(f"{path}:{first_line}: fields {found} match no schema (expected {expected})")


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


def load_user_file(path: Path) -> tuple[str, list[dict]]:
    """The schema and validated rows of ``path``; a DataError lists every malformed row."""
    rows = read_rows(path)
    schema = _schema_of(path, rows)
    problems = [f"{path}:{line}: {problem}" for line, row in rows if (problem := _row_problem(row, schema))]
    if problems:
        more = f"\n... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{len(problems)} malformed row(s), nothing was trained:\n" + "\n".join(problems[:MAX_REPORTED]) + more)
    return schema, [row for _, row in rows]


class UserFileTask(GenerationTask):
    """Train on ``train_file`` and evaluate on ``eval_file`` (or the train file itself)."""

    needs_data_dir = False

    def __init__(self, train_file: str | Path, eval_file: str | Path | None = None, match: str = "exact"):
        if match not in ("exact", "contains"):
            raise ValueError(f"match must be 'exact' or 'contains'; got {match!r}")
        self.train_file = Path(train_file)
        self.eval_file = Path(eval_file) if eval_file else self.train_file
        self.name = self.train_file.name
        self.match = match

    def train_examples(self, data_dir: Path | None = None) -> list[PromptCompletion] | list[PromptPreference]:
        schema, rows = load_user_file(self.train_file)
        if schema == "sft":
            return [PromptCompletion(self.prompt(r["prompt"]), r["completion"]) for r in rows]
        if schema == "preference":
            return [PromptPreference(self.prompt(r["prompt"]), r["chosen"], r["rejected"]) for r in rows]
        raise DataError(f"{self.train_file}: multiple-choice rows (prompt, choices, label) can be evaluated but not trained on")

    def eval_examples(self, data_dir: Path | None = None, split: str = "test") -> list:
        schema, rows = load_user_file(self.eval_file)
        if schema == "sft":
            return [GenerationExample(self.prompt(r["prompt"]), (r["completion"],)) for r in rows]
        if schema == "preference":
            return [MultipleChoiceExample(self.prompt(r["prompt"]), (r["chosen"], r["rejected"]), (1, 0), 0) for r in rows]
        return [MultipleChoiceExample(self.prompt(r["prompt"]), tuple(r["choices"]), tuple(int(i == r["label"]) for i in range(len(r["choices"]))),
                                      r["label"]) for r in rows]

    def evaluate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence, batch_size: int = 16,
                 progress: bool = True) -> Evaluation:
        if not examples or isinstance(examples[0], GenerationExample):
            return super().evaluate(model, tokenizer, examples, batch_size, progress)
        scores = choice_logprobs(model, tokenizer, examples, progress=progress)
        records = [{"prompt": e.prompt, "choices": list(e.choices), "labels": list(e.labels), "scores": s, **mc_scores(s, e)}
                   for e, s in zip(examples, scores)]
        n = max(1, len(records))
        return Evaluation({"accuracy": sum(r["mc1"] for r in records) / n, "mc2": sum(r["mc2"] for r in records) / n,
                           "num_examples": len(records)}, records)
