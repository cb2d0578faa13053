"""Tiny randomly initialised models of every supported architecture, built from configs."""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from lofit.data.batching import TokenizedPair
from lofit.methods import METHODS


def pytest_report_header(config) -> list[str]:
    """The machine the suite runs on, printed first: a failure or a slow run on another machine
    (CPUs, memory and disks differ between them) can then be read against it. What a platform
    does not tell (no /proc, no CPU affinity, no rlimits) is printed as ``?``."""
    try:
        cpuinfo = _read_lines("/proc/cpuinfo")
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
        memory = {line.split(":")[0]: int(line.split()[1]) // 1024 for line in _read_lines("/proc/meminfo")}
        folders = [folder for folder in (tempfile.gettempdir(), "/dev/shm", ".") if os.path.isdir(folder)]
        free = ", ".join(f"{folder} {shutil.disk_usage(folder).free // 2**20}" for folder in folders)
        affinity = getattr(os, "sched_getaffinity", None)
        usable = len(affinity(0)) if affinity else "?"
        try:
            import resource

            open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except ImportError:  # not on Windows
            open_files = "?"
        return [
            f"machine: {cpu}; torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{usable} usable cores of {os.cpu_count()}, torch threads {torch.get_num_threads()}",
            f"memory: {memory.get('MemTotal', '?')} MiB, {memory.get('MemAvailable', '?')} MiB available; "
            f"open files at most {open_files}; free MiB: {free}",
        ]
    except Exception as error:  # the header must never stop the suite
        return [f"machine: not read ({error!r})"]


_terminal: list = []  # pytest's terminal reporter, once the session starts


def pytest_sessionstart(session) -> None:
    _terminal[:] = [session.config.pluginmanager.getplugin("terminalreporter")]


def pytest_runtest_logreport(report) -> None:
    """A failure's traceback printed when it happens, not only in the summary at the end: where a
    run is cut off before its summary (a hang in native code that no alarm interrupts), the
    failures before it still show their causes."""
    if report.failed and _terminal and _terminal[0] is not None:
        _terminal[0].write_line("")
        _terminal[0].write_sep("_", f"{report.nodeid} failed ({report.when}); the traceback:")
        _terminal[0].write_line(report.longreprtext)


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def pytest_collection_modifyitems(config, items) -> None:
    """Skip the tests marked ``cuda`` where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def float32_unless_asked(monkeypatch):
    """Pin float32 autocast (accelerate launch's variable, which the default ``auto`` defers to):
    tests that compare two trainings to 1e-5 must not run in bf16 on CPUs that support it.
    Tests of the default delete the variable."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")


@pytest.fixture(autouse=True)
def signal_handlers_left_as_found():
    """Every test leaves the SIGTERM and SIGINT handlers as it found them (the handler it leaked is
    put back, and the test fails): a leaked handler is inherited by every fork()ed child of the
    tests after it, and one (ray.init's, which outlives ray.shutdown) once hung the suite."""
    watched = (signal.SIGTERM, signal.SIGINT)
    before = {number: signal.getsignal(number) for number in watched}
    yield
    leaked = [signal.Signals(number).name for number in watched if signal.getsignal(number) is not before[number]]
    for number in watched:
        signal.signal(number, before[number])
    if leaked:
        pytest.fail(f"the test left its own handler of {', '.join(leaked)}; restore the one it found")


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """The models here are tiny: one thread per op is faster than handing each small matmul to
    a pool, several times so when other processes share the cores. Integration tests on the
    embedded model keep every thread."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 96
EOS = 1
PAD = 0
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=PAD,
    eos_token_id=EOS,
    bos_token_id=2,
)


def tiny_config(model_type: str, **overrides) -> Callable[[], PretrainedConfig]:
    """A maker of ``model_type``'s default config shrunk to COMMON's sizes (plus ``overrides``)."""
    return lambda: AutoConfig.for_model(model_type, **{**COMMON, **overrides})


MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
# Multi-head latent attention: o_proj reads 4 heads x v_head_dim 6, while config.head_dim is qk_rope_head_dim 4.
MLA = dict(
    num_key_value_heads=4,
    n_routed_experts=4,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=6,
    **MOE,
)
GEMMA3_VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    # Gemma's heads x head_dim (4 x 16) differs from hidden_size (32) on purpose.
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16),
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=4),
    "phi3": lambda: Phi3Config(**COMMON),
    "olmo2": lambda: Olmo2Config(**COMMON),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128, eos_token_id=EOS, bos_token_id=2
    ),
    "gpt_neox": lambda: GPTNeoXConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}),
    # Located automatically (no row in lofit.models.architectures.ARCHITECTURES) unless noted.
    "mixtral": tiny_config("mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": tiny_config("qwen3_moe", num_experts=4, **MOE),
    "qwen2_moe": tiny_config("qwen2_moe", num_experts=4, shared_expert_intermediate_size=16, **MOE),
    "granitemoe": tiny_config("granitemoe", num_local_experts=4, num_experts_per_tok=2),
    "olmoe": tiny_config("olmoe", num_experts=4, num_experts_per_tok=2),
    "granite": tiny_config("granite"),
    "starcoder2": tiny_config("starcoder2"),
    "cohere": tiny_config("cohere"),
    "cohere2": tiny_config("cohere2"),
    "olmo": tiny_config("olmo"),
    "stablelm": tiny_config("stablelm"),
    "phi": tiny_config("phi"),
    "smollm3": tiny_config("smollm3"),
    "exaone4": tiny_config("exaone4"),
    "opt": tiny_config("opt", ffn_dim=64, word_embed_proj_dim=32),
    "falcon": tiny_config("falcon", num_kv_heads=2, new_decoder_architecture=True),
    "gptj": tiny_config("gptj", rotary_dim=4, n_inner=64),
    "bloom": tiny_config("bloom"),
    "gpt_bigcode": tiny_config("gpt_bigcode", n_inner=64),
    "codegen": tiny_config("codegen", rotary_dim=4, n_inner=64),
    "mpt": tiny_config("mpt", expansion_ratio=2),
    "xglm": tiny_config("xglm", ffn_dim=64),
    "biogpt": tiny_config("biogpt"),
    "gemma3": lambda: Gemma3Config(
        text_config={**COMMON, "head_dim": 16, "sliding_window": 4}, vision_config=GEMMA3_VISION, mm_tokens_per_image=4
    ),
    "deepseek_v2": tiny_config("deepseek_v2", **MLA),  # a row: head_dim is v_head_dim
    "deepseek_v3": tiny_config("deepseek_v3", **MLA),  # a row: head_dim is v_head_dim
}
ARCHITECTURE_NAMES = sorted(TINY_CONFIGS)


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type]())
    assert model.config.model_type == model_type
    return model.eval()


@pytest.fixture(params=ARCHITECTURE_NAMES)
def model_type(request) -> str:
    return request.param


def synthetic_pairs(n: int = 12, seed: int = 0) -> list[TokenizedPair]:
    """Prompts of random tokens whose completion is a fixed function of the prompt."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 10))]
        completion = [3 + (prompt[0] % 5), 3 + (prompt[-1] % 7), EOS]
        pairs.append(TokenizedPair(prompt, completion))
    return pairs


def randomize_adapter(lofit_model, seed: int = 0, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lofit_model.lofit_scale.copy_(torch.randn(lofit_model.lofit_scale.shape, generator=generator) * scale)
        lofit_model.lofit_bias.copy_(torch.randn(lofit_model.lofit_bias.shape, generator=generator) * scale)


SAVED_METHODS = [name for name in METHODS if name != "zero-shot"]
"""The methods whose result holds numbers of its own to save (0-shot saves only its name)."""


def fitted(name: str, model) -> torch.nn.Module:
    """An untrained result of method ``name`` on ``model``, with non-zero numbers where it has any."""
    from peft import LoraConfig, get_peft_model

    from lofit import get_lofit_model
    from lofit.methods.red import RedModel
    from lofit.methods.reft import ReftConfig, ReftModel
    from lofit.methods.repe import ResidualShiftModel

    if name in ("lofit", "iti"):
        wrapped = get_lofit_model(model)
        randomize_adapter(wrapped)
        wrapped.set_active_heads([(0, 1), (2, 3)])
        return wrapped
    if name == "lora":
        return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    wrapped = {"repe": ResidualShiftModel, "red": RedModel, "reft": lambda m: ReftModel(m, ReftConfig(reft_rank=2))}[
        name
    ](model)
    with torch.no_grad():
        for parameter in wrapped.trainable_parameters() or [wrapped.shift]:
            parameter.add_(0.1)
    return wrapped


def input_batch(seed: int = 1, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=generator)}


WORDS = ["<pad>", "</s>", "Q:", "A:", "yes", "no", "maybe", "sky", "blue", "red"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS, built offline."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
