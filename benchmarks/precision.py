"""Benchmark: a step-2 training step under bf16 autocast vs float32, on the default model.

Prints the median time of one forward + backward pass (only v of 27 heads trains; logits
at the answer positions only) over the same CLUTRR batches, both precisions measured in
one run and alternated so that machine noise hits both alike, the ratio, and the largest
relative difference of the two losses.

    python benchmarks/precision.py [--batches 6] [--repeats 3]
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from common import per_step_arguments, step2_workload, timed
from lofit.data.batching import Batch
from lofit.evaluation.scoring import sft_loss


def main() -> None:
    args = per_step_arguments(__doc__)
    lofit_model, batches = step2_workload(args.batches, args.batch_size)
    contexts = {
        "float32": lambda: torch.autocast("cpu", enabled=False),
        "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }

    losses: dict[str, dict[int, float]] = {name: {} for name in contexts}  # each batch's first loss, by batch

    def step(name: str, context: Callable[[], AbstractContextManager]) -> Callable[[Batch], None]:
        def run(batch: Batch) -> None:
            with context():
                loss = sft_loss(lofit_model, batch)
            loss.backward()
            lofit_model.lofit_bias.grad = None
            losses[name].setdefault(id(batch), loss.item())

        return run

    variants = {name: step(name, context) for name, context in contexts.items()}
    medians = timed(variants, {name: batches for name in variants}, args.repeats, statistics.median, warm_up=1)
    for name, value in medians.items():
        print(f"{name:>14}: median {value * 1000:.0f} ms per forward+backward of {args.batch_size} stories")
    print(f"speed-up of bf16 autocast over float32: {medians['float32'] / medians['bf16 autocast']:.2f}x")
    gap = max(
        abs(losses["float32"][id(b)] - losses["bf16 autocast"][id(b)]) / abs(losses["float32"][id(b)]) for b in batches
    )
    print(f"largest relative loss difference: {gap:.2%}")


if __name__ == "__main__":
    main()
