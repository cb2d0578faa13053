"""Check lofit's TruthfulQA MC1/MC2 against lm-evaluation-harness scoring the same prompts and answers.

lm-eval is not a dependency of lofit; install it beside lofit to run this check:

    pip install lm-eval
    python scripts/compare_truthfulqa_with_lm_eval.py --limit 100

The harness scores each (context, continuation) request with its own HFLM wrapper around
the same model object; MC1 is its ``truthfulqa_mc1`` rule (argmax over [best] + incorrect
== 0) and MC2 its own ``process_results_mc2`` function. The script prints the largest
per-question differences and both averages.
"""

from __future__ import annotations

import argparse

import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks.truthfulqa.utils import process_results_mc2

import lofit
from lofit.data.files import resolve_data_dir
from lofit.tasks.truthfulqa import QA_PRIMER, TruthfulQA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    model, tokenizer = lofit.load_model(args.model)
    task = TruthfulQA(fold=args.fold)
    examples = task.eval_examples(resolve_data_dir(args.data_dir), "test")[: args.limit]
    ours = task.evaluate(model, tokenizer, examples, progress=False).records

    requests, spans = [], []
    for example in examples:
        context = QA_PRIMER + example.prompt
        incorrect = [c for c, label in zip(example.choices, example.labels) if label == 0]
        mc1_choices = [example.choices[example.best], *incorrect]
        start = len(requests)
        for choice in mc1_choices + list(example.choices):
            requests.append(Instance("loglikelihood", doc={}, arguments=(context, choice), idx=len(requests) - start))
        spans.append((start, len(mc1_choices), len(example.choices)))
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    results = harness.loglikelihood(requests)

    mc1_diff, mc2_diff, harness_mc1, harness_mc2 = [], [], [], []
    for example, record, (start, n_mc1, n_all) in zip(examples, ours, spans):
        mc1_lls = [ll for ll, _ in results[start : start + n_mc1]]
        mc2_results = results[start + n_mc1 : start + n_mc1 + n_all]
        h_mc1 = float(np.argmax(mc1_lls) == 0)
        h_mc2 = float(process_results_mc2({"mc2_targets": {"labels": list(example.labels)}}, mc2_results)["acc"])
        harness_mc1.append(h_mc1)
        harness_mc2.append(h_mc2)
        mc1_diff.append(abs(h_mc1 - record["mc1"]))
        mc2_diff.append(abs(h_mc2 - record["mc2"]))
    n = len(examples)
    print(f"{n} questions of fold {args.fold}, model {args.model}")
    print(
        f"MC1: lofit {100 * sum(r['mc1'] for r in ours) / n:.2f}%  lm-eval {100 * sum(harness_mc1) / n:.2f}%  "
        f"questions that differ: {sum(d > 0 for d in mc1_diff)}"
    )
    print(
        f"MC2: lofit {100 * sum(r['mc2'] for r in ours) / n:.2f}%  lm-eval {100 * sum(harness_mc2) / n:.2f}%  "
        f"largest per-question difference: {max(mc2_diff):.2e}"
    )


if __name__ == "__main__":
    main()
