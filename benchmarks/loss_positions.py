"""Benchmark: the SFT loss with logits only at scored positions vs logits at every position.

Prints the ratio of median times of one forward + backward pass (the step-2 workload:
only v trains) over the same CLUTRR batches on the default model, measured in one run,
alternating the two variants so that machine noise hits both alike.

    python benchmarks/loss_positions.py [--batches 6] [--repeats 3]
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import nn

from common import per_step_arguments, step2_workload, timed
from lofit.data.batching import Batch
from lofit.evaluation.scoring import sft_loss


def full_logits_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The naive loss: logits at every position, then pick the scored ones."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return nn.functional.cross_entropy(logits[batch.score_mask].float(), batch.targets)


def main() -> None:
    args = per_step_arguments(__doc__)
    lofit_model, batches = step2_workload(args.batches, args.batch_size)

    def step(loss_fn: Callable[[nn.Module, Batch], torch.Tensor]) -> Callable[[Batch], None]:
        def run(batch: Batch) -> None:
            loss_fn(lofit_model, batch).backward()
            lofit_model.lofit_bias.grad = None

        return run

    variants = {"scored positions only": step(sft_loss), "all positions": step(full_logits_loss)}
    medians = timed(variants, {name: batches for name in variants}, args.repeats, statistics.median, warm_up=1)
    torch.testing.assert_close(
        sft_loss(lofit_model, batches[0]), full_logits_loss(lofit_model, batches[0]), rtol=1e-5, atol=1e-5
    )
    for name, value in medians.items():
        print(f"{name:>22}: median {value * 1000:.0f} ms per forward+backward of {args.batch_size} stories")
    print(
        "speed-up of scoring only the answer positions: "
        f"{medians['all positions'] / medians['scored positions only']:.2f}x"
    )


if __name__ == "__main__":
    main()
