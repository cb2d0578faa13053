"""The user's own data: JSONL or CSV files in one of three schemas, validated before use.

| schema | columns | trains with | evaluated by |
|---|---|---|---|
| SFT | ``prompt``, ``completion`` | SFT on the completion | exact match (or containment) of the greedy answer |
| preference | ``prompt``, ``chosen``, ``rejected`` | DPO | accuracy: chosen scores above rejected |
| multiple choice | ``prompt``, ``choices``, ``label`` | (evaluation only) | accuracy (MC1) and MC2 by log-likelihood |

``choices`` is a list of strings (in CSV: a JSON array in the cell); ``label`` is the index
of the correct choice. Completions, answers and choices are used exactly as written (start
them with a space if the prompt does not end with one). Every malformed row is reported
with file and line, and a file with any malformed row is refused before training starts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..datafiles import DataError, require_file
from ..multiple_choice import MultipleChoiceExample, choice_logprobs, mc_scores
from .base import Evaluation, GenerationExample, GenerationTask, PromptCompletion, PromptPreference

SCHEMAS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"), "multiple_choice": ("prompt", "choices", "label")}
MAX_REPORTED = 20


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs of a .jsonl or .csv file."""
    require_file(path)
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        return rows
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            return [(reader.line_num, row) for row in reader]
    raise DataError(f"{path}: data files must end in .jsonl or .csv")


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
    raise DataError(f"{path}:{first_line}: fields {sorted(first)} match no schema (expected {expected})")


def _row_problem(row: Any, schema: str) -> str | None:
    if not isinstance(row, dict):
        return "expected an object with named fields"
    missing = [c for c in SCHEMAS[schema] if c not in row or row[c] in (None, "")]
    if missing:
        return f"missing {', '.join(missing)}"
    text_columns = [c for c in SCHEMAS[schema] if c not in ("choices", "label")]
    if any(not isinstance(row[c], str) for c in text_columns):
        return f"{', '.join(text_columns)} must be strings"
    if schema == "multiple_choice":
        choices = row["choices"]
        if isinstance(choices, str):
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                return "choices must be a JSON array of strings"
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            return "choices must be a list of at least two non-empty strings"
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            return f"label must be an integer, got {row['label']!r}"
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
