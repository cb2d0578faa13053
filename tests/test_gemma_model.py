"""Integration test on the second packaged real model, Gemma 3 270M (GGUF)."""

from __future__ import annotations

import pytest
import torch

from lofit import get_lofit_model
from lofit.models.loading import load_model

pytestmark = pytest.mark.integration


def test_gemma3_270m_loads_and_the_adapter_is_the_identity_at_init():
    """In the user's cache, as a run loads it: assembled and converted by the first run on a
    machine, read from the conversion after (assembling alone is tested in test_gpu_paths)."""
    model, tokenizer = load_model("gemma3-270m")
    lofit_model = get_lofit_model(model)
    layout = lofit_model.layout
    assert layout.model_type in ("gemma3_text", "gemma3")
    # Gemma: heads x head_dim is not the hidden size; the split must use config.head_dim.
    assert layout.num_heads * layout.head_dim != model.config.hidden_size
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        with lofit_model.disable_adapter():
            plain = lofit_model(input_ids=ids).logits
        assert torch.equal(lofit_model(input_ids=ids).logits, plain)
        lofit_model.lofit_bias[3, 1] = 1.0
        assert not torch.allclose(lofit_model(input_ids=ids).logits, plain)
