"""``results.jsonl``: one JSON object per finished cell, appended the moment the cell ends.

Each line is written with one ``write`` and flushed to disk (fsync), so an interrupted
experiment leaves only whole lines, except possibly a torn last line, which
:func:`read_results` skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = "results.jsonl"


def read_results(folder: str | Path) -> list[dict]:
    """The records of ``folder``'s results file, in order (none when it does not exist)."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by an interruption
        if isinstance(record, dict) and "key" in record:
            records.append(record)
    return records


def append_result(folder: str | Path, record: dict) -> None:
    """Append ``record`` as one line of ``folder``'s results file and flush it to disk."""
    path = Path(folder) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as file:
        if file.tell() > 0 and not path.read_bytes().endswith(b"\n"):
            line = "\n" + line  # after a torn last line, start a fresh one
        file.write(line)
        file.flush()
        os.fsync(file.fileno())


def tuning_score(record: dict) -> float:
    """The score a tuning trial competes with: its validation score, or -inf when it has none or
    when some of the K heads it trained scored exactly 0 in step 1 (``zero_score_heads``: a step 1
    that kept fewer than K heads fills the top K with heads at zero in index order, which no
    selection chose). Such a trial is never chosen, and any trial that kept its K heads beats it."""
    if record.get("score") is None or record.get("zero_score_heads"):
        return float("-inf")
    return record["score"]
