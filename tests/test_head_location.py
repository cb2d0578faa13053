"""Automatic head location: what it finds on every tiny model, that each table row is a needed
exception, the error when nothing is found, the other methods' modules, and docs/export.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from lofit import UnsupportedModelError, get_lofit_model
from lofit.methods.lofit.merge import exportable_types
from lofit.methods.lora import default_targets
from lofit.methods.red import RedModel
from lofit.methods.reft import ReftConfig, ReftModel
from lofit.methods.repe import ResidualShiftModel
from lofit.models.architectures import (
    ARCHITECTURES,
    architecture_row,
    bias_flag,
    decoder_layers,
    family_support,
    head_layout,
    locate_row,
)

from .conftest import ARCHITECTURE_NAMES, TINY_CONFIGS, input_batch, tiny_model

EXPORT_DOC = Path(__file__).parents[1] / "docs" / "export.md"

LLAMA_LIKE = ("model.layers.{layer}.self_attn.o_proj", "mlp")
EXPECTED = {  # model_type -> (output projection, feed-forward block inside the layer)
    **{
        t: LLAMA_LIKE
        for t in [
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo2",
            "mixtral",
            "qwen3_moe",
            "qwen2_moe",
            "olmoe",
            "granite",
            "starcoder2",
            "cohere",
            "cohere2",
            "olmo",
            "stablelm",
            "smollm3",
            "exaone4",
            "deepseek_v2",
            "deepseek_v3",
        ]
    },
    "granitemoe": ("model.layers.{layer}.self_attn.o_proj", "block_sparse_moe"),
    "gemma3": ("model.language_model.layers.{layer}.self_attn.o_proj", "mlp"),
    "phi": ("model.layers.{layer}.self_attn.dense", "mlp"),
    "gpt2": ("transformer.h.{layer}.attn.c_proj", "mlp"),
    "gpt_bigcode": ("transformer.h.{layer}.attn.c_proj", "mlp"),
    "gpt_neox": ("gpt_neox.layers.{layer}.attention.dense", "mlp"),
    "opt": ("model.decoder.layers.{layer}.self_attn.out_proj", "fc2"),
    "xglm": ("model.layers.{layer}.self_attn.out_proj", "fc2"),
    "biogpt": ("biogpt.layers.{layer}.self_attn.out_proj", "fc2"),
    "falcon": ("transformer.h.{layer}.self_attention.dense", "mlp"),
    "bloom": ("transformer.h.{layer}.self_attention.dense", "mlp"),
    "gptj": ("transformer.h.{layer}.attn.out_proj", "mlp"),
    "codegen": ("transformer.h.{layer}.attn.out_proj", "mlp"),
    "mpt": ("transformer.blocks.{layer}.attn.out_proj", "ffn"),
}


def test_every_tiny_model_type_has_an_expected_location():
    assert sorted(EXPECTED) == ARCHITECTURE_NAMES


def test_the_row_is_where_the_heads_are(model_type):
    model = tiny_model(model_type)
    row = architecture_row(model)
    assert (row.out_proj, row.mlp) == EXPECTED[model_type]
    layout = head_layout(model)
    assert layout.num_layers == 3 and layout.num_heads == 4
    assert [id(p) for p in layout.out_projs] == [
        id(model.get_submodule(row.out_proj.format(layer=i))) for i in range(3)
    ]


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_row_is_a_needed_exception_and_its_bias_flag_builds_a_bias(model_type):
    model = tiny_model(model_type)
    row = ARCHITECTURES[model_type]
    try:
        located = locate_row(model)
    except UnsupportedModelError:
        located = None
    assert located != row
    assert bias_flag(model.config, row.out_proj) == row.bias_flag


def test_the_mla_row_splits_o_proj_by_v_head_dim():
    """DeepSeek's o_proj reads 4 heads x v_head_dim 6; the rules alone take q_b_proj (16 = 4 x head_dim 4)."""
    model = tiny_model("deepseek_v3")
    assert head_layout(model).shape == (3, 4, 6)
    assert locate_row(model).out_proj.endswith("q_b_proj")


class ToyConfig(PretrainedConfig):
    model_type = "lofit_toy"

    def __init__(self, hidden_size: int = 8, num_attention_heads: int = 2, num_hidden_layers: int = 2, **kwargs):
        self.hidden_size, self.num_attention_heads, self.num_hidden_layers = (
            hidden_size,
            num_attention_heads,
            num_hidden_layers,
        )
        super().__init__(**kwargs)


class ToyAttention(nn.Module):
    """Attention whose only linear is a fused qkv (hidden -> 3 hidden): no output projection."""

    def __init__(self, hidden: int):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)


class ToyLayer(nn.Module):
    def __init__(self, hidden: int, attention_name: str):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.add_module(attention_name, ToyAttention(hidden))
        self.mlp = nn.Linear(hidden, hidden)


class ToyModel(PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig, attention_name: str = "self_attn", num_layers: int | None = None):
        super().__init__(config)
        count = config.num_hidden_layers if num_layers is None else num_layers
        self.layers = nn.ModuleList(ToyLayer(config.hidden_size, attention_name) for _ in range(count))


@pytest.mark.parametrize(
    "make,searched",
    [
        (
            lambda: ToyModel(ToyConfig()),
            r"decoder layers 'layers', attention self_attn with linear layers \(in, out\) "
            r"\[self_attn.qkv \(8, 24\)\], none mapping 2 heads x D to hidden_size 8",
        ),
        (
            lambda: ToyModel(ToyConfig(), attention_name="mixer"),
            "decoder layers 'layers', no child of layer 0 named like attn or attention holding weights",
        ),
        (lambda: ToyModel(ToyConfig(), num_layers=3), "no nn.ModuleList of num_hidden_layers = 2 decoder layers"),
    ],
)
def test_a_model_without_a_findable_projection_gets_a_clear_error(make, searched):
    with pytest.raises(
        UnsupportedModelError,
        match=rf"'lofit_toy' \(ToyModel\) is not supported.*Searched: {searched}.*"
        r"add one row to ARCHITECTURES in lofit/models/architectures\.py",
    ):
        get_lofit_model(make())


def logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**input_batch(), **kwargs).logits


@pytest.mark.parametrize("model_type", ARCHITECTURE_NAMES)
def test_red_repe_and_reft_hook_the_located_modules(model_type):
    """Untrained, each is the identity; a RepE shift on layer 0 moves that layer's output by
    exactly the shift; a RED bias on layer 0's feed-forward output changes the logits."""
    base = logits(tiny_model(model_type))
    for model in (
        RedModel(tiny_model(model_type)),
        ResidualShiftModel(tiny_model(model_type)),
        ReftModel(tiny_model(model_type), ReftConfig(reft_positions="first+last")),
    ):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-5)

    shifted = ResidualShiftModel(tiny_model(model_type))
    shift = torch.linspace(-1, 1, shifted.shift.shape[1])
    with torch.no_grad():
        shifted.shift[0] = shift
        edited = shifted(**input_batch(), output_hidden_states=True).hidden_states[1]
        with shifted.disable_adapter():
            plain = shifted(**input_batch(), output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(edited - plain, shift.expand_as(plain), rtol=0, atol=1e-5)
    assert len(decoder_layers(shifted.base_model)) == 3

    red = RedModel(tiny_model(model_type))
    with torch.no_grad():
        red.red_bias[0] = torch.linspace(-1, 1, red.red_bias.shape[1])  # not constant: a LayerNorm would remove that
    assert not torch.allclose(logits(red), base, atol=1e-4)


def test_lora_default_targets_exist_in_every_model(model_type):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(model_type)
    targets = default_targets(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0


def documented_families() -> dict[str, tuple[str, bool, str, str]]:
    """model_type -> (heads located, exportable, output projection, why) from docs/export.md's table."""
    rows = re.findall(
        r"^\| `(\w+)` \| (row|automatic) \| (yes|no) \| `([^`]+)` \| (.+) \|$",
        EXPORT_DOC.read_text(),
        flags=re.MULTILINE,
    )
    return {
        model_type: (located, exportable == "yes", path, why) for model_type, located, exportable, path, why in rows
    }


def test_docs_export_table_lists_every_tested_family_as_it_is():
    documented = documented_families()
    assert sorted(documented) == ARCHITECTURE_NAMES
    for model_type, entry in documented.items():
        support = family_support(model_type, TINY_CONFIGS[model_type]())
        assert (support.located, support.exportable, support.row.out_proj, support.export_reason) == entry, model_type


def test_exportable_types_judges_each_family_on_its_default_config():
    assert exportable_types(["mistral", "llama", "gpt2", "gptj"]) == ["gpt2", "llama"]
