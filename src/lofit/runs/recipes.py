"""Named sets of option values (``--recipe NAME``): presets a run starts from, below any option given.

``paper`` reproduces the settings of the original code (github fc2869/lo-fit) for its
Llama-2-7B runs, the uncommented lines of ``train_script_<task>.sh``, which call
``lofit_trainer.py`` once for step 1 (``--lofit_component A``) and once for step 2
(``--lofit_component v``). Each value below names the line it comes from. What the
scripts do not set is the Hugging Face ``TrainingArguments`` default that
``lofit_trainer.py`` leaves in place: AdamW, linear decay, no warm-up, no weight decay,
gradient clipping at norm 1.0; A and v are initialised from N(0, 1e-3)
(``nn.init.normal_(module, mean=0, std=1e-3)`` in ``lofit_trainer.py``).
K is 32 of Llama-2-7B's 1,024 heads (``--use_topk_heads 32`` in step 2), kept here as the
fraction 32 / 1024 of the model's heads.
"""

from __future__ import annotations

from typing import Any

PAPER_SHARED: dict[str, Any] = {
    "batch_size": 8,  # --train_batch 8 (both steps)
    "select_epochs": 5,  # step 1: --num_epoch 5
    "tune_epochs": 5,  # step 2: --num_epoch 5
    "num_heads": 32 / 1024,  # step 2: --use_topk_heads 32, of 32 layers x 32 heads
    "selection": "l1",  # step 1: loss + l1_lambda * sum |A| (utils/trainers.py, compute_loss)
    "init_std": 1e-3,  # lofit_trainer.py: nn.init.normal_(attn_A, mean=0, std=1e-3)
    "bias_init_std": 1e-3,  # lofit_trainer.py: nn.init.normal_(attn_v, mean=0, std=1e-3)
    "max_grad_norm": 1.0,  # TrainingArguments default (not set by the scripts)
    "weight_decay": 0.0,  # TrainingArguments default
    "warmup_ratio": 0.0,  # TrainingArguments default
    "seed": 42,  # seed=42
}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "clutrr": PAPER_SHARED
        | {
            "scale_lr": 5e-4,  # train_script_clutrr.sh, step 1: --lr 5e-4
            "l1_lambda": 5e-3,  # step 1: --l1_lambda 5e-3
            "bias_lr": 1e-2,  # step 2: --lr 1e-2
            "train_size": 300,  # --train_size 300 (both steps)
        },
        "mquake": PAPER_SHARED
        | {
            "scale_lr": 5e-3,  # train_script_mquake.sh, step 1: --lr 5e-3
            "l1_lambda": 1e-3,  # step 1: --l1_lambda 1e-3
            "bias_lr": 1e-2,  # step 2: --lr 1e-2
        },
        "truthfulqa": PAPER_SHARED
        | {
            "scale_lr": 5e-3,  # train_script_truthfulqa.sh, step 1: --lr 5e-3
            "l1_lambda": 5e-4,  # step 1: --l1_lambda 5e-4
            "bias_lr": 1e-2,  # step 2: --lr 1e-2
            "beta": 0.5,  # lofit_trainer.py: --dpo_beta default 0.5
        },
    },
}
"""Each recipe: task -> option values (flat option names, as on the command line)."""


def recipe_options(name: str | None, task: str) -> dict[str, Any]:
    """The option values of recipe ``name`` for ``task`` ({} without a recipe); a ValueError
    naming the recipes, or the tasks a recipe covers."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    if task not in RECIPES[name]:
        raise ValueError(f"recipe {name!r} covers the tasks {', '.join(RECIPES[name])}, not {task!r}")
    return dict(RECIPES[name][task])


def with_recipe(options: dict[str, Any], default_task: str) -> dict[str, Any]:
    """``options`` over the values of the recipe they name (``recipe``), if any: a value given
    explicitly always wins over the recipe's."""
    return recipe_options(options.get("recipe"), options.get("task", default_task)) | options
