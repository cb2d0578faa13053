"""LoRA (Hu et al., 2022) through the ``peft`` library: W x + (alpha / r) B A x on the target modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from ..architectures import architecture_row
from .base import FitContext, FitResult, Method, check_geometry, check_training_options, read_method_file, train_adapter, write_method_file


@dataclass
class LoraBaselineConfig:
    lora_rank: int = field(default=8, metadata={"help": "LoRA: rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA: alpha (the update is scaled by alpha / r)"})
    lora_targets: str | None = field(default=None, metadata={"help": "LoRA: comma-separated module names (default: the architecture table's, else peft's choice; q and v projections for Llama)"})
    lora_lr: float = field(default=5e-4, metadata={"help": "LoRA: learning rate"})
    lora_epochs: int | None = field(default=None, metadata={"help": "LoRA: epochs (default: LoFiT's select + tune epochs, an equal budget)"})

    def __post_init__(self) -> None:
        check_training_options("lora", self.lora_lr, self.lora_epochs)
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(f"lora_rank must be >= 1 and lora_alpha > 0; got {self.lora_rank} and {self.lora_alpha}")


class Lora(Method):
    """Low-rank updates of the chosen weight matrices, trained with peft on the task loss."""

    name = "lora"
    config_class = LoraBaselineConfig

    def fit(self, context: FitContext) -> FitResult:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(context.lofit.seed)
        if self.config.lora_targets:
            targets = [t.strip() for t in self.config.lora_targets.split(",")]
        else:  # the table's choice, or peft's own default for the architecture
            row_targets = architecture_row(context.model.config.model_type).lora_targets
            targets = list(row_targets) if row_targets else None
        config = LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.lora_alpha, target_modules=targets,
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(context.model, config)  # injects the LoRA layers into context.model itself
        parameters = [p for p in model.parameters() if p.requires_grad]
        return train_adapter(model, parameters, self.config.lora_lr, self.config.lora_epochs, context, "LoRA: training")

    def save(self, result: FitResult, directory: Path, metrics: dict | None = None) -> None:
        result.model.save_pretrained(directory)  # peft: adapter_model.safetensors + adapter_config.json
        write_method_file(directory, self, result.model.get_base_model(), metrics)

    @classmethod
    def load(cls, model: PreTrainedModel, directory: Path) -> nn.Module:
        from peft import PeftModel

        check_geometry(read_method_file(directory), model, directory)
        return PeftModel.from_pretrained(model, directory)
