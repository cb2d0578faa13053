"""What an experiment's driver leaves beside ``results.jsonl`` for a progress view
(``lofit experiment NAME --status``) that another process can read at any time.

- ``running/<key>.json``: one marker per job in flight (a cell, or a step-1 ranking): what it
  is, when it started, the driver's host and process id, and the executor. The driver writes
  it when it hands the job out and deletes it when the job ends; a marker whose driver
  process no longer exists (on this host) is *stale*: its job was interrupted.
- ``failures/results.jsonl``: one line per failed job, with its error, appended like the
  results. A failed job is not a result: the next run of the experiment tries it again.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from lofit.experiments.results import append_result, read_results
from lofit.utils.atomic import write_json

RUNNING = "running"
FAILURES = "failures"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_marker(folder: Path, key: str, description: str, executor: str) -> None:
    """Mark the job ``key`` as running, handed out now by this process."""
    marker = {
        "key": key,
        "cell": description,
        "started_at": now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "executor": executor,
    }
    write_json(folder / RUNNING / f"{key}.json", marker)


def remove_marker(folder: Path, key: str) -> None:
    (folder / RUNNING / f"{key}.json").unlink(missing_ok=True)


def _driver_alive(marker: dict) -> bool:
    """Whether the process that wrote ``marker`` still runs (assumed so for another host's driver)."""
    if marker.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(marker["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def read_markers(folder: Path) -> dict[str, dict]:
    """The markers of jobs in flight whose driver is alive, by key (unreadable ones skipped)."""
    markers = {}
    for path in sorted((folder / RUNNING).glob("*.json")):
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # removed or being replaced while being read
        if isinstance(marker, dict) and "key" in marker and _driver_alive(marker):
            markers[marker["key"]] = marker
    return markers


def clear_stale_markers(folder: Path) -> None:
    """Delete the markers whose driver process (on this host) has ended: their jobs were interrupted."""
    for path in (folder / RUNNING).glob("*.json"):
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not _driver_alive(marker):
            path.unlink(missing_ok=True)


def record_failure(folder: Path, record: dict) -> None:
    """Append a failed job (its key, what it was and its ``error``) to ``failures/results.jsonl``."""
    append_result(folder / FAILURES, record | {"failed_at": now()})


def read_failures(folder: Path) -> dict[str, dict]:
    """The latest failure recorded for each key."""
    return {record["key"]: record for record in read_results(folder / FAILURES)}


def elapsed_seconds(marker: dict) -> float:
    """Seconds since the marker's job was handed out."""
    return (datetime.now(UTC) - datetime.fromisoformat(marker["started_at"])).total_seconds()
