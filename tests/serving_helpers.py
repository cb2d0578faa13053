"""What the server tests share: a tiny model folder, adapters of every method, a server in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lofit import get_lofit_model
from lofit.evaluation.generation import greedy_completions
from lofit.methods import METHODS, FitResult, load_adapted
from lofit.methods.reft import ReftConfig
from lofit.models.loading import load_model

from .conftest import COMMON, EOS, PAD, VOCAB, fitted, randomize_adapter

SPECIAL = ["<pad>", "</s>", "<s>", "system:", "user:", "assistant:"]
WORDS = SPECIAL + [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"
API_KEY = "test-key-0123"
MIXED_METHODS = ("iti", "red", "repe", "lora")
EXCLUSIVE_METHODS = ("reft",)
LORAS = {"lora-b": (["v_proj", "o_proj", "down_proj"], False), "lora-dora": (["q_proj", "v_proj"], True)}
"""Two more LoRA adapters, by name: (target modules, DoRA). lora-b targets the attention output
projection, where LoFiT's hooks act; lora-dora cannot mix (peft refuses DoRA in mixed batches)."""


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace tokenizer with one word per token id of the tiny model, and a chat template."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_base(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny random Llama that never ends a text by itself: the output rows of the pad, EOS and
    BOS tokens are zero and those of tokens 6 and 7 opposite, so one of them always scores above 0,
    and every generation runs to its max_tokens (lengths the tests can rely on)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**COMMON, "max_position_embeddings": 4096, "tie_word_embeddings": False, **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[[PAD, EOS, 2]] = 0
        weight[7] = -weight[6]
    return model


def save_base(folder: Path, seed: int = 0) -> Path:
    tiny_base(seed).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def save_lofit(model, folder: Path, seed: int, with_scale: bool = True) -> None:
    """A LoFiT adapter on 5 seeded random heads: random v, and random A unless not ``with_scale``
    (then A is 0, as LoFiT's step 2 leaves it)."""
    wrapped = get_lofit_model(model)
    randomize_adapter(wrapped, seed=seed)
    if not with_scale:
        wrapped.lofit_scale.data.zero_()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(wrapped.layout.num_layers * wrapped.layout.num_heads, generator=generator)[:5]
    wrapped.set_active_heads([divmod(int(i), wrapped.layout.num_heads) for i in order])
    wrapped.save_pretrained(folder)
    wrapped.unload()


def save_method(name: str, model, folder: Path, result=None, seed: int = 3, spread: float = 0.5) -> None:
    """The untrained but non-zero result of method ``name`` (tests/conftest.fitted, or ``result``;
    a LoRA's B drawn with standard deviation ``spread``), saved."""
    result = fitted(name, model) if result is None else result
    if name == "lora":  # peft starts B at zero, the identity: make it act
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter_name, parameter in result.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.normal_(0, spread, generator=generator)
    METHODS[name](ReftConfig(reft_rank=2) if name == "reft" else None).save(FitResult(result, 0), folder)
    result.unload()


def save_lora(model, folder: Path, targets: list[str], dora: bool, seed: int) -> None:
    """A rank-2 LoRA (DoRA when ``dora``) on ``targets`` with seeded random B, saved by lofit's LoRA method."""
    torch.manual_seed(seed)
    config = LoraConfig(r=2, target_modules=targets, use_dora=dora, task_type="CAUSAL_LM")
    save_method("lora", model, folder, get_peft_model(model, config), seed=seed, spread=0.1)


def make_adapters(model_folder: Path, root: Path, count: int = 16) -> list[str]:
    """``count`` LoFiT adapters lofit-00.. (the second half without A; one inside a run folder's
    adapter/), one of each other method, and folders the server must skip; the names it must serve."""
    model, _ = load_model(str(model_folder))
    names = []
    for index in range(count):
        name = f"lofit-{index:02d}"
        folder = root / name / "adapter" if index == 1 else root / name
        save_lofit(model, folder, seed=100 + index, with_scale=index < count // 2)
        names.append(name)
    for method in MIXED_METHODS + EXCLUSIVE_METHODS:
        save_method(method, model, root / method)
        names.append(method)
    for seed, (name, (targets, dora)) in enumerate(LORAS.items(), start=11):
        save_lora(model, root / name, targets, dora, seed)
        names.append(name)
    (root / "not-an-adapter").mkdir()
    (root / "not-an-adapter" / "notes.txt").write_text("nothing lofit saved")
    other = tiny_base(seed=7)  # same geometry, other weights: refused by fingerprint
    other.lofit_base_name = "other-model"
    save_lofit(other, root / "other-weights", seed=1)
    save_lofit(tiny_base(seed=0, num_hidden_layers=2), root / "other-shape", seed=1)  # refused by geometry
    return names


def reference(model, tokenizer, folder: Path | None, prompts: list[str], max_tokens: int) -> list[str]:
    """What lofit generates for each prompt alone with the result in ``folder`` (None: the base model)."""
    wrapped = model if folder is None else load_adapted(model, folder)
    try:
        return [greedy_completions(wrapped, tokenizer, [p], max_tokens, progress=False)[0] for p in prompts]
    finally:
        if wrapped is not model:
            wrapped.unload()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``lofit serve`` in a subprocess on 127.0.0.1 (one thread for torch); started, ready after :meth:`wait_ready`."""

    def __init__(self, model: Path, adapters: Path | None, log: Path, *options: str, api_key: str | None = API_KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "lofit.cli", "serve", "--model", str(model), "--port", str(self.port)]
        command += ["--adapters", str(adapters)] if adapters else []
        command += ["--api-key", api_key] if api_key else []
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LOFIT_API_KEY": ""}
        environment.pop("LOFIT_API_KEY")
        self.log = log
        self.process = subprocess.Popen(
            [*command, *options], stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment
        )

    def wait_ready(self, timeout: float = 90) -> Server:
        """This server once ``GET /health`` answers (RuntimeError with its log if it exits or takes too long)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log.read_text()}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code once it has finished what it was doing."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
