"""Benchmark: loading the default model from its GGUF file against loading lofit's conversion of it.

``load_model("default")`` de-quantises the GGUF file once into a checkpoint folder in the cache
(``lofit.models.loading.gguf_conversion``) and reads that folder from then on. This prints the
seconds of each way (model and tokenizer, float32 on the CPU; the conversion's time includes
hashing the GGUF file, which finds its folder), alternated, the ratio, and whether
both give the same weights and the same tokens for a CLUTRR story.

    python benchmarks/model_loading.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lofit.models import loading
from lofit.utils.compute import hardware


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"{hardware(torch.device('cpu'))}; CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    path = loading.default_model_file()
    start = time.perf_counter()
    folder = loading.gguf_conversion(path)  # converts on the first run on this machine only
    print(f"conversion in {folder}: ready in {time.perf_counter() - start:.1f} s (0 s once it exists)")

    def load_conversion() -> tuple:
        loading._content_digest.cache_clear()  # a fresh process hashes the file first: count that too
        return loading.load_model("default", dtype="float32")

    ways = {
        "GGUF file": lambda: loading._load_gguf_file(path, {"dtype": torch.float32}),
        "conversion": load_conversion,
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    loaded = {}
    for _ in range(args.repeats):
        for name, load in ways.items():
            start = time.perf_counter()
            loaded[name] = load()
            seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        print(f"{name:>11}: median {statistics.median(values):.2f} s per load ({args.repeats} loads)")
    ratio = statistics.median(seconds["GGUF file"]) / statistics.median(seconds["conversion"])
    print(f"speed-up of loading the conversion: {ratio:.1f}x")
    (direct, direct_tokenizer), (converted, tokenizer) = loaded["GGUF file"], loaded["conversion"]
    ours, theirs = direct.state_dict(), converted.state_dict()
    same = ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    story = "[Alice] took her son [Bob] to the park. Who is Alice to Bob?"
    print(f"same weights: {same}; same tokens: {direct_tokenizer(story).input_ids == tokenizer(story).input_ids}")


if __name__ == "__main__":
    main()
