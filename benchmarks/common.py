"""What the benchmarks share: the default model's CLUTRR batches and alternated step timings.

Every benchmark compares variants measured in one run; `timed` alternates them batch by
batch so that the noise of a shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

import lofit
from lofit.data.batching import Batch, collate, tokenize_pair
from lofit.data.files import resolve_data_dir
from lofit.tasks import get_task


def clutrr_batches(tokenizer: PreTrainedTokenizerBase, count: int, batch_size: int = 8, seed: int = 0) -> list[Batch]:
    """``count`` right-padded batches of CLUTRR training stories, in sampled order."""
    stories = get_task("clutrr").sample_train(resolve_data_dir(None), count * batch_size, seed=seed)
    tokenized = [tokenize_pair(tokenizer, s.prompt, s.completion) for s in stories]
    return [
        collate(tokenized[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(tokenized), batch_size)
    ]


def timed(
    variants: dict[str, Callable[[Batch], object]],
    batches: dict[str, list[Batch]],
    repeats: int,
    statistic: Callable[[list[float]], float] = statistics.mean,
    warm_up: int | None = None,
) -> dict[str, float]:
    """Seconds per step of each variant over its batches (``statistic`` of the steps), variants alternated step by step.

    Each variant first runs ``warm_up`` of its batches untimed (all of them by default, which
    also fills prefix caches).
    """
    for name, step in variants.items():
        for batch in batches[name][:warm_up]:
            step(batch)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for index in range(min(len(b) for b in batches.values())):
            for name, step in variants.items():
                start = time.perf_counter()
                step(batches[name][index])
                times[name].append(time.perf_counter() - start)
    return {name: statistic(values) for name, values in times.items()}


def per_step_arguments(doc: str) -> argparse.Namespace:
    """The options of a per-step benchmark: how many batches, of what size, timed how often."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    return parser.parse_args()


def step2_workload(batches: int, batch_size: int) -> tuple[lofit.LofitModel, list[Batch]]:
    """Step 2's workload on the default model: only v of 27 heads (head 0 of layers 0-26) trains."""
    model, tokenizer = lofit.load_model("default")
    lofit_model = lofit.get_lofit_model(model)
    lofit_model.set_active_heads([(layer, 0) for layer in range(27)])
    lofit_model.train_only("bias")
    return lofit_model, clutrr_batches(tokenizer, batches, batch_size)
