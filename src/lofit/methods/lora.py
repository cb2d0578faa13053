"""LoRA (Hu et al., 2022) through the ``peft`` library: W x + (alpha / r) B A x on the target modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import PreTrainedModel

from lofit.data.files import finite_number, short_repr
from lofit.methods.base import (
    FitContext,
    FitResult,
    Method,
    check_geometry,
    check_training_options,
    load_tensors,
    read_method_file,
    seeded,
    train_adapter,
    write_method_file,
)
from lofit.methods.lofit.adapter_io import AdapterError, read_json_object
from lofit.models.architectures import architecture_row, attention_inputs
from lofit.models.wrapper import restored_on_failure
from lofit.utils.atomic import staged_folder

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraBaselineConfig:
    lora_rank: int = field(default=8, metadata={"help": "LoRA: rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA: alpha (the update is scaled by alpha / r)"})
    lora_targets: str | None = field(
        default=None,
        metadata={
            "help": (
                "LoRA: comma-separated module names (default: the architecture table's, else peft's choice; q and "
                "v projections for Llama)"
            )
        },
    )
    lora_lr: float = field(default=5e-4, metadata={"help": "LoRA: learning rate"})
    lora_epochs: int | None = field(
        default=None, metadata={"help": "LoRA: epochs (default: LoFiT's select + tune epochs, an equal budget)"}
    )

    def __post_init__(self) -> None:
        check_training_options("lora", self.lora_lr, self.lora_epochs)
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(f"lora_rank must be >= 1 and lora_alpha > 0; got {self.lora_rank} and {self.lora_alpha}")


def default_targets(model: PreTrainedModel) -> list[str] | str:
    """The modules LoRA adapts when none are given: the architecture row's ``lora_targets``;
    else peft's default for the model type (named here, not left to peft, which drops its
    own default for mixtral); else the attention's input projections (q/k/v or a fused qkv,
    :func:`lofit.models.architectures.attention_inputs`). A str is a regular expression, as in peft."""
    row_targets = architecture_row(model).lora_targets
    if row_targets:
        return list(row_targets)
    peft_default = PEFT_DEFAULTS.get(model.config.model_type)
    if isinstance(peft_default, str):
        return peft_default
    return list(peft_default or attention_inputs(model))


class Lora(Method):
    """Low-rank updates of the chosen weight matrices, trained with peft on the task loss."""

    name = "lora"
    config_class = LoraBaselineConfig

    def fit(self, context: FitContext) -> FitResult:
        if self.config.lora_targets:
            targets = [t.strip() for t in self.config.lora_targets.split(",")]
        else:
            targets = default_targets(context.model)
        config = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with seeded(context.lofit.seed):  # LoRA's A matrices are drawn at random
            model = get_peft_model(context.model, config)  # injects the LoRA layers into context.model itself
        parameters = [p for p in model.parameters() if p.requires_grad]
        return train_adapter(
            model, parameters, self.config.lora_lr, self.config.lora_epochs, context, "LoRA: training", "lora"
        )

    def save(self, result: FitResult, directory: Path, metrics: dict | None = None) -> None:
        """peft writes its files into a staging folder, moved into ``directory`` with ours when
        all are complete (see :func:`lofit.utils.atomic.staged_folder`)."""
        with staged_folder(directory) as staging:
            result.model.save_pretrained(str(staging))  # peft: adapter_model.safetensors + adapter_config.json
            write_method_file(staging, self, result.model.get_base_model(), metrics)

    @classmethod
    def load(cls, model: PreTrainedModel, directory: Path) -> nn.Module:
        """peft's LoRA layers built from the checked config, then the checked weights loaded
        into them; a refused load puts ``model`` back as it was (module tree, ``requires_grad``)."""
        check_geometry(read_method_file(directory), model, directory)
        config = _saved_lora_config(directory)
        with restored_on_failure(model):
            try:
                adapted = get_peft_model(model, config)
            except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as error:
                raise AdapterError(f"{directory / PEFT_CONFIG}: this LoRA does not fit the model ({error})") from None
            shapes = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(adapted).items()}
            set_peft_model_state_dict(adapted, load_tensors(directory, PEFT_WEIGHTS, shapes))
        return adapted.eval()


def _saved_lora_config(directory: Path):
    """The peft LoraConfig saved in ``directory`` (inference mode), its key fields checked."""
    path = directory / PEFT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} does not hold a complete saved LoRA")
    values = read_json_object(path)
    if values.get("peft_type") != "LORA":
        raise AdapterError(
            f"{path} is not a LoRA config: peft_type is {short_repr(values.get('peft_type'))}, not 'LORA'"
        )
    rank, alpha, targets = values.get("r"), values.get("lora_alpha"), values.get("target_modules")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise AdapterError(f"{path}: r must be an integer >= 1, got {short_repr(rank)}")
    if not finite_number(alpha):
        raise AdapterError(f"{path}: lora_alpha must be a finite number, got {short_repr(alpha)}")
    if not (
        isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise AdapterError(f"{path}: target_modules must be a module name or a list of them, got {short_repr(targets)}")
    try:
        config = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**values))
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise AdapterError(f"{path} is not a valid LoRA config ({error})") from None
    config.inference_mode = True
    return config
