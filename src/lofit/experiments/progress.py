"""What an experiment's driver leaves beside ``results.jsonl`` for a progress view
(``lofit experiment NAME --status``) that another process can read at any time.

- ``running/<key>.json``: one marker per job in flight (a cell, or a step-1 ranking): what it
  is, when it started, the driver's host and process id, and the executor. The driver claims
  it when it hands the job out (:func:`claim_marker`: a job whose marker belongs to another
  live driver is that driver's, never run twice) and deletes it when the job ends, its own
  marker only; a marker whose driver process no longer exists (on this host) is *stale*: its
  job was interrupted, and the next driver may claim it.
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

RUNNING = "running"
FAILURES = "failures"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _marker(key: str, description: str, executor: str) -> dict:
    """The marker of the job ``key`` handed out now by this process."""
    return {
        "key": key,
        "cell": description,
        "started_at": now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "executor": executor,
    }


def _read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or removed or being replaced while being read
    return marker if isinstance(marker, dict) and "key" in marker else None


def _is_mine(marker: dict | None) -> bool:
    return marker is not None and marker.get("host") == socket.gethostname() and marker.get("pid") == os.getpid()


def claim_marker(folder: Path, key: str, description: str, executor: str) -> dict | None:
    """Mark the job ``key`` as running in this process, unless another live driver runs it.

    Returns None once the marker is this process's, else the other driver's marker (its job
    is left to it). The marker is created with an exclusive hard link, so of two drivers
    claiming one job at once exactly one succeeds; a stale marker (its driver ended) is
    replaced."""
    path = folder / RUNNING / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a marker created or removed by another driver meanwhile: look again
        holder = _read_marker(path)
        if _is_mine(holder):
            return None
        if holder is not None and _driver_alive(holder):
            return holder
        if holder is not None:
            path.unlink(missing_ok=True)
        staged = path.with_name(f".{key}.{os.getpid()}.tmp")  # this process's own name: plain write
        staged.write_text(json.dumps(_marker(key, description, executor), indent=2) + "\n", encoding="utf-8")
        try:
            os.link(staged, path)
            return None
        except FileExistsError:
            continue
        finally:
            staged.unlink(missing_ok=True)
    raise RuntimeError(f"could not claim {path}: other processes kept replacing it")


def remove_marker(folder: Path, key: str) -> None:
    """Delete the marker of the job ``key`` if this process wrote it (another driver's stays)."""
    path = folder / RUNNING / f"{key}.json"
    if _is_mine(_read_marker(path)):
        path.unlink(missing_ok=True)


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
        marker = _read_marker(path)
        if marker is not None and _driver_alive(marker):
            markers[marker["key"]] = marker
    return markers


def clear_stale_markers(folder: Path) -> None:
    """Delete the markers whose driver process (on this host) has ended: their jobs were interrupted."""
    for path in (folder / RUNNING).glob("*.json"):
        marker = _read_marker(path)
        if marker is not None and not _driver_alive(marker):
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
