"""`lofit serve`'s engine on the default model: mixed-adapter batches against one adapter and the base model.

All ratios are measured in this one run, the variants alternated round by round so that the
noise of a shared machine hits them alike. Each round submits one batch of ``--rows`` prompts
at once (one batch of the engine) and decodes ``--tokens`` greedy tokens per row:

- "16 adapters": row i uses adapter i mod 16 (LoFiT adapters on 27 random heads each, with
  random v; the even ones also with a random A, the odd ones with A = 0 as LoFiT's step 2
  leaves it);
- "1 adapter": every row uses the same adapter (one with an A);
- "base": no adapter (the serving hooks stand by).

Tokens per second = generated tokens / wall time of the batch (median over ``--repeats``).
Memory per loaded adapter = bytes of the stacked tables / adapters loaded (after ``--loaded``
adapters), against the adapter's own tensors (its K x head_dim numbers of v, and of A where it
has one, float32: what its file holds). Time to first token:
``--rows`` requests of different adapters submitted together, from submission to each one's
first text (median and max).

    python benchmarks/serving.py [--rows 16] [--tokens 32] [--repeats 3] [--loaded 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

import lofit
from lofit.models.architectures import head_layout
from lofit.serving.adapters import AdapterRegistry
from lofit.serving.engine import Engine, Job

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "Question: what is two plus three? Answer:",
    "List three colours:",
    "My favourite book is",
    "Translate 'good morning' into Spanish:",
    "The opposite of hot is",
    "A recipe for pancakes starts with",
]


def save_adapters(model, folder: Path, count: int, heads: int = 27) -> list[Path]:
    """``count`` LoFiT adapters with random v (std 0.05), and A for the even ones, on ``heads`` random heads each."""
    paths = []
    for index in range(count):
        wrapped = lofit.get_lofit_model(model)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            if index % 2 == 0:
                wrapped.lofit_scale.copy_(torch.randn(wrapped.lofit_scale.shape, generator=generator) * 0.05)
            wrapped.lofit_bias.copy_(torch.randn(wrapped.lofit_bias.shape, generator=generator) * 0.05)
        layers, per_layer = wrapped.layout.num_layers, wrapped.layout.num_heads
        chosen = torch.randperm(layers * per_layer, generator=generator)[:heads]
        wrapped.set_active_heads([divmod(int(i), per_layer) for i in chosen])
        wrapped.save_pretrained(folder / f"a{index:03d}")
        wrapped.unload()
        paths.append(folder / f"a{index:03d}")
    return paths


def run_batch(engine: Engine, prompts: list[list[int]], adapters: list[str], tokens: int) -> tuple[float, int, list]:
    """Submit one job per prompt together; (seconds to the last token, tokens generated, first-token delays)."""
    done = threading.Semaphore(0)
    first: list[float | None] = [None] * len(prompts)
    start = time.perf_counter()
    jobs = []
    for index, (prompt, name) in enumerate(zip(prompts, adapters)):

        def on_event(kind: str, value: object, index: int = index) -> None:
            if kind == "text" and first[index] is None:
                first[index] = time.perf_counter() - start
            if kind in ("done", "error"):
                done.release()

        jobs.append(Job(prompt, engine.registry.resolve(name), tokens, on_event=on_event))
    engine.submit(jobs)
    for _ in jobs:
        done.acquire()
    seconds = time.perf_counter() - start
    return seconds, sum(len(job.tokens) for job in jobs), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loaded", type=int, default=64, help="adapters loaded for the memory row")
    args = parser.parse_args()

    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch threads: {torch.get_num_threads()}")
    model, tokenizer = lofit.load_model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        paths = save_adapters(model, Path(folder), max(16, args.loaded))
        registry = AdapterRegistry(model, Path(folder))
        started = time.perf_counter()
        for path in paths:
            registry.add(path.name, path, path.name)
        load_seconds = (time.perf_counter() - started) / len(paths)
    engine = Engine(registry, tokenizer, max_batch=args.rows, max_queue=4 * args.rows, batch_wait=0)
    engine.start()
    names = [p.name for p in paths[:16]]
    prompts = [engine.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.rows)]
    variants = {
        "16 adapters": [names[i % 16] for i in range(args.rows)],
        "1 adapter": [names[0]] * args.rows,
        "base": ["base"] * args.rows,
    }
    run_batch(engine, prompts, variants["16 adapters"], 4)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in variants}
    first_tokens: list[float] = []
    for _ in range(args.repeats):
        for name, adapters in variants.items():
            seconds, generated, first = run_batch(engine, prompts, adapters, args.tokens)
            rates[name].append(generated / seconds)
            if name == "16 adapters":
                first_tokens += [f for f in first if f is not None]
    engine.close()
    rate = {name: statistics.median(values) for name, values in rates.items()}
    loaded = registry.names()
    per_adapter = registry.loaded_bytes() / len(loaded)
    own = sum(adapter.nbytes for adapter in loaded) / len(loaded)
    dense = 2 * 4 * torch.Size(head_layout(model).shape).numel()  # A and v over every head, float32
    print(f"\n{args.rows} rows x {args.tokens} greedy tokens, median of {args.repeats} rounds ({args.model})\n")
    print("| measure | value | ratio |")
    print("|---|---|---|")
    print(f"| tokens/s, one batch mixing 16 adapters | {rate['16 adapters']:.1f} | 1.00 |")
    print(
        f"| tokens/s, the same batch with 1 adapter | {rate['1 adapter']:.1f} | "
        f"mixed / 1 adapter = {rate['16 adapters'] / rate['1 adapter']:.2f} (goal >= 0.9) |"
    )
    print(
        f"| tokens/s, base model, no adapter | {rate['base']:.1f} | "
        f"mixed / base = {rate['16 adapters'] / rate['base']:.2f} |"
    )
    print(
        f"| memory per loaded adapter ({len(loaded)} loaded) | {per_adapter / 1024:.1f} KiB | "
        f"{per_adapter / own:.2f} x its own tensors ({own / 1024:.1f} KiB on average; goal <= 2); "
        f"dense A and v over all heads would be {dense / 1024:.1f} KiB |"
    )
    print(
        f"| time to first token, {args.rows} concurrent requests of 16 adapters | "
        f"median {statistics.median(first_tokens) * 1000:.0f} ms, max {max(first_tokens) * 1000:.0f} ms | |"
    )
    print(f"| time to load one adapter | {load_seconds * 1000:.1f} ms | |")


if __name__ == "__main__":
    main()
