"""Benchmark: a step-2 training step under bf16 autocast vs float32, on the default model.

Prints the median time of one forward + backward pass (only v of 27 heads trains; logits
at the answer positions only) over the same CLUTRR batches, both precisions measured in
one run and alternated so that machine noise hits both alike, the ratio, and the largest
relative difference of the two losses.

    python benchmarks/precision.py [--batches 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lofit
from lofit.batching import collate, tokenize_pair
from lofit.datafiles import resolve_data_dir
from lofit.scoring import sft_loss
from lofit.tasks import get_task


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

    contexts = {"float32": lambda: torch.autocast("cpu", enabled=False),
                "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in contexts}
    losses: dict[str, list[float]] = {name: [] for name in contexts}
    for name, context in contexts.items():  # warm-up
        with context():
            sft_loss(lofit_model, batches[0]).backward()
    for repeat in range(args.repeats):
        for batch in batches:
            for name, context in contexts.items():
                start = time.perf_counter()
                with context():
                    loss = sft_loss(lofit_model, batch)
                loss.backward()
                times[name].append(time.perf_counter() - start)
                lofit_model.lofit_bias.grad = None
                if repeat == 0:
                    losses[name].append(loss.item())
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:>14}: median {value * 1000:.0f} ms per forward+backward of {args.batch_size} stories")
    print(f"speed-up of bf16 autocast over float32: {medians['float32'] / medians['bf16 autocast']:.2f}x")
    gap = max(abs(a - b) / abs(a) for a, b in zip(losses["float32"], losses["bf16 autocast"]))
    print(f"largest relative loss difference: {gap:.2%}")


if __name__ == "__main__":
    main()
