"""Tiny randomly initialised models of every supported architecture, built from configs."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from lofit.batching import TokenizedPair

VOCAB = 96
EOS = 1
PAD = 0
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2,
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
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128, eos_token_id=EOS, bos_token_id=2),
    "gpt_neox": lambda: GPTNeoXConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}),
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


def input_batch(seed: int = 1, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=generator)}


WORDS = ["<pad>", "</s>", "Q:", "A:", "yes", "no", "maybe", "sky", "blue", "red"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS, built offline."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
