"""Contrast pairs, activations at their last token, and linear probes on every head or layer at once.

The learning-free baselines (ITI, RepE) and the probe-based head selectors read the
model's representations of a *positive* and a *negative* text for the same prompt:

- preference data gives them directly: prompt + chosen vs prompt + rejected;
- prompt/completion data has no negatives, so each prompt is paired with the completion of
  another training example whose text differs (drawn with the seed), as a wrong answer.

A probe is a logistic regression p(positive | x) = sigmoid(w . x + b). All P probes (one
per head, or one per layer) are fitted together as one batched problem on standardised
features, so there is no Python loop over heads.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lofit.data.batching import TokenizedPair, collate, tokenize_pair
from lofit.data.examples import PromptCompletion, PromptPreference
from lofit.models.architectures import decoder_layers, head_layout
from lofit.models.wrapper import hidden_states_of


@dataclass(frozen=True)
class ContrastPair:
    """The same prompt followed by a preferred and a dispreferred completion."""

    positive: TokenizedPair
    negative: TokenizedPair


def contrast_pairs(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[PromptCompletion | PromptPreference], seed: int
) -> list[ContrastPair]:
    """Positive/negative pairs from preference or prompt/completion examples (see module docstring)."""

    def text(prompt: str, completion: str) -> TokenizedPair:
        return tokenize_pair(tokenizer, prompt, completion, add_eos=False)  # read at the answer's own last token

    if examples and all(isinstance(e, PromptPreference) for e in examples):
        return [ContrastPair(text(e.prompt, e.chosen), text(e.prompt, e.rejected)) for e in examples]
    if not examples or not all(isinstance(e, PromptCompletion) for e in examples):
        raise ValueError("contrast pairs need all prompt/completion examples or all preference examples")
    completions = sorted({e.completion for e in examples})
    if len(completions) < 2:
        raise ValueError("every training example has the same completion: there is no wrong answer to contrast it with")
    rng = random.Random(seed)
    pairs = []
    for e in examples:
        wrong = rng.choice([c for c in completions if c != e.completion])
        pairs.append(ContrastPair(text(e.prompt, e.completion), text(e.prompt, wrong)))
    return pairs


@dataclass
class Activations:
    """Representations at the last token of each text, positives then negatives.

    Attributes:
        heads: (N, num_layers, num_heads, head_dim): each head's output (the attention
            output projection's input).
        residual: (N, num_layers, hidden): each decoder layer's output (the residual stream
            after it, before any final norm).
        labels: (N,) 1.0 for a positive text, 0.0 for a negative one.
        groups: (N,) index of the pair a text belongs to (to split probes by pair).
    """

    heads: torch.Tensor
    residual: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor


@torch.no_grad()
def collect_activations(
    model: nn.Module, pairs: Sequence[ContrastPair], pad_id: int, batch_size: int = 16, progress: bool = True
) -> Activations:
    """Run every positive and negative text once and keep each head's and layer's last-token state."""
    layout = head_layout(model)
    texts = [p.positive for p in pairs] + [p.negative for p in pairs]
    device = model.get_input_embeddings().weight.device
    head_inputs: list[torch.Tensor] = []
    layer_outputs: list[torch.Tensor] = []

    def keep_input(module: nn.Module, args: tuple) -> None:
        head_inputs.append(args[0])

    def keep_output(module: nn.Module, args: tuple, output) -> None:
        layer_outputs.append(hidden_states_of(output))

    hooks = [proj.register_forward_pre_hook(keep_input) for proj in layout.out_projs]
    hooks += [layer.register_forward_hook(keep_output) for layer in decoder_layers(model)]
    heads, residual = [], []
    try:
        model.eval()
        for start in tqdm(
            range(0, len(texts), batch_size), desc="reading activations", disable=not progress, dynamic_ncols=True
        ):
            chunk = list(texts[start : start + batch_size])
            batch = collate(chunk, pad_id).to(device)
            last = batch.attention_mask.sum(dim=1) - 1  # right padding: the last real token
            rows = torch.arange(len(chunk), device=device)
            head_inputs.clear()
            layer_outputs.clear()
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=1)
            heads.append(torch.stack([x[rows, last] for x in head_inputs], dim=1).float().cpu())
            residual.append(torch.stack([h[rows, last] for h in layer_outputs], dim=1).float().cpu())
    finally:
        for hook in hooks:
            hook.remove()
    n = len(pairs)
    return Activations(
        heads=torch.cat(heads).unflatten(-1, (layout.num_heads, layout.head_dim)),
        residual=torch.cat(residual),
        labels=torch.cat([torch.ones(n), torch.zeros(n)]),
        groups=torch.arange(n).repeat(2),
    )


def split_pairs(groups: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean train/validation masks over texts, keeping both texts of a pair on the same side."""
    num_pairs = int(groups.max()) + 1
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed))
    num_val = max(1, round(val_fraction * num_pairs)) if num_pairs > 1 else 0
    val_pairs = torch.zeros(num_pairs, dtype=torch.bool)
    val_pairs[order[:num_val]] = True
    val = val_pairs[groups]
    return ~val, val


@dataclass
class ProbeScores:
    """Held-out accuracy (P,) and held-out mean cross-entropy (P,) of P probes."""

    accuracy: torch.Tensor
    loss: torch.Tensor

    def ranking_key(self) -> torch.Tensor:
        """Accuracy, ties broken by the lower held-out loss (accuracies on a few pairs tie often)."""
        return self.accuracy.double() - 1e-6 * (self.loss / self.loss.max().clamp_min(1e-12)).double()


def fit_probes(
    features: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    val_fraction: float = 0.2,
    seed: int = 0,
    steps: int = 300,
    weight_decay: float = 1e-2,
) -> ProbeScores:
    """Held-out accuracy and loss of a logistic-regression probe per feature set.

    Args:
        features: (N, P, F): N texts, P independent probes (heads or layers), F features each.
        labels: (N,) in {0, 1}.
        groups: (N,) pair index; a pair's two texts fall on the same side of the split.

    Each probe minimises the mean binary cross-entropy + ``weight_decay`` * ||w||^2 on the
    training texts (features standardised with training statistics) by full-batch Adam;
    returns the (P,) accuracies and cross-entropies on the held-out texts.
    """
    train_mask, val_mask = split_pairs(groups, val_fraction, seed)
    if not val_mask.any() or not train_mask.any():
        raise ValueError("probing needs at least two contrast pairs (one to fit, one to validate)")
    x = features.float().transpose(0, 1)  # (P, N, F)
    mean = x[:, train_mask].mean(dim=1, keepdim=True)
    std = x[:, train_mask].std(dim=1, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    num_probes, _, num_features = x.shape
    weights = torch.zeros(num_probes, num_features, requires_grad=True)
    bias = torch.zeros(num_probes, 1, requires_grad=True)
    optimizer = torch.optim.Adam([weights, bias], lr=5e-2)
    x_train, y_train = x[:, train_mask], labels[train_mask].expand(num_probes, -1)
    with torch.enable_grad():
        for _ in range(steps):
            logits = torch.einsum("pnf,pf->pn", x_train, weights) + bias
            loss = (
                nn.functional.binary_cross_entropy_with_logits(logits, y_train)
                + weight_decay * weights.pow(2).sum(dim=1).mean()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = torch.einsum("pnf,pf->pn", x[:, val_mask], weights) + bias
        y_val = labels[val_mask].expand(num_probes, -1)
        accuracy = ((logits > 0) == y_val.bool()).float().mean(dim=1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y_val, reduction="none").mean(dim=1)
        return ProbeScores(accuracy, loss)
