"""Step 1's localization figures, the group-sparse objective, the paper's recipe, gradient
clipping, v's initialisation, step 2 with scales, and RED with its bias alone."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from accelerate import Accelerator

from lofit import LofitConfig, get_lofit_model
from lofit.cli import OptionsError, _configs, build_parser, main
from lofit.experiments.grid import Arm, Grid, expand
from lofit.methods import get_method
from lofit.methods.base import FitContext
from lofit.methods.lofit.localization import Localization
from lofit.methods.lofit.ranking import HeadRanking
from lofit.methods.lofit.steps import select_heads, shrink_heads, tune_biases
from lofit.methods.red import RedConfig
from lofit.runs.recipes import RECIPES, TASK_DEFAULTS
from lofit.training.loop import TrainingLog
from lofit.training.objectives import SFT

from .conftest import PAD, synthetic_pairs, tiny_model, word_tokenizer
from .tiny_run import tiny_model_folder, write_task

CONFIG = LofitConfig(num_heads=3, select_epochs=3, tune_epochs=2, batch_size=4, scale_lr=2e-2, bias_lr=5e-2)


def test_equal_scores_are_not_localized_and_one_head_is():
    uniform = Localization.of(torch.ones(4, 5), k=2)
    assert uniform.top_share == pytest.approx(0.1) and uniform.uniform_share == pytest.approx(0.1)
    assert uniform.effective_heads == pytest.approx(20) and uniform.near_zero == 0
    assert (
        not uniform.localized
        and "did not localize" in uniform.verdict("l1")
        and "--selection group" in uniform.verdict("l1")
    )
    single = torch.zeros(4, 5)
    single[2, 3] = 0.7
    one = Localization.of(single, k=1)
    assert one.top_share == 1.0 and one.effective_heads == pytest.approx(1.0)
    assert (
        (one.near_zero, one.exact_zero) == (19, 19) and one.localized and one.verdict().startswith("step 1 localized")
    )
    assert not Localization.of(torch.zeros(2, 2), k=1).localized  # nothing moved: no choice at all


def test_localized_means_half_the_score_or_twice_the_uniform_share_capped_halfway_to_one():
    scores = torch.tensor([[1.0] * 2 + [0.1] * 18])  # top 2 of 20 hold 2 / 3.8 = 52.6%
    assert Localization.of(scores, 2).threshold == pytest.approx(0.5) and Localization.of(scores, 2).localized
    assert Localization.of(scores, 6).threshold == pytest.approx(0.6)  # 2 x 6 / 20
    assert Localization.of(scores, 15).threshold == pytest.approx((1 + 0.75) / 2)
    assert not Localization.of(scores, 15).localized  # 2.3 / 3.8 = 60.5% < 87.5%
    noise = torch.rand(270, generator=torch.Generator().manual_seed(0))
    assert not Localization.of(noise, 27).localized  # random scores: the top 10% hold about 19%
    with pytest.raises(ValueError, match="cannot judge a selection of 21 heads"):
        Localization.of(scores, 21)


def test_shrink_heads_is_the_group_lasso_proximal_operator():
    scale = torch.tensor([[[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]])  # head norms 5, 0.5, 0
    shrink_heads(scale, 1.0)
    assert torch.allclose(scale[0, 0], torch.tensor([3.0, 4.0]) * (1 - 1 / 5))
    assert torch.equal(scale[0, 1], torch.zeros(2)) and torch.equal(scale[0, 2], torch.zeros(2))
    assert torch.isfinite(scale).all()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without the "did not localize" warnings of tiny models."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def rank(config: LofitConfig) -> tuple[HeadRanking, TrainingLog]:
    lofit_model = get_lofit_model(tiny_model("llama"), config)
    with _quiet():
        return select_heads(lofit_model, SFT(synthetic_pairs(16), PAD), progress=False)


def test_group_selection_sets_heads_exactly_to_zero_where_l1_does_not():
    l1_ranking, l1_log = rank(CONFIG)
    group_ranking, group_log = rank(LofitConfig(**CONFIG.to_dict() | {"selection": "group", "group_lambda": 2.5e-3}))
    assert (l1_ranking.scores == 0).sum() == 0
    zeros = int((group_ranking.scores == 0).sum())
    assert 0 < zeros < group_ranking.scores.numel()
    assert group_log.localization["exact_zero"] == zeros
    assert group_log.localization["effective_heads"] < l1_log.localization["effective_heads"]
    # no penalty at all: nothing is shrunk to zero
    free, _ = rank(LofitConfig(**CONFIG.to_dict() | {"selection": "group", "group_lambda": 0.0}))
    assert (free.scores == 0).sum() == 0


def test_a_step_1_that_does_not_localize_says_so_once_with_the_fix():
    with pytest.warns(UserWarning, match=r"step 1 did not localize: top 3 of 12 heads .* raise --l1-lambda"):
        _, log = select_heads(
            get_lofit_model(tiny_model("llama"), CONFIG), SFT(synthetic_pairs(16), PAD), progress=False
        )
    assert log.localization["k"] == 3 and log.localization["localized"] is False
    assert [m for m in log.warnings if "did not localize" in m] and len(log.warnings) == 1


def test_all_heads_is_no_selection_and_step_1_does_not_warn_about_it():
    """At K = N no head is left out: the figures are kept, but neither "localized" nor the advice
    to raise the penalty applies, and step 1 stays silent."""
    everything = Localization.of(torch.rand(3, 4, generator=torch.Generator().manual_seed(0)), 12)
    assert not everything.selects and not everything.localized and not everything.a_choice
    assert everything.label == "no selection (all heads)"
    assert Localization.of(torch.ones(3, 4), 2).label == "NOT localized"
    assert everything.verdict("l1").startswith("K = all 12 heads: step 2 tunes every head")
    assert everything.to_json()["selects"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, log = select_heads(
            get_lofit_model(tiny_model("llama"), LofitConfig(**CONFIG.to_dict() | {"num_heads": 12})),
            SFT(synthetic_pairs(16), PAD),
            progress=False,
        )
    assert log.warnings == [] and log.localization["k"] == 12 and log.localization["selects"] is False


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])
def test_every_step_clips_the_gradient_norm(monkeypatch, max_grad_norm):
    norms_after: list[float] = []
    original = Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        total = original(self, parameters, max_norm, norm_type)
        norms_after.append(float(torch.cat([p.grad.flatten() for p in parameters]).norm()))
        return total

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    config = LofitConfig(**CONFIG.to_dict() | {"max_grad_norm": max_grad_norm})
    lofit_model = get_lofit_model(tiny_model("llama"), config)
    tune_biases(lofit_model, SFT(synthetic_pairs(16), PAD), [(0, 1), (2, 3)], progress=False)
    if max_grad_norm == 0:
        assert norms_after == []
    else:
        assert len(norms_after) == 2 * 4  # 16 examples / batch 4, 2 epochs
        assert max(norms_after) <= max_grad_norm * (1 + 1e-4)


def test_baselines_clip_too(monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(
        Accelerator, "clip_grad_norm_", lambda self, parameters, max_norm, norm_type=2: calls.append(max_norm)
    )
    context = FitContext(
        model=tiny_model("llama"),
        tokenizer=word_tokenizer(),
        examples=[],
        lofit=LofitConfig(batch_size=4, max_grad_norm=0.5),
        progress=False,
    )
    context.objective = lambda model: SFT(synthetic_pairs(8), PAD)
    get_method("red", RedConfig(red_epochs=1)).fit(context)
    assert calls == [0.5, 0.5]  # 8 examples, batch 4, 1 epoch


def test_bias_initialisation_and_step_2_with_scales():
    heads = [(0, 1), (2, 3)]
    config = LofitConfig(**CONFIG.to_dict() | {"bias_init_std": 1e-3, "bias_lr": 1e-9, "tune_epochs": 1})
    lofit_model = get_lofit_model(tiny_model("llama"), config)
    tune_biases(lofit_model, SFT(synthetic_pairs(8), PAD), heads, progress=False)
    bias = lofit_model.lofit_bias.detach()
    assert 2e-4 < float(bias[0, 1].std()) < 5e-3  # drawn from N(0, 1e-3), barely trained
    inactive = ~lofit_model.active_heads
    assert bias[inactive].abs().max() == 0 and lofit_model.lofit_scale.detach().abs().max() == 0

    both = get_lofit_model(tiny_model("llama"), LofitConfig(**CONFIG.to_dict() | {"tune_scales": True}))
    tune_biases(both, SFT(synthetic_pairs(8), PAD), heads, progress=False)
    scale = both.lofit_scale.detach()
    assert scale[0, 1].abs().max() > 0 and scale[2, 3].abs().max() > 0
    assert scale[~both.active_heads].abs().max() == 0
    assert both.num_adapter_parameters() == 2 * len(heads) * both.layout.head_dim


def test_red_with_its_bias_alone_trains_one_vector_per_layer():
    context = FitContext(
        model=tiny_model("llama"),
        tokenizer=word_tokenizer(),
        examples=[],
        lofit=LofitConfig(batch_size=4),
        progress=False,
    )
    context.objective = lambda model: SFT(synthetic_pairs(8), PAD)
    result = get_method("red", RedConfig(red_epochs=1, red_train_scale=False)).fit(context)
    layers, hidden = result.model.red_bias.shape
    assert result.trained_parameters == layers * hidden
    assert result.model.red_scale.detach().abs().max() == 0 and result.model.red_bias.detach().abs().max() > 0


def parse(argv):
    return _configs(build_parser().parse_args(argv))


def test_paper_recipe_fills_the_scripts_values_below_explicit_options(tmp_path):
    run, lofit, _, _ = parse(["run", "--task", "clutrr", "--recipe", "paper"])
    assert (lofit.scale_lr, lofit.l1_lambda, lofit.bias_lr, lofit.select_epochs, lofit.tune_epochs) == (
        5e-4,
        5e-3,
        1e-2,
        5,
        5,
    )
    assert (lofit.bias_init_std, lofit.init_std, lofit.max_grad_norm, run.train_size) == (1e-3, 1e-3, 1.0, 300)
    assert lofit.num_heads_to_tune(270) == 8 and lofit.num_heads_to_tune(1024) == 32
    _, mquake, _, _ = parse(["run", "--task", "mquake", "--recipe", "paper", "--bias-lr", "0.03"])
    assert (mquake.scale_lr, mquake.l1_lambda, mquake.bias_lr) == (5e-3, 1e-3, 0.03)
    config = tmp_path / "c.yaml"
    config.write_text("recipe: paper\ntask: truthfulqa\nl1_lambda: 0.01\n")
    run, tqa, _, _ = parse(["run", "--config", str(config)])
    assert (run.recipe, run.beta, tqa.l1_lambda, tqa.scale_lr) == ("paper", 0.5, 0.01, 5e-3)
    assert set(RECIPES["paper"]) == {"clutrr", "mquake", "truthfulqa"}


def test_a_task_with_measured_step_1_defaults_starts_from_them_below_every_given_option(tmp_path):
    _, clutrr, _, _ = parse(["run", "--task", "clutrr"])
    assert (clutrr.selection, clutrr.group_lambda) == (TASK_DEFAULTS["clutrr"]["selection"], 0.05)
    assert parse(["run", "--task", "clutrr", "--selection", "l1"])[1].selection == "l1"
    assert parse(["run", "--task", "clutrr:mmlu"])[1].group_lambda == 0.05  # trains as CLUTRR does
    assert parse(["run", "--task", "clutrr", "--group-lambda", "0.02"])[1].group_lambda == 0.02
    plain = LofitConfig()
    for argv in (["--task", "clutrr", "--recipe", "none"], ["--task", "clutrr", "--recipe", "paper"]):
        assert parse(["run", *argv])[1].selection == plain.selection
    user_task = write_task(tmp_path / "mine.jsonl")
    assert parse(["run", "--task", str(user_task)])[1] == plain
    grid = Grid(
        name="g",
        description="",
        tasks=["clutrr"],
        seeds=[1],
        arms=[Arm("LoFiT", "lofit"), Arm("L1", "lofit", {"selection": "l1"}), Arm("LoRA", "lora")],
    )
    options = {cell.label: dict(cell.options) for cell in expand(grid, "test", {})}
    assert (options["LoFiT"]["selection"], options["LoFiT"]["group_lambda"]) == ("group", 0.05)
    assert options["L1"]["selection"] == "l1"
    assert options["LoRA"]["selection"] == plain.selection  # another method's cells keep their keys


def test_bad_recipes_and_values_are_refused_before_anything_loads(tmp_path, capsys):
    with pytest.raises(OptionsError, match="unknown recipe 'papr'; choose one of: paper, none"):
        parse(["run", "--recipe", "papr"])
    with pytest.raises(OptionsError, match="recipe 'paper' covers the tasks clutrr, mquake, truthfulqa"):
        parse(["run", "--recipe", "paper", "--task", str(tmp_path / "mine.jsonl")])
    with pytest.raises(OptionsError, match="bias_lr must be a finite number"):
        parse(["run", "--bias-lr", "nan"])
    (tmp_path / "bad.yaml").write_text("recipe: [paper]\n")  # a wrong type reaches the option's own check
    with pytest.raises(OptionsError, match="unknown recipe"):
        parse(["run", "--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "bad.yaml").write_text("task: []\n")  # no recipe lookup on it (the property test's case)
    parse(["run", "--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "bad.yaml").unlink()
    with pytest.raises(OptionsError, match="unknown step-1 objective 'lasso'"):
        parse(["run", "--selection", "lasso"])
    with pytest.raises(OptionsError, match="max_grad_norm must be >= 0"):
        parse(["run", "--max-grad-norm", "-1"])
    assert not any(tmp_path.iterdir())


def test_a_run_reports_its_localization_everywhere(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "tiny")
    data = write_task(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    with _quiet():
        assert (
            main(
                [
                    "run",
                    "--task",
                    str(data),
                    "--model",
                    str(model),
                    "--device",
                    "cpu",
                    "--batch-size",
                    "4",
                    "--select-epochs",
                    "2",
                    "--tune-epochs",
                    "1",
                    "--num-heads",
                    "3",
                    "--scale-lr",
                    "0.02",
                    "--selection",
                    "group",
                    "--group-lambda",
                    "0.0025",
                    "--no-progress",
                    "--output-dir",
                    str(out),
                ]
            )
            == 0
        )
    metrics = json.loads((out / "metrics.json").read_text())
    ranking = json.loads((out / "head_ranking.json").read_text())
    assert metrics["localization"] == ranking["localization"]
    assert ranking["localization"]["k"] == 3
    assert ranking["localization"]["exact_zero"] == sum(r["score"] == 0 for r in ranking["ranking"])
    assert math.isclose(
        sum(r["score"] for r in ranking["ranking"][:3]) / sum(r["score"] for r in ranking["ranking"]),
        ranking["localization"]["top_share"],
        rel_tol=1e-5,
    )
    capsys.readouterr()
    assert main(["heads", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) == 1 + 3 + 2  # header, the run's K = 3 heads, the figures, the heatmap path
    assert "localized" in printed and "effective heads" in printed


def test_grid_cells_take_a_recipe_below_their_own_options_and_share_rankings_where_step_1_is_the_same(tmp_path):
    from lofit.experiments.grid import expand, load_grid, ranking_key

    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(
        "name: r\ntasks: [clutrr]\nseeds: [1]\noptions: {recipe: paper}\narms:\n"
        "  - {label: paper, method: lofit}\n"
        "  - {label: own lr, method: lofit, options: {bias_lr: 0.3}}\n"
        "  - {label: with scales, method: lofit, options: {tune_scales: true, bias_init_std: 0.0}}\n"
        "  - {label: group, method: lofit, options: {selection: group, l1_lambda: 0.5}}\n"
        "  - {label: group too, method: lofit, options: {selection: group, l1_lambda: 0.7}}\n"
    )
    paper, own, scales, group, group_too = (cell.config for cell in expand(load_grid(str(grid_path)), "test", {}))
    assert (paper["scale_lr"], paper["l1_lambda"], paper["bias_lr"], paper["select_epochs"]) == (5e-4, 5e-3, 1e-2, 5)
    assert own["bias_lr"] == 0.3 and own["scale_lr"] == 5e-4
    assert ranking_key(paper) == ranking_key(own) == ranking_key(scales)  # step 2's options do not change step 1
    assert ranking_key(group) == ranking_key(group_too) != ranking_key(paper)  # the group objective ignores l1_lambda


def test_a_penalty_that_leaves_fewer_than_k_heads_says_to_lower_it():
    scores = torch.zeros(3, 4)
    scores[1, 2] = 0.4
    figures = Localization.of(scores, k=3)
    assert figures.localized and figures.kept == 1 and not figures.a_choice
    assert figures.verdict("group").startswith("step 1 kept only 1 heads, fewer than K = 3")
    assert "lower --group-lambda" in figures.verdict("group")
    with pytest.warns(UserWarning, match="step 1 kept only 0 heads, fewer than K = 3"):
        _, log = select_heads(
            get_lofit_model(
                tiny_model("llama"), LofitConfig(**CONFIG.to_dict() | {"selection": "group", "group_lambda": 10.0})
            ),
            SFT(synthetic_pairs(16), PAD),
            progress=False,
        )
    assert log.localization["kept"] == 0


def test_unread_options_follow_each_fields_read_when_condition():
    from lofit.runs.config import RunConfig
    from lofit.utils.options import unread_options

    classes = [RunConfig, LofitConfig]
    assert unread_options(classes, {}) == {  # the defaults: L1 selection by LoFiT's step 1
        "group_lambda": {"selection": "group"},
        "select_bias_lr": {"heads": "bias-based"},
    }
    assert set(unread_options(classes, {"selection": "group", "heads": "bias-based"})) == {"l1_lambda"}

    @dataclass
    class Undeclared:
        strength: float = field(default=1.0, metadata={"read_when": {"mode": "strong"}})

    with pytest.raises(ValueError, match="strength is read under mode, which no field of these configs declares"):
        unread_options([Undeclared], {"mode": "strong"})


def test_a_cell_key_ignores_the_strength_its_objective_does_not_read():
    from lofit.experiments.grid import config_key

    l1 = {"task": "clutrr", "selection": "l1", "l1_lambda": 1e-3, "group_lambda": 0.1}
    group = {"task": "clutrr", "selection": "group", "l1_lambda": 1e-3, "group_lambda": 0.02}
    assert config_key("lofit", l1) == config_key("lofit", l1 | {"group_lambda": 0.02})
    assert config_key("lofit", l1) != config_key("lofit", l1 | {"l1_lambda": 5e-3})
    assert config_key("lofit", group) == config_key("lofit", group | {"l1_lambda": 5e-3})
    assert config_key("lofit", group) != config_key("lofit", group | {"group_lambda": 0.01})


def test_bias_based_selection_trains_at_its_own_learning_rate_when_set(monkeypatch):
    from lofit.methods.lofit import steps

    rates = []
    monkeypatch.setattr(
        steps, "train", lambda model, objective, run: rates.append((run.lr, run.lr_name)) or TrainingLog()
    )
    for own in (None, 1e-2):
        options = CONFIG.to_dict() | {"heads": "bias-based", "bias_lr": 0.1, "select_bias_lr": own}
        steps.select_heads_by_bias(get_lofit_model(tiny_model("llama"), LofitConfig(**options)), SFT([], PAD), False)
    assert rates == [(0.1, "--bias-lr"), (1e-2, "--select-bias-lr")]
    with pytest.raises(ValueError, match="select_bias_lr must be positive; got 0.0"):
        LofitConfig(select_bias_lr=0.0)


def test_select_bias_lr_keys_only_the_bias_based_cells_that_read_it(tmp_path):
    from lofit.experiments.grid import config_key, expand, load_grid, ranking_key

    grid_path = tmp_path / "grid.yaml"
    text = "name: s\ntasks: [clutrr]\nseeds: [1]\noptions: {{{}}}\nsweep: {{heads: [lofit, random, bias-based]}}\n"
    text += "arms:\n  - {{label: a, method: lofit, tune: {{bias_lr: [0.05, 0.1], tune_epochs: [2, 4]}}}}\n"
    cells = {}
    for options in ("", "select_bias_lr: 0.01"):
        grid_path.write_text(text.format(options))
        cells[options] = expand(load_grid(str(grid_path)), "tune", {})
    unset, own = cells.values()
    for before, after in zip(unset, own, strict=True):
        if dict(after.point)["heads"] != "bias-based":  # not read: the key is as before
            assert after.config["select_bias_lr"] == 0.01 and after.key == before.key
        else:
            assert after.config["select_bias_lr"] == 0.01 and after.key != before.key
    biased = {"task": "clutrr", "heads": "bias-based", "bias_lr": 0.05, "select_bias_lr": None}
    assert config_key("lofit", biased) == config_key(
        "lofit", {k: v for k, v in biased.items() if k != "select_bias_lr"}
    )
    assert ranking_key(biased) != ranking_key(biased | {"bias_lr": 0.1})  # selection at the step-2 rate
    own_rate = biased | {"select_bias_lr": 1e-2}  # its own rate: every step-2 rate shares one ranking
    assert ranking_key(own_rate) == ranking_key(own_rate | {"bias_lr": 0.1})
    assert ranking_key(own_rate) != ranking_key(own_rate | {"select_bias_lr": 2e-2})
