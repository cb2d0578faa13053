"""Inference-Time Intervention (Li et al., 2023) as a LoFiT adapter with fitted, not trained, biases.

On contrast pairs built from the training data (see :mod:`lofit.methods.probing`):

1. read every head's output z[l, h] at the last token of each positive and negative text;
2. fit a logistic-regression probe per head on 80% of the pairs, rank heads by its
   accuracy on the other 20%, keep the top K;
3. for each kept head, the direction is the mass-mean shift
   theta = mean(z | positive) - mean(z | negative), normalised to unit length, and
   sigma = std over all texts of z . theta;
4. at inference add  alpha * sigma * theta  to that head's output at every position.

Step 4 is exactly LoFiT's bias v[l, h] (with A = 0), so ITI's result is a LoFiT adapter:
it is saved, loaded, merged and evaluated the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lofit.methods.base import FitContext, FitResult
from lofit.methods.lofit.config import check_head_amount, head_count
from lofit.methods.lofit.method import HeadAdapterMethod
from lofit.methods.lofit.model import get_lofit_model
from lofit.methods.lofit.selectors import head_probe_ranking
from lofit.methods.probing import collect_activations, contrast_pairs


@dataclass
class ItiConfig:
    iti_num_heads: float | None = field(
        default=None,
        metadata={
            "help": "ITI's K: heads to intervene on, a count or a fraction of all heads (default: LoFiT's --num-heads)"
        },
    )
    iti_alpha: float = field(
        default=15.0, metadata={"help": "ITI's intervention strength alpha (in units of each head's sigma)"}
    )

    def __post_init__(self) -> None:
        if self.iti_num_heads is not None:
            check_head_amount(self.iti_num_heads)


def mass_mean_shifts(heads: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sigma * theta for every head: (N, L, H, D) activations, (N,) labels -> (L, H, D)."""
    positive, negative = heads[labels == 1].mean(dim=0), heads[labels == 0].mean(dim=0)
    theta = positive - negative
    theta = theta / theta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sigma = torch.einsum("nlhd,lhd->nlh", heads, theta).std(dim=0)
    return sigma[..., None] * theta


class Iti(HeadAdapterMethod):
    """Probe-ranked heads shifted along their mass-mean direction, learning-free."""

    name = "iti"
    config_class = ItiConfig

    def fit(self, context: FitContext) -> FitResult:
        seed = context.lofit.seed
        amount = self.config.iti_num_heads if self.config.iti_num_heads is not None else context.lofit.num_heads
        pairs = contrast_pairs(context.tokenizer, context.examples, seed)
        activations = collect_activations(
            context.model, pairs, context.tokenizer.pad_token_id, progress=context.progress
        )
        ranking = head_probe_ranking(activations, seed)
        heads = ranking.top(head_count(amount, len(ranking.order)))
        shifts = mass_mean_shifts(activations.heads, activations.labels)
        model = get_lofit_model(context.model, context.lofit)
        model.set_active_heads(heads)
        model.head_ranking = ranking.order
        with torch.no_grad():
            model.lofit_bias.copy_(self.config.iti_alpha * shifts.to(model.lofit_bias))
        return FitResult(model, model.num_adapter_parameters(), {}, ranking)
