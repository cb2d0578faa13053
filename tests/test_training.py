"""Determinism, the head ranking and the L1 term (transformers.Trainer: tests/test_trainer.py)."""

from __future__ import annotations

import torch

from lofit import LofitConfig, get_lofit_model
from lofit.methods.lofit.ranking import HeadRanking
from lofit.methods.lofit.steps import select_heads, tune_biases
from lofit.training.objectives import SFT

from .conftest import PAD, synthetic_pairs, tiny_model

CONFIG = LofitConfig(
    num_heads=4, select_epochs=2, tune_epochs=2, batch_size=4, scale_lr=1e-2, bias_lr=5e-2, l1_lambda=1e-3
)


def two_steps(seed: int):
    lofit_model = get_lofit_model(tiny_model("qwen2"), LofitConfig(**CONFIG.to_dict() | {"seed": seed}))
    pairs = synthetic_pairs(16)
    ranking, select_log = select_heads(lofit_model, SFT(pairs, PAD), progress=False)
    tune_log = tune_biases(lofit_model, SFT(pairs, PAD), ranking.top(4), progress=False)
    return ranking, select_log, tune_log, lofit_model.lofit_bias.detach().clone()


def test_same_seed_same_heads_and_metrics():
    first, second = two_steps(seed=3), two_steps(seed=3)
    assert first[0].order == second[0].order
    assert first[1].epoch_losses == second[1].epoch_losses
    assert first[2].epoch_losses == second[2].epoch_losses
    assert torch.equal(first[3], second[3])
    assert two_steps(seed=4)[1].epoch_losses != first[1].epoch_losses


def test_training_lowers_the_loss():
    _, select_log, tune_log, _ = two_steps(seed=0)
    assert tune_log.epoch_losses[-1] < tune_log.epoch_losses[0]
    assert select_log.epoch_losses[-1] < select_log.epoch_losses[0]


def test_ranking_sorts_by_l2_norm_of_scales(tmp_path):
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.0, 0.7]])
    ranking = HeadRanking.from_scores(scores)
    assert ranking.order == [(0, 1), (1, 2), (1, 0), (0, 2), (0, 0), (1, 1)]
    ranking.save(tmp_path / "r.json")
    assert HeadRanking.load(tmp_path / "r.json").order == ranking.order


def test_l1_penalty_is_lambda_times_sum_of_absolute_scales():
    lofit_model = get_lofit_model(tiny_model("llama"), LofitConfig(l1_lambda=0.25))
    with torch.no_grad():
        lofit_model.lofit_scale.fill_(-2.0)
    lofit_model.set_active_heads([(0, 0), (1, 1)])
    assert lofit_model.l1_penalty().item() == 0.25 * 2 * 2 * lofit_model.layout.head_dim


def test_forward_adds_l1_term_to_the_loss_while_scales_train():
    lofit_model = get_lofit_model(tiny_model("llama"), LofitConfig(l1_lambda=0.5))
    with torch.no_grad():
        lofit_model.lofit_scale.fill_(1e-3)
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        plain = lofit_model(input_ids=ids, labels=ids).loss
    lofit_model.train_only("scale")
    lofit_model.train()
    with torch.no_grad():
        penalised = lofit_model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(penalised, plain + lofit_model.l1_penalty())


def test_print_trainable_parameters(capsys):
    lofit_model = get_lofit_model(tiny_model("llama"))
    lofit_model.set_active_heads([(0, 0), (2, 3)])
    lofit_model.train_only("bias")
    lofit_model.print_trainable_parameters()
    assert "trainable params: 16 ||" in capsys.readouterr().out
