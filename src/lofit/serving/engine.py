"""The engine: a bounded queue of generation jobs and one worker thread that runs them in batches.

Every job is one prompt (token ids) for one adapter, with its own ``max_tokens``, stop strings
and deadline. The worker takes the oldest waiting job and, with it, up to ``max_batch - 1``
more: every waiting job of a mixable kind (any adapter: the table kinds, LoRA, the base model;
see :mod:`lofit.serving.adapters`) when the first is mixable, else the waiting jobs of the same
exclusive adapter. The batch is left-padded and decoded greedily by the model's own
``generate`` (peft's, naming each row's LoRA, while LoRA adapters are loaded) with the arguments of
:func:`lofit.evaluation.generation.greedy_completions` (``do_sample=False``, the tokenizer's
pad and EOS tokens), so a row's tokens are those ``lofit`` generates for that prompt and
adapter alone. A stopping criterion called after every step hands each row its new text
(streaming), and ends the row at EOS, at its ``max_tokens``, at a stop string, when its
deadline passes or when its client is gone; the batch ends when every row has.

Everything that touches the model runs in the worker thread: the batches, and the tasks
queued with :meth:`Engine.call` (loading an adapter), run between two batches. A job's events
reach its caller through ``on_event`` (called in the worker thread); the HTTP layer turns them
into responses.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from lofit.data.batching import left_pad
from lofit.serving.adapters import Adapter, AdapterRegistry, exclusive_model

LOG = logging.getLogger("lofit.serving")


class QueueFullError(RuntimeError):
    """The bounded queue holds as many unfinished jobs as it may."""


class ShuttingDownError(RuntimeError):
    """The engine is finishing its jobs and takes no new ones."""


@dataclass(eq=False)
class Job:
    """One prompt to continue greedily. ``on_event(kind, value)`` receives ``("text", delta)``
    for each new piece of text, then exactly one of ``("done", finish_reason)`` (``"stop"``:
    EOS or a stop string, ``"length"``: ``max_tokens``) or ``("error", (status, message))``."""

    prompt: list[int]
    adapter: Adapter
    max_tokens: int
    stop: tuple[str, ...] = ()
    deadline: float = float("inf")
    on_event: Callable[[str, Any], None] = lambda kind, value: None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finished: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """The client is gone (or gave up): the row stops at the next step and frees its queue place now."""
        self.cancelled = True


class RowControl(StoppingCriteria):
    """Called by ``generate`` after each step: feeds each live row its new token, says which rows are over."""

    def __init__(self, engine: Engine, jobs: list[Job], prompt_width: int):
        self.engine, self.jobs, self.prompt_width = engine, jobs, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        now = time.monotonic()
        last = input_ids[:, -1].tolist()
        for job, token in zip(self.jobs, last):
            if job.finished:
                continue
            if job.cancelled:
                self.engine.finish(job, "cancelled")
            elif now > job.deadline:
                self.engine.fail(job, 504, "the request ran past its timeout")
            elif token == self.engine.eos_token_id:
                self.engine.finish(job, "stop")
            else:
                job.tokens.append(token)
                self.engine.advance(job)
        return torch.tensor([job.finished for job in self.jobs], device=input_ids.device)


@dataclass
class EngineStats:
    """What the worker has run: batches, rows, batches that mixed several adapters (and, by how
    each is served, ``heads``, ``lora``, ``base``...: the mixed batches that held rows of that kind),
    the largest batch, the tokens generated."""

    batches: int = 0
    rows: int = 0
    mixed_batches: int = 0
    mixed_batches_by_kind: dict[str, int] = field(default_factory=dict)
    largest_batch: int = 0
    generated_tokens: int = 0


class Engine:
    """The bounded job queue and its worker (see the module docstring)."""

    def __init__(
        self,
        registry: AdapterRegistry,
        tokenizer: PreTrainedTokenizerBase,
        max_batch: int = 16,
        max_queue: int = 64,
        batch_wait: float = 0.005,
    ):
        self.registry = registry
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.tokenizer_lock = threading.Lock()
        self.stats = EngineStats()
        self._pending: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._tasks: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the callers' side (any thread) ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="lofit-serving-engine", daemon=True)
        self._thread.start()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text``'s token ids, as :func:`~lofit.evaluation.generation.greedy_completions` encodes a prompt."""
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """``messages`` as the tokenizer's chat template writes them, ready for the assistant's answer."""
        with self.tokenizer_lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of ``jobs`` or none: QueueFullError when they would make more than
        ``max_queue`` unfinished, uncancelled jobs queued or running, ShuttingDownError once
        :meth:`close` was called."""
        with self._condition:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down and takes no new requests")
            live = sum(not j.cancelled for j in self._pending) + sum(not j.cancelled for j in self._running)
            if live + len(jobs) > self.max_queue:
                raise QueueFullError(
                    f"the queue is full ({live} of {self.max_queue} requests queued or running); retry later"
                )
            self._pending.extend(jobs)
            self._condition.notify_all()

    def call(self, task: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``task`` in the worker between two batches; its result or exception comes back in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._condition:
            if self._stopping:
                future.set_exception(ShuttingDownError("the server is shutting down"))
                return future
            self._tasks.append((task, future))
            self._condition.notify_all()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish every queued and running one, then stop the worker."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        with self._condition:
            return sum(not j.cancelled for j in self._pending) + sum(not j.cancelled for j in self._running)

    # -- the worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._condition:
                while not (self._pending or self._tasks or self._stopping):
                    self._condition.wait()
                if self._tasks:
                    task, future = self._tasks.popleft()
                elif self._pending:
                    task = None
                else:  # stopping, nothing left
                    for _, future in self._tasks:
                        future.set_exception(ShuttingDownError("the server is shutting down"))
                    return
            if task is not None:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(task())
                    except BaseException as error:  # handed to the caller, which reports it
                        future.set_exception(error)
                continue
            if self.batch_wait and len(self._pending) < self.max_batch:
                time.sleep(self.batch_wait)  # let requests that arrive together share the batch
            with self._condition:
                batch = self._take_batch()
                self._running = batch
            if batch:
                self._run_batch(batch)
            with self._condition:
                self._running = []
            self.registry.collect()

    def _take_batch(self) -> list[Job]:
        """The oldest live job and the waiting jobs that may share its batch (see the module docstring)."""
        for job in [j for j in self._pending if j.cancelled]:
            self._pending.remove(job)
            self.finish(job, "cancelled")
        if not self._pending:
            return []
        first = self._pending[0]
        exclusive = first.adapter.kind == "exclusive"
        batch = [
            job
            for job in self._pending
            if (job.adapter is first.adapter if exclusive else job.adapter.kind != "exclusive")
        ][: self.max_batch]
        for job in batch:
            self._pending.remove(job)
        return batch

    def _run_batch(self, jobs: list[Job]) -> None:
        live = []
        for job in jobs:
            if time.monotonic() > job.deadline:
                self.fail(job, 504, "the request waited in the queue past its timeout")
            else:
                live.append(job)
        if not live:
            return
        input_ids, attention_mask = left_pad([job.prompt for job in live], self.pad_token_id)
        device = self.registry.model.get_input_embeddings().weight.device
        exclusive = live[0].adapter.kind == "exclusive"
        try:
            if exclusive:
                model, remove = exclusive_model(self.registry, live[0].adapter)
                generate = model.generate
            else:
                self.registry.set_rows([job.adapter for job in live])
                generate, remove = self.registry.generate(), lambda: None
            try:
                with torch.no_grad():
                    generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        max_new_tokens=max(job.max_tokens for job in live),
                        do_sample=False,
                        pad_token_id=self.pad_token_id,
                        eos_token_id=self.eos_token_id,
                        stopping_criteria=StoppingCriteriaList([RowControl(self, live, input_ids.shape[1])]),
                    )
            finally:
                self.registry.set_rows(None)
                remove()
        except Exception as error:  # one batch failing must not stop the server: its requests get a 500
            LOG.exception("a batch of %d rows failed", len(live))
            for job in live:
                if not job.finished:
                    self.fail(job, 500, f"generation failed: {type(error).__name__}: {error}")
        for job in live:
            if not job.finished:  # generate stopped on its own (max_new_tokens, EOS)
                self.finish(job, "length")
        self.stats.batches += 1
        self.stats.rows += len(live)
        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        if len({id(job.adapter) for job in live}) > 1:
            self.stats.mixed_batches += 1
            for kind in sorted({job.adapter.kind for job in live}):
                self.stats.mixed_batches_by_kind[kind] = self.stats.mixed_batches_by_kind.get(kind, 0) + 1
        self.stats.generated_tokens += sum(len(job.tokens) for job in live)

    # -- a row's progress (the worker) ---------------------------------------------------------------
    def advance(self, job: Job) -> None:
        """A new token for ``job``: its text so far, a stop string ends it, ``max_tokens`` too;
        the text that can no longer change is sent."""
        with self.tokenizer_lock:
            job.text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        for stop in job.stop:
            at = job.text.find(stop)
            if at >= 0:
                job.text = job.text[:at]
                self.finish(job, "stop")
                return
        if len(job.tokens) >= job.max_tokens:
            self.finish(job, "length")
            return
        # Hold back what a stop string may still cut, and an incomplete UTF-8 character.
        hold = max((len(stop) - 1 for stop in job.stop), default=0)
        ready = len(job.text) - hold
        while ready > job.sent and job.text[ready - 1] == "\ufffd":
            ready -= 1
        self._send(job, ready)

    def _send(self, job: Job, upto: int) -> None:
        if upto > job.sent:
            job.on_event("text", job.text[job.sent : upto])
            job.sent = upto

    def finish(self, job: Job, reason: str) -> None:
        """End ``job`` normally: the rest of its text, then ``("done", reason)``."""
        if job.finished:
            return
        job.finished = True
        if reason != "cancelled":
            self._send(job, len(job.text))
        job.on_event("done", reason)
        self.registry.release(job.adapter)

    def fail(self, job: Job, status: int, message: str) -> None:
        """End ``job`` with an error (HTTP ``status`` and ``message``)."""
        if job.finished:
            return
        job.finished = True
        job.on_event("error", (status, message))
        self.registry.release(job.adapter)
