"""Benchmark: the SFT loss with logits only at scored positions vs logits at every position.

Prints the ratio of median times of one forward + backward pass (the step-2 workload:
only v trains) over the same CLUTRR batches on the default model, measured in one run,
alternating the two variants so that machine noise hits both alike.

    python benchmarks/loss_positions.py [--batches 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import lofit
from lofit.batching import Batch, collate, tokenize_pair
from lofit.datafiles import resolve_data_dir
from lofit.scoring import sft_loss
from lofit.tasks import get_task


def full_logits_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The naive loss: logits at every position, then pick the scored ones."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return nn.functional.cross_entropy(logits[batch.score_mask].float(), batch.targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    model, tokenizer = lofit.load_model("default")
    lofit_model = lofit.get_lofit_model(model)
    lofit_model.set_active_heads([(layer, 0) for layer in range(27)])
    lofit_model.train_only("bias")
    pairs = get_task("clutrr").sample_train(resolve_data_dir(None), args.batches * args.batch_size, seed=0)
    tokenized = [tokenize_pair(tokenizer, p.prompt, p.completion) for p in pairs]
    batches = [collate(tokenized[i : i + args.batch_size], tokenizer.pad_token_id) for i in range(0, len(tokenized), args.batch_size)]

    times: dict[str, list[float]] = {"scored positions only": [], "all positions": []}
    variants = {"scored positions only": sft_loss, "all positions": full_logits_loss}
    for batch in batches[:1]:  # warm-up
        for loss_fn in variants.values():
            loss_fn(lofit_model, batch).backward()
    for _ in range(args.repeats):
        for batch in batches:
            for name, loss_fn in variants.items():
                start = time.perf_counter()
                loss = loss_fn(lofit_model, batch)
                loss.backward()
                times[name].append(time.perf_counter() - start)
                lofit_model.lofit_bias.grad = None
    torch.testing.assert_close(sft_loss(lofit_model, batches[0]), full_logits_loss(lofit_model, batches[0]), rtol=1e-5, atol=1e-5)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:>22}: median {value * 1000:.0f} ms per forward+backward of {args.batch_size} stories")
    print(f"speed-up of scoring only the answer positions: {medians['all positions'] / medians['scored positions only']:.2f}x")


if __name__ == "__main__":
    main()
