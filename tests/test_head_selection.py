"""Every head selector returns K distinct valid heads, the same ones under the same seed."""

from __future__ import annotations

import pytest
import torch

from lofit import LofitConfig, get_lofit_model
from lofit.methods.lofit.config import SELECTORS
from lofit.methods.lofit.ranking import HeadRanking
from lofit.methods.lofit.selectors import rank_heads
from lofit.training.objectives import build_objective

from .conftest import tiny_model, word_tokenizer
from .test_methods import sft_examples

K = 5


def top_heads(selector: str, seed: int, heads_file=None) -> list[tuple[int, int]]:
    model = get_lofit_model(tiny_model("qwen2"), LofitConfig(num_heads=K, select_epochs=1, batch_size=4, seed=seed))
    tokenizer, examples = word_tokenizer(), sft_examples()
    objective = build_objective(model, tokenizer, examples)
    ranking, _ = rank_heads(selector, model, tokenizer, examples, objective, heads_file, progress=False)
    assert sorted(ranking.order) == [(layer, h) for layer in range(3) for h in range(4)]  # every head ranked once
    assert not model.lofit_scale.requires_grad and not model.lofit_bias.requires_grad
    return ranking.top(K)


@pytest.mark.parametrize("selector", [s for s in SELECTORS if s != "file"])
def test_selector_gives_k_distinct_valid_heads_deterministically(selector):
    heads = top_heads(selector, seed=1)
    assert len(set(heads)) == K and all(0 <= layer < 3 and 0 <= h < 4 for layer, h in heads)
    assert top_heads(selector, seed=1) == heads


def test_random_selection_depends_on_the_seed():
    assert top_heads("random", seed=1) != top_heads("random", seed=2)


def test_probe_layers_takes_whole_layers_first():
    heads = top_heads("probe-layers", seed=0)
    layers = [layer for layer, _ in heads]
    assert layers[:4] == [layers[0]] * 4  # the best layer's 4 heads, then the next layer's


def test_file_selector_reads_a_ranking_and_refuses_one_of_another_shape(tmp_path):
    scores = torch.arange(12, dtype=torch.float).view(3, 4)
    HeadRanking.from_scores(scores).save(tmp_path / "r.json")
    assert top_heads("file", 0, tmp_path / "r.json") == [(2, 3), (2, 2), (2, 1), (2, 0), (1, 3)]
    HeadRanking.from_scores(torch.ones(5, 4)).save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="another model"):
        top_heads("file", 0, tmp_path / "other.json")
    with pytest.raises(ValueError, match="--heads-file"):
        top_heads("file", 0, None)


def test_unknown_selector_is_refused():
    with pytest.raises(ValueError, match="unknown head selector"):
        LofitConfig(heads="best")


def test_heads_file_and_the_file_selector_go_together():
    with pytest.raises(ValueError, match="go together"):
        LofitConfig(heads="file")
    with pytest.raises(ValueError, match="go together"):
        LofitConfig(heads_file="ranking.json")
    with pytest.raises(ValueError, match="--num-heads"):
        LofitConfig(heads="27")


def test_adapter_configs_from_before_selectors_still_load():
    assert LofitConfig.from_dict({"heads": 27, "bias_lr": 0.05}).num_heads == 27
