"""transformers.Trainer on a LofitModel: both steps train, checkpoints hold the adapter only, resuming is exact."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.data.batching import collate

from .conftest import PAD, synthetic_pairs, tiny_model

HEADS = [(0, 1), (2, 3)]


def rows(n: int = 8) -> list[dict[str, torch.Tensor]]:
    """Tokenised pairs with labels on the completion only, as Trainer's default collator takes them."""
    batch = collate(synthetic_pairs(n), PAD)
    labels = torch.where(torch.roll(batch.score_mask, 1, dims=1), batch.input_ids, -100)
    return [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(batch.input_ids, batch.attention_mask, labels)
    ]


def trainer(model: LofitModel, output_dir: Path, **options) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        **{"num_train_epochs": 2, "save_strategy": "no", **options},
    )
    return Trainer(model=model, args=args, train_dataset=rows())


def step_two_model() -> LofitModel:
    lofit_model = get_lofit_model(tiny_model("llama"))
    lofit_model.set_active_heads(HEADS)
    lofit_model.train_only("bias")
    return lofit_model


def test_transformers_trainer_trains_the_wrapper(tmp_path):
    lofit_model = get_lofit_model(tiny_model("llama"), LofitConfig(l1_lambda=1e-3))
    lofit_model.train_only("scale")
    before = {n: p.detach().clone() for n, p in lofit_model.base_model.named_parameters()}
    result = trainer(lofit_model, tmp_path).train()
    assert result.global_step == 4
    assert lofit_model.lofit_scale.detach().abs().sum() > 0
    assert all(torch.equal(p, before[n]) for n, p in lofit_model.base_model.named_parameters())


def test_checkpoints_hold_the_adapter_and_not_the_base_weights(tmp_path):
    lofit_model = get_lofit_model(tiny_model("llama"), LofitConfig(l1_lambda=1e-3))
    lofit_model.train_only("scale")  # step 1: the L1 term is added by LofitModel.forward
    trainer(lofit_model, tmp_path, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "checkpoint-4"
    saved = load_file(checkpoint / "model.safetensors")
    assert sorted(saved) == ["active_heads", "lofit_bias", "lofit_scale"]
    assert torch.equal(saved["lofit_scale"], lofit_model.lofit_scale.detach())
    checkpoint_bytes = sum(path.stat().st_size for path in checkpoint.iterdir())
    base_bytes = sum(p.numel() * p.element_size() for p in lofit_model.base_model.parameters())
    assert checkpoint_bytes < base_bytes / 4, (checkpoint_bytes, base_bytes)


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_adapter(tmp_path):
    uninterrupted = step_two_model()
    trainer(uninterrupted, tmp_path, num_train_epochs=3, save_strategy="steps", save_steps=3).train()  # 6 steps
    resumed = get_lofit_model(tiny_model("llama"))  # all heads active: the checkpoint restores the selection
    resumed.train_only("bias")
    trainer(resumed, tmp_path / "again", num_train_epochs=3).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-3")
    )
    assert resumed.selected_heads == HEADS
    assert uninterrupted.lofit_bias.detach().abs().sum() > 0
    torch.testing.assert_close(resumed.lofit_bias.detach(), uninterrupted.lofit_bias.detach(), rtol=0, atol=1e-7)


def test_the_state_dict_is_the_adapter_and_loads_strictly():
    source = step_two_model()
    with torch.no_grad():
        source.lofit_bias.normal_()
    target = get_lofit_model(tiny_model("llama"))
    target.load_state_dict(source.state_dict())  # strict: the base weights are not missing
    assert target.selected_heads == HEADS
    assert torch.equal(target.lofit_bias, source.lofit_bias)
    nested = torch.nn.ModuleDict({"adapter": target})
    assert sorted(nested.state_dict()) == ["adapter.active_heads", "adapter.lofit_bias", "adapter.lofit_scale"]
    nested.load_state_dict(nested.state_dict())
