"""Benchmark: three ways to score TruthfulQA's choices, measured in one run.

1. naive: one forward pass per (question, choice), the 6-shot primer included each time;
2. batched: all choices of a question in one padded batch, primer included in every row;
3. lofit: batched, with the primer's KV cache computed once and reused.

Prints the time of each on the same questions and the speed-ups relative to the naive loop.

    python benchmarks/multiple_choice_scoring.py [--questions 40]
"""

from __future__ import annotations

import argparse
import time

import torch

import lofit
from lofit.data.batching import collate, tokenize_pair
from lofit.data.files import resolve_data_dir
from lofit.evaluation.multiple_choice import MultipleChoiceExample, choice_logprobs
from lofit.evaluation.scoring import sequence_logprobs
from lofit.tasks.truthfulqa import QA_PRIMER, TruthfulQA


def naive(model, tokenizer, examples) -> list[list[float]]:
    scores = []
    for example in examples:
        row = []
        for choice in example.choices:
            batch = collate(
                [tokenize_pair(tokenizer, QA_PRIMER + example.prompt, choice, add_eos=False)], tokenizer.pad_token_id
            )
            row.append(sequence_logprobs(model, batch).item())
        scores.append(row)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=40)
    args = parser.parse_args()
    model, tokenizer = lofit.load_model("default")
    examples = TruthfulQA(fold=0).eval_examples(resolve_data_dir(None), "test")[: args.questions]
    with_primer = [MultipleChoiceExample(QA_PRIMER + e.prompt, e.choices, e.labels, e.best) for e in examples]
    variants = {
        "naive loop": lambda: naive(model, tokenizer, examples),
        "batched per question": lambda: choice_logprobs(model, tokenizer, with_primer, progress=False),
        "batched + primer cache": lambda: choice_logprobs(model, tokenizer, examples, prefix=QA_PRIMER, progress=False),
    }
    times, results = {}, {}
    with torch.no_grad():
        for name, run in variants.items():
            start = time.perf_counter()
            results[name] = run()
            times[name] = time.perf_counter() - start
    reference = results["naive loop"]
    for name, seconds in times.items():
        drift = max(abs(a - b) for x, y in zip(results[name], reference) for a, b in zip(x, y))
        print(
            f"{name:>24}: {seconds:6.1f} s for {len(examples)} questions, speed-up "
            f"{times['naive loop'] / seconds:.2f}x, "
            f"max |score difference| {drift:.1e}"
        )


if __name__ == "__main__":
    main()
