"""DPO: the loss at the reference, the reference computed with the adapter disabled, and training direction."""

from __future__ import annotations

import math

import torch

from lofit import LofitConfig, get_lofit_model
from lofit.data.batching import TokenizedPair, collate
from lofit.evaluation.multiple_choice import MultipleChoiceExample, mc_scores
from lofit.evaluation.scoring import sequence_logprobs
from lofit.methods.lofit.steps import select_heads, tune_biases
from lofit.training.objectives import DPO, dpo_losses

from .conftest import EOS, PAD, randomize_adapter, tiny_model


def test_dpo_loss_is_log_2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.5, -0.2])
    assert dpo_losses(logps, logps - 1, logps, logps - 1, beta=0.5).mean().item() == torch.tensor(math.log(2)).item()


def test_dpo_loss_falls_as_the_policy_prefers_the_chosen_answer():
    reference = torch.tensor([-4.0])
    better = dpo_losses(torch.tensor([-3.0]), torch.tensor([-5.0]), reference, reference, beta=0.5).mean()
    assert better.item() < math.log(2)
    assert better.item() == torch.nn.functional.softplus(torch.tensor(-0.5 * 2.0)).item()


def preference_pairs(n: int = 10) -> list[tuple[TokenizedPair, TokenizedPair]]:
    """Prompts of random tokens; the chosen answer is token 5, the rejected one token 6."""
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(7, 90, (5,), generator=generator).tolist()
        pairs.append((TokenizedPair(prompt, [5, EOS]), TokenizedPair(prompt, [6, EOS])))
    return pairs


def test_reference_is_the_model_with_its_adapter_disabled_and_first_loss_is_log_2():
    lofit_model = get_lofit_model(tiny_model("llama"))
    randomize_adapter(lofit_model)
    pairs = preference_pairs(4)
    objective = DPO.with_reference(lofit_model, pairs, PAD, beta=0.5)
    with torch.no_grad(), lofit_model.disable_adapter():
        expected = sequence_logprobs(lofit_model, collate([p for pair in pairs for p in pair], PAD)).view(-1, 2)
    got = torch.tensor([[i.reference_chosen, i.reference_rejected] for i in objective.items])
    torch.testing.assert_close(got, expected)
    with torch.no_grad(), lofit_model.disable_adapter():
        assert abs(objective.loss(lofit_model, objective.collate(objective.items)).item() - math.log(2)) < 1e-6


def test_dpo_training_moves_mc1_the_right_way():
    """After both LoFiT steps on DPO, the chosen answer outscores the rejected one on held-out prompts."""
    lofit_model = get_lofit_model(
        tiny_model("llama"),
        LofitConfig(num_heads=4, select_epochs=2, tune_epochs=4, batch_size=4, scale_lr=5e-2, bias_lr=1e-1),
    )
    train, held_out = preference_pairs(16)[:12], preference_pairs(16)[12:]

    def mc1() -> float:
        batch = collate([p for pair in held_out for p in pair], PAD)
        with torch.no_grad():
            scores = sequence_logprobs(lofit_model, batch).view(-1, 2)
        example = MultipleChoiceExample("", ("chosen", "rejected"), (1, 0), best=0)
        return sum(mc_scores(s.tolist(), example)["mc1"] for s in scores) / len(scores)

    before = mc1()
    objective = DPO.with_reference(lofit_model, train, PAD, beta=0.5)
    ranking, _ = select_heads(lofit_model, objective, progress=False)
    log = tune_biases(lofit_model, objective, ranking.top(4), progress=False)
    assert log.epoch_losses[-1] < math.log(2)
    assert before < 1.0 and mc1() == 1.0
