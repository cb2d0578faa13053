"""`make bench`: lofit's speed on the default model (SmolLM2-135M, CLUTRR, TruthfulQA), as a table of ratios.

Every ratio compares two things measured in this one run, alternated batch by batch where
they are per-step timings, so that the noise of a shared machine hits both alike.

Definitions:
- "plain forward+backward": one step as a naive loop does it: a random batch of 8 stories,
  float32, logits at every position, loss on the answer tokens, gradient back to the
  input embeddings (through every layer; the weights frozen, so no weight gradients);
- "frozen forward+backward": the same, with logits only at the answer positions;
- "LoFiT step-2 step": lofit's defaults (length-grouped batches, the frozen-prefix cache
  warmed by one pass, the default precision), training v of the heads named in the row.

    python benchmarks/speed.py [--batches 12] [--skip-fit] [--skip-truthfulqa | --only-truthfulqa]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import lofit
from common import timed
from lofit.data.batching import Batch, collate, tokenize_pair
from lofit.data.files import resolve_data_dir
from lofit.evaluation.multiple_choice import choice_logprobs
from lofit.evaluation.scoring import completion_token_logprobs
from lofit.methods import FitContext, get_method
from lofit.tasks import get_task
from lofit.tasks.truthfulqa import QA_PRIMER, TruthfulQA
from lofit.training.loop import epoch_batches, make_accelerator
from lofit.training.prefix_cache import PrefixCache
from lofit.utils.compute import ComputeConfig

TRUTHFULQA_SECONDS_BEFORE = 169.0
"""TruthfulQA fold 0 scoring before this work (issue 9's measurement on this machine kind)."""


def plain_step(model: nn.Module, batch: Batch) -> None:
    """Full logits, loss on the answer tokens, gradient to the input embeddings."""
    embeddings = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings, attention_mask=batch.attention_mask, use_cache=False).logits
    nn.functional.cross_entropy(logits[batch.score_mask].float(), batch.targets).backward()


def frozen_step(model: nn.Module, batch: Batch) -> None:
    """Logits at the answer positions only, gradient to the input embeddings."""
    embeddings = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
    outputs = model(
        inputs_embeds=embeddings, attention_mask=batch.attention_mask, logits_to_keep=batch.score_mask, use_cache=False
    )
    nn.functional.cross_entropy(outputs.logits.float(), batch.targets).backward()


def adapter_step(model: nn.Module, batch: Batch, parameters: list[nn.Parameter], autocast) -> None:
    with autocast():
        loss = -completion_token_logprobs(model, batch).mean()
    loss.backward()
    for parameter in parameters:
        parameter.grad = None


def truthfulqa_row(model: nn.Module, tokenizer, data, autocast) -> tuple[str, str, str]:
    """F: TruthfulQA fold 0 scoring, packed (the default) and each question on its own."""
    truthfulqa = TruthfulQA(fold=0)
    questions = truthfulqa.eval_examples(data, "test")
    seconds = {}
    for name, options in (("packed", {}), ("unpacked", {"pack_tokens": 0})):  # packed: lofit's default
        start = time.perf_counter()
        with autocast():
            choice_logprobs(model, tokenizer, questions, prefix=QA_PRIMER, progress=False, **options)
        seconds[name] = time.perf_counter() - start
    measured = (
        f"{seconds['packed']:.0f} s; {seconds['unpacked'] / seconds['packed']:.2f}x faster than each question "
        f"on its own ({seconds['unpacked']:.0f} s); {TRUTHFULQA_SECONDS_BEFORE:.0f} s before this work"
    )
    return (f"F. TruthfulQA fold 0 scoring ({len(questions)} questions)", measured, "<= 90 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12, help="batches of 8 stories in the per-step measurements")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-fit", action="store_true", help="skip the full `lofit run` fit (row G)")
    parser.add_argument("--skip-truthfulqa", action="store_true")
    parser.add_argument("--only-truthfulqa", action="store_true", help="row F alone (about 6 minutes)")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    compute = ComputeConfig()
    model, tokenizer = lofit.load_model("default")
    model.requires_grad_(False)  # every step below is a frozen model's: no weight gradients
    data = resolve_data_dir(None)
    accelerator = make_accelerator(compute.mixed_precision, torch.device("cpu"))
    autocast = accelerator.autocast
    if args.only_truthfulqa:
        return print_table([truthfulqa_row(model, tokenizer, data, autocast)], accelerator.mixed_precision)
    task = get_task("clutrr")

    # G: the whole fit of `lofit run --task clutrr` (defaults) against 228 plain steps.
    stories = task.sample_train(data, 300, seed=42)
    tokenized = [tokenize_pair(tokenizer, s.prompt, s.completion) for s in stories]
    random_batches = [collate(tokenized[i : i + 8], tokenizer.pad_token_id) for i in range(0, args.batches * 8, 8)]
    plain = timed({"plain": lambda b: plain_step(model, b)}, {"plain": random_batches[:6]}, 1)["plain"]
    heads = [(layer, head) for layer in range(15, 30) for head in range(2)][:27]
    if not args.skip_fit:
        start = time.perf_counter()
        result = get_method("lofit").fit(
            FitContext(model=model, tokenizer=tokenizer, examples=stories, lofit=lofit.LofitConfig(), progress=False)
        )
        fit_seconds = time.perf_counter() - start
        rows.append(
            (
                "G. `lofit run --task clutrr` fit vs 228 plain forward+backward steps",
                f"{fit_seconds:.0f} s vs {228 * plain:.0f} s = {fit_seconds / (228 * plain):.2f}x",
                "<= 0.4x",
            )
        )
        heads = result.model.selected_heads
        result.model.remove_hooks()

    # A-D: per-step costs on the same stories.
    lengths = [len(p.prompt_ids) + len(p.completion_ids) for p in tokenized[: args.batches * 8]]
    grouped = [
        collate([tokenized[i] for i in batch], tokenizer.pad_token_id)
        for batch in epoch_batches(len(lengths), lengths, 8, 1, seed=0)[0]
    ]
    lofit_model = lofit.get_lofit_model(model)
    lofit_model.set_active_heads(heads)
    lofit_model.train_only("bias")
    cache = PrefixCache(model, min(layer for layer, _ in heads), 2**30)
    with cache.attached():
        step2 = timed(
            {
                "ours": lambda b: adapter_step(lofit_model, b, [lofit_model.lofit_bias], autocast),
                "frozen": lambda b: frozen_step(lofit_model, b),
            },
            {"ours": grouped, "frozen": random_batches},
            args.repeats,
        )
    rows.append(
        (
            f"A. LoFiT step-2 step ({len(heads)} heads, lowest layer {min(layer for layer, _ in heads)}) vs frozen "
            "forward+backward",
            f"{step2['ours'] * 1000:.0f} ms vs {step2['frozen'] * 1000:.0f} ms = "
            f"{step2['ours'] / step2['frozen']:.2f}x",
            "<= 0.7x",
        )
    )

    upper_heads = [(layer, head) for layer in range(15, 30) for head in range(2)][:27]
    lofit_model.set_active_heads(upper_heads)
    with PrefixCache(model, 15, 2**30).attached() as cached:
        with_cache = timed(
            {"cache": lambda b: adapter_step(lofit_model, b, [lofit_model.lofit_bias], autocast)},
            {"cache": grouped},
            args.repeats,
        )["cache"]
        assert cached.skipped_passes > 0
    without_cache = timed(
        {"plain": lambda b: adapter_step(lofit_model, b, [lofit_model.lofit_bias], autocast)},
        {"plain": grouped},
        args.repeats,
    )["plain"]
    rows.append(
        (
            "C. step 2 with the prefix cache vs without (27 heads in layers 15-29 of 30)",
            f"{with_cache * 1000:.0f} ms vs {without_cache * 1000:.0f} ms = {without_cache / with_cache:.2f}x faster",
            ">= 1.6x",
        )
    )
    epoch = timed(
        {
            "grouped": lambda b: adapter_step(lofit_model, b, [lofit_model.lofit_bias], autocast),
            "random": lambda b: adapter_step(lofit_model, b, [lofit_model.lofit_bias], autocast),
        },
        {"grouped": grouped, "random": random_batches},
        1,
    )
    rows.append(
        (
            f"D. an epoch of {args.batches * 8} stories, length-grouped vs random batches (no cache)",
            (
                f"{epoch['grouped'] * len(grouped):.1f} s vs {epoch['random'] * len(random_batches):.1f} s = "
                f"{epoch['random'] / epoch['grouped']:.2f}x faster"
            ),
            "reported",
        )
    )
    lofit_model.set_active_heads(heads)
    lofit_model.remove_hooks()

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    lora_parameters = [p for p in lora.parameters() if p.requires_grad]
    lora_step = timed(
        {"lora": lambda b: adapter_step(lora, b, lora_parameters, autocast)}, {"lora": grouped}, args.repeats
    )["lora"]
    rows.append(
        (
            "B. LoFiT step-2 step vs LoRA (r 8, q and v) step, same batches",
            f"{step2['ours'] * 1000:.0f} ms vs {lora_step * 1000:.0f} ms = {lora_step / step2['ours']:.2f}x faster",
            ">= 1.5x",
        )
    )
    model = lora.unload()

    # E: a merged adapter costs nothing at inference.
    merged_model, _ = lofit.load_model("default")
    adapter = lofit.get_lofit_model(merged_model)
    adapter.set_active_heads(heads)
    with torch.no_grad():
        adapter.lofit_bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    merged = adapter.merge_and_unload()
    with torch.no_grad():
        inference = timed(
            {
                "merged": lambda b: merged(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False),
                "base": lambda b: model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False),
            },
            {"merged": random_batches, "base": random_batches},
            args.repeats,
        )
    rows.append(
        (
            "E. merged model inference vs the base model",
            f"{inference['merged'] / inference['base']:.2f}x",
            "1.00x (within 3%)",
        )
    )

    if not args.skip_truthfulqa:
        rows.append(truthfulqa_row(model, tokenizer, data, autocast))

    print_table(rows, accelerator.mixed_precision)


def print_table(rows: list[tuple[str, str, str]], mixed_precision: str) -> None:
    print(f"\nprecision: {mixed_precision} (the default); plain/frozen steps in float32\n")
    print("| measure | measured in this run | goal |\n|---|---|---|")
    for measure, value, goal in sorted(rows):
        print(f"| {measure} | {value} | {goal} |")


if __name__ == "__main__":
    main()
