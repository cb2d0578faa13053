"""Where an experiment's cells run: in the driver's process, in local worker processes, as Ray
tasks, or as Slurm jobs (``lofit experiment --executor local|ray|slurm``).

An executor runs *jobs* (one cell, or one step-1 ranking) through a module-level function
``work(job) -> dict`` (the record of the job) and hands back each job's outcome as it
finishes, in any order. It neither reads nor writes ``results.jsonl``: the driver
(:class:`~lofit.experiments.runner.Runner`) decides what runs when (step-1 rankings before
the cells that need them) and alone appends the records. A job that raises is reported with
its traceback as text (formatted where it ran), so that a failure on a remote machine reads
like a local one.

- :class:`InlineExecutor`: one job at a time in this process (the default; the model loaded
  once per process is lent to every cell).
- :class:`LocalExecutor`: ``workers`` processes on this machine (``--workers N``), each
  loading the model once and keeping it for the cells it runs.
- :class:`RayExecutor`: each job a Ray task with ``cell_cpus`` CPUs and ``cell_gpus`` GPUs, on
  the cluster at ``address`` or on a local Ray started for the run (``pip install lofit[ray]``).
- :class:`SlurmExecutor`: each job a Slurm job through submitit (``pip install lofit[slurm]``);
  ``cluster="local"`` runs them as local processes (submitit's local executor, for tests).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Work = Callable[[Any], dict]
"""Runs one job and returns its record; a module-level function, so that workers import it by name."""
Outcome = tuple[int, dict | None, str | None]
"""A finished job: its id, and its record or the error (a traceback) that stopped it."""
EXECUTORS = ("local", "ray", "slurm")


def call(work: Work, job: Any, threads: int | None = None) -> tuple[dict | None, str | None]:
    """``work(job)`` with torch using ``threads`` threads (when given): (record, None), or
    (None, the traceback) when it raised an Exception (an interruption is not caught)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        return work(job), None
    except Exception:
        return None, traceback.format_exc()


class Executor(ABC):
    """Runs jobs, at most ``capacity`` at once (None: as many as are submitted)."""

    name: str
    capacity: int | None = None

    @abstractmethod
    def submit(self, job_id: int, job: Any) -> None:
        """Start ``job`` (or queue it where the executor schedules)."""

    @abstractmethod
    def wait(self) -> Outcome:
        """Block until a submitted job has finished, and return its outcome."""

    @abstractmethod
    def close(self, cancel: bool = False) -> None:
        """Release the workers; with ``cancel``, stop the jobs still running first."""


class InlineExecutor(Executor):
    """Each job in this process, one after another, when :meth:`wait` asks for it."""

    name = "local"
    capacity = 1

    def __init__(self, work: Work):
        self.work = work
        self.queue: list[tuple[int, Any]] = []

    def submit(self, job_id: int, job: Any) -> None:
        self.queue.append((job_id, job))

    def wait(self) -> Outcome:
        job_id, job = self.queue.pop(0)
        return (job_id, *call(self.work, job))

    def close(self, cancel: bool = False) -> None:
        self.queue.clear()


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class LocalExecutor(Executor):
    """``workers`` processes on this machine (started with ``spawn``: a fresh interpreter,
    not a fork of one holding torch's thread pools), each running one job at a time with
    ``threads`` torch threads (default: this machine's cores shared evenly)."""

    name = "local"

    def __init__(self, work: Work, workers: int, threads: int | None = None):
        if workers < 1:
            raise ValueError(f"--workers must be >= 1; got {workers}")
        self.work, self.capacity = work, workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.pool = self._start()
        self.running: dict[concurrent.futures.Future, int] = {}

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.capacity,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.threads,),
        )

    def submit(self, job_id: int, job: Any) -> None:
        try:
            future = self.pool.submit(call, self.work, job)
        except concurrent.futures.process.BrokenProcessPool:  # a worker died (killed, out of memory): start anew
            self.pool = self._start()
            future = self.pool.submit(call, self.work, job)
        self.running[future] = job_id

    def wait(self) -> Outcome:
        done, _ = concurrent.futures.wait(self.running, return_when=concurrent.futures.FIRST_COMPLETED)
        future = next(iter(done))
        job_id = self.running.pop(future)
        try:
            return (job_id, *future.result())
        except concurrent.futures.process.BrokenProcessPool as error:
            return job_id, None, f"the worker process running this job died: {error}"

    def close(self, cancel: bool = False) -> None:
        # With cancel, a worker in the middle of a cell is stopped: it would otherwise finish it, unrecorded.
        processes = list((self.pool._processes or {}).values()) if cancel else []
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)
        for process in processes:
            process.terminate()


class RayExecutor(Executor):
    """Each job a Ray task needing ``cell_cpus`` CPUs and ``cell_gpus`` GPUs, scheduled by Ray.

    On the cluster at ``address`` (``auto``: the one this machine belongs to), else on the Ray
    already initialised in this process, else on a local Ray started for the run (with
    ``local_cpus`` CPUs: by default all of them) and shut down when the run ends. Ray reuses
    its worker processes, so a worker keeps the model it loaded for its next cells.
    """

    name = "ray"

    def __init__(
        self,
        work: Work,
        address: str | None = None,
        cell_cpus: float = 1,
        cell_gpus: float = 0,
        local_cpus: int | None = None,
        capacity: int | None = None,
    ):
        try:
            import ray  # optional: lofit[ray]
        except ImportError:
            raise ValueError("--executor ray needs Ray, which is not installed: pip install lofit[ray]") from None
        if cell_cpus <= 0 or cell_gpus < 0:
            raise ValueError(f"--cell-cpus must be > 0 and --cell-gpus >= 0; got {cell_cpus} and {cell_gpus}")
        self.ray, self.work, self.capacity = ray, work, capacity
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, num_cpus=None if address else local_cpus, include_dashboard=False)
        self.remote = ray.remote(num_cpus=cell_cpus, num_gpus=cell_gpus)(call)
        self.threads = max(1, int(cell_cpus))
        self.running: dict[Any, int] = {}

    def submit(self, job_id: int, job: Any) -> None:
        self.running[self.remote.remote(self.work, job, self.threads)] = job_id

    def wait(self) -> Outcome:
        [ready], _ = self.ray.wait(list(self.running), num_returns=1)
        job_id = self.running.pop(ready)
        try:
            return (job_id, *self.ray.get(ready))
        except Exception as error:  # the task's worker died (RayTaskError, WorkerCrashedError...)
            return job_id, None, f"{type(error).__name__}: {error}"

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self.running:
                self.ray.cancel(ref, force=True)
        if self.started:
            self.ray.shutdown()


class SlurmExecutor(Executor):
    """Each job a Slurm job submitted through submitit, with ``gpus`` GPUs and ``cpus`` CPUs,
    on ``partition``, for at most ``time_minutes``; submitit's logs and pickles go in
    ``folder``. ``cluster="local"`` runs the jobs as local processes instead (submitit's
    local executor). Every job starts a fresh process, which loads the model for its cell."""

    name = "slurm"

    def __init__(
        self,
        work: Work,
        folder: Path,
        partition: str | None = None,
        time_minutes: int = 240,
        gpus: int = 0,
        cpus: int = 1,
        cluster: str = "slurm",
        capacity: int | None = None,
        poll_seconds: float = 2.0,
    ):
        try:
            import submitit  # optional: lofit[slurm]
        except ImportError:
            raise ValueError(
                "--executor slurm needs submitit, which is not installed: pip install lofit[slurm]"
            ) from None
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise ValueError(
                "--executor slurm: no Slurm here (sbatch is not on the PATH); run the driver where sbatch works"
            )
        if time_minutes < 1 or gpus < 0 or cpus < 1:
            raise ValueError(
                "--slurm-time must be >= 1, --cell-gpus >= 0 and --cell-cpus >= 1; "
                f"got {time_minutes}, {gpus} and {cpus}"
            )
        self.work, self.capacity, self.poll_seconds, self.cpus = work, capacity, poll_seconds, cpus
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        parameters: dict[str, Any] = {"name": "lofit-cell", "timeout_min": time_minutes, "cpus_per_task": cpus}
        if gpus:
            parameters["gpus_per_node"] = gpus
        if partition:
            parameters["slurm_partition"] = partition
        self.executor.update_parameters(**parameters)
        self.running: dict[Any, int] = {}

    def submit(self, job_id: int, job: Any) -> None:
        self.running[self.executor.submit(call, self.work, job, self.cpus)] = job_id

    def wait(self) -> Outcome:
        while True:
            for slurm_job, job_id in list(self.running.items()):
                if slurm_job.done():
                    del self.running[slurm_job]
                    try:
                        return (job_id, *slurm_job.result())
                    except Exception as error:  # the job itself failed: killed, timed out, out of memory
                        return job_id, None, f"Slurm job {slurm_job.job_id}: {type(error).__name__}: {error}"
            time.sleep(self.poll_seconds)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for slurm_job in self.running:
                slurm_job.cancel(check=False)
