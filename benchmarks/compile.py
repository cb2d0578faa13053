"""Benchmark: a step-2 training step eager, eager with the frozen-prefix cache, and through torch.compile.

On the default model, only v of 27 heads trains (head 0 of layers 1-27, so layer 0 lies below
the first trained layer, as with LoFiT's CLUTRR heads), under bf16 autocast where the CPU runs
it fast. Prints the CPU's capability, the seconds that compiling took (the first pass over the
batches), the median time of one forward + backward per variant over the same CLUTRR batches
(variants alternated batch by batch so that machine noise hits all alike) and the speed-ups
over eager, and the largest relative difference of the compiled losses from eager's.

    python benchmarks/compile.py [--batches 6] [--repeats 3]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import lofit
from common import clutrr_batches, per_step_arguments, timed
from lofit.data.batching import Batch
from lofit.evaluation.scoring import sft_loss
from lofit.training.loop import bf16_is_fast
from lofit.training.prefix_cache import PrefixCache
from lofit.utils.compute import hardware


def main() -> None:
    args = per_step_arguments(__doc__)
    model, tokenizer = lofit.load_model("default")
    lofit_model = lofit.get_lofit_model(model)
    lofit_model.set_active_heads([(layer, 0) for layer in range(1, 28)])
    lofit_model.train_only("bias")
    lofit_model.eval()
    batches = clutrr_batches(tokenizer, args.batches, args.batch_size)
    device = torch.device("cpu")
    bf16 = bf16_is_fast(device)
    print(f"{hardware(device)}; CPU capability: {torch.backends.cpu.get_cpu_capability()}; bf16 autocast: {bf16}")

    losses: dict[str, dict[int, float]] = {}

    def step(name: str, forward: torch.nn.Module) -> Callable[[Batch], None]:
        losses[name] = {}

        def run(batch: Batch) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = sft_loss(forward, batch)
            loss.backward()
            lofit_model.lofit_bias.grad = None
            losses[name].setdefault(id(batch), loss.item())

        return run

    compiled = step("compiled", torch.compile(lofit_model, dynamic=True))
    start = time.perf_counter()
    for batch in batches:  # the first pass compiles (one graph with dynamic lengths)
        compiled(batch)
    print(f"compiling (first pass over {len(batches)} batches): {time.perf_counter() - start:.0f} s")
    cache = PrefixCache(model, first_trained_layer=1, budget_bytes=2**30)
    eager, cached = step("eager", lofit_model), step("eager + prefix cache", lofit_model)

    def with_cache(batch: Batch) -> None:
        with cache.attached():
            cached(batch)

    variants = {"eager": eager, "eager + prefix cache": with_cache, "compiled": compiled}
    medians = timed(variants, {name: batches for name in variants}, args.repeats, statistics.median)
    for name, value in medians.items():
        speed_up = medians["eager"] / value
        print(
            f"{name:>21}: median {value * 1000:.0f} ms per forward+backward of {args.batch_size} stories"
            f" ({speed_up:.2f}x eager)"
        )
    gap = max(abs(losses["compiled"][i] - losses["eager"][i]) / abs(losses["eager"][i]) for i in losses["eager"])
    print(f"largest relative difference of a compiled loss from eager's: {gap:.2%}")


if __name__ == "__main__":
    main()
