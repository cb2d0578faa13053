"""Training steps at the scale of the paper: a Llama-2-7B-shaped model on one GPU.

The model is built from Llama-2-7B's configuration with random weights in bfloat16 (no
download: the arithmetic and memory of a step do not depend on the weights' values). One
DPO batch of the paper's size (8 preference pairs: 16 sequences of 200 tokens, a
180-token prompt and a 20-token answer each) is trained on, unchanged, by

- LoFiT step 1: the scales A of all 1,024 heads, with the L1 penalty;
- LoFiT step 2: the biases v of 32 heads (the paper's 3%), drawn at random with seed 0
  (the frozen-prefix cache then skips the layers below the lowest of them);
- LoRA, rank 8 on the query and value projections (peft),

each without and with ``--gradient-checkpointing``. Printed per run: the median seconds
per optimiser step after a warm-up step, tokens per second, the model FLOPs per second and
their share of the card's dense bf16 peak (MFU), and the peak GPU memory (weights
included). Model FLOPs per step, for the L layers a step runs (32, or those above the
lowest tuned head), with P parameters per layer, d = 4096, B x T = 16 x 200 tokens and
S = 320 scored positions: 2 P L B T forward + 2 P L B T for the input gradients (the
weights are frozen) + 12 L B T^2 d for attention forward and backward + 4 V d S for the
LM head at the scored positions. Recomputation under gradient checkpointing is not
counted, as MFU does not.

Usage (on a CUDA machine; `make gpu-check` runs it)::

    python benchmarks/llama7b_step.py
    python benchmarks/llama7b_step.py --device cpu --layers 2 --hidden 64 --heads 4 --intermediate 128 --vocab 256
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lofit import LofitConfig, get_lofit_model
from lofit.data.batching import TokenizedPair
from lofit.methods.lofit.steps import select_heads, tune_biases
from lofit.training.loop import TrainingRun, TrainingSetup, train
from lofit.training.objectives import DPO
from lofit.utils.compute import ComputeConfig

PEAK_BF16_TFLOPS = {
    "H200": 989,
    "H100 PCIe": 756,
    "H100 NVL": 835,
    "H100": 989,
    "GH200": 989,
    "A100": 312,
    "L40S": 362,
    "L4": 121,
    "A10": 125,
    "RTX 4090": 165,
}
"""Dense bf16 tensor-core peaks (TFLOP/s, vendor figures) by a part of the card's name; first match wins."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per batch (two sequences each)")
    parser.add_argument("--prompt-tokens", type=int, default=180)
    parser.add_argument("--answer-tokens", type=int, default=20)
    parser.add_argument("--tuned-heads", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run, after one warm-up step")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: from its name)")
    return parser.parse_args()


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A Llama with Llama-2-7B's shape (or the one asked for), random weights, bf16, on the device."""
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def preference_pairs(args: argparse.Namespace) -> list[tuple[TokenizedPair, TokenizedPair]]:
    """Random token ids in the batch's shape: each pair shares its prompt, its answers differ."""
    generator = torch.Generator().manual_seed(0)

    def tokens(count: int) -> list[int]:
        return torch.randint(3, args.vocab, (count,), generator=generator).tolist()

    pairs = []
    for _ in range(args.pairs):
        prompt = tokens(args.prompt_tokens)
        chosen, rejected = tokens(args.answer_tokens), tokens(args.answer_tokens)
        pairs.append((TokenizedPair(prompt, chosen), TokenizedPair(prompt, rejected)))
    return pairs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(objective: DPO, device: torch.device, fit: Callable[[], None]) -> list[float]:
    """Seconds of each optimiser step of ``fit`` (one loss evaluation per step), timed from the
    start of one step's forward pass to the next's, the last to the end of ``fit``."""
    stamps: list[float] = []
    loss_sum = objective.loss_sum

    def timed_loss_sum(model, batch):
        synchronize(device)
        stamps.append(time.perf_counter())
        return loss_sum(model, batch)

    objective.loss_sum = timed_loss_sum
    try:
        fit()
        synchronize(device)
        stamps.append(time.perf_counter())
    finally:
        objective.loss_sum = loss_sum
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])]


def model_flops(model: torch.nn.Module, args: argparse.Namespace, layers_run: int) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    sequences, length = 2 * args.pairs, args.prompt_tokens + args.answer_tokens
    tokens, scored = sequences * length, sequences * args.answer_tokens
    return (
        4 * per_layer * layers_run * tokens
        + 12 * layers_run * sequences * length**2 * args.hidden
        + 4 * args.vocab * args.hidden * scored
    )


def peak_flops(args: argparse.Namespace, device: torch.device) -> tuple[str, float | None]:
    """The card's name and its dense bf16 peak in FLOP/s (None when unknown)."""
    if device.type != "cuda":
        return device.type, args.peak_tflops and args.peak_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    tflops = args.peak_tflops or next((peak for part, peak in PEAK_BF16_TFLOPS.items() if part in name), None)
    return name, tflops and tflops * 1e12


def measure(
    name: str,
    checkpointing: bool,
    device: torch.device,
    fit: Callable[[TrainingSetup], None],
    objective: DPO,
    flops: float,
    peak: float | None,
    args: argparse.Namespace,
) -> None:
    """Run ``fit`` under the setup and print one row of the table."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    setup = TrainingSetup(ComputeConfig(gradient_checkpointing=checkpointing))
    seconds = statistics.median(step_seconds(objective, device, lambda: fit(setup))[1:])
    tokens = 2 * args.pairs * (args.prompt_tokens + args.answer_tokens)
    memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:6.1f} GiB" if device.type == "cuda" else "    n/a"
    mfu = f"{100 * flops / seconds / peak:5.1f}%" if peak else "  n/a"
    print(
        f"{name:34s} {'yes' if checkpointing else 'no ':3s}  {seconds:7.3f}  {tokens / seconds:9,.0f}  "
        f"{flops / seconds / 1e12:7.1f}  {mfu}  {memory}",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message="step 1 did not localize")  # random weights localize nothing
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()
    model = build_model(args)
    card, peak = peak_flops(args, device)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"card: {card}; dense bf16 peak: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (give --peak-tflops)'}")
    print(
        f"model: Llama, {args.layers} layers x {args.heads} heads, hidden {args.hidden}: {parameters / 1e9:.2f}e9 "
        f"parameters, bf16, random weights (built in {time.perf_counter() - started:.0f} s)"
    )
    print(
        f"batch: {args.pairs} DPO pairs = {2 * args.pairs} sequences of {args.prompt_tokens + args.answer_tokens} "
        f"tokens, {args.answer_tokens} scored each; {args.steps} timed steps after one warm-up step, median"
    )
    columns = f"{'s/step':>7s}  {'tokens/s':>9s}  {'TFLOP/s':>7s}  {'MFU':>6s}  {'peak memory':>10s}"
    print(f"\n{'run':34s} {'gc':3s}  {columns}")

    epochs = args.steps + 1  # one step per epoch: the batch is the whole training set
    config = LofitConfig(num_heads=args.tuned_heads, select_epochs=epochs, tune_epochs=epochs, batch_size=args.pairs)
    lofit_model = get_lofit_model(model, config)
    objective = DPO.with_reference(lofit_model, preference_pairs(args), pad_id=0)
    generator = torch.Generator().manual_seed(0)
    all_heads = [(layer, head) for layer in range(args.layers) for head in range(args.heads)]
    drawn = torch.randperm(len(all_heads), generator=generator)[: args.tuned_heads].tolist()
    tuned = sorted(all_heads[i] for i in drawn)
    lowest = tuned[0][0]
    for checkpointing in (False, True):
        measure(
            f"LoFiT step 1 ({len(all_heads)} heads)",
            checkpointing,
            device,
            lambda setup: select_heads(lofit_model, objective, progress=False, setup=setup),
            objective,
            model_flops(model, args, args.layers),
            peak,
            args,
        )
        measure(
            f"LoFiT step 2 ({len(tuned)} heads, layers {lowest}+)",
            checkpointing,
            device,
            lambda setup: tune_biases(lofit_model, objective, tuned, progress=False, setup=setup),
            objective,
            model_flops(model, args, args.layers - lowest),
            peak,
            args,
        )
    base = lofit_model.unload()

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    objective = DPO.with_reference(lora, preference_pairs(args), pad_id=0)
    trained = [p for p in lora.parameters() if p.requires_grad]
    for checkpointing in (False, True):
        measure(
            "LoRA r 8 (q, v)",
            checkpointing,
            device,
            lambda setup: train(
                lora,
                objective,
                TrainingRun(
                    parameters=trained,
                    lr=1e-4,
                    epochs=epochs,
                    batch_size=args.pairs,
                    seed=0,
                    progress=False,
                    stage="lora",
                    setup=setup,
                ),
            ),
            objective,
            model_flops(model, args, args.layers),
            peak,
            args,
        )
    print(f"\ntotal: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
