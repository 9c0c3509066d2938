"""The transformers Trainer keys of the scripts that wrap a TRL Trainer (reward model, DPO).

A TRL user passes ``--max_steps 2 --per_device_train_batch_size 4 --report_to tensorboard`` to
train_reward_model.py and train_dpo.py as to any Trainer; ``trainer_kwargs`` hands them on to
the TrainingArguments (RewardConfig / DPOConfig) those scripts build.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from rlhf.errors import ConfigError

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
REPORT_TARGETS = ("none", "tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "all")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainerKeys:
    """Trainer settings, under the Trainer's names and with its meanings."""

    num_train_epochs: float = _f(1.0, "Passes over the training pairs (max_steps > 0 overrides it).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1 = run num_train_epochs).")
    learning_rate: float = _f(5e-5, "AdamW learning rate.")
    per_device_train_batch_size: int = _f(8, "Pairs per device per step.")
    gradient_accumulation_steps: int = _f(1, "Steps to accumulate before an update.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    lr_scheduler_type: str = _f("linear", f"Learning-rate schedule: one of {', '.join(LR_SCHEDULERS)}.")
    warmup_steps: float = _f(0.0, "Linear warm-up: optimizer steps, or a fraction in (0, 1) of all steps (TRL: warmup_ratio).")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0 = no clipping).")
    logging_steps: int = _f(5, "Log the training loss every this many steps.")
    save_steps: int = _f(0, "Save a Trainer checkpoint (output_dir/checkpoint-N) every this many steps (0 = none).")
    save_total_limit: int | None = _f(None, "Keep at most this many checkpoints (none = all).")
    report_to: list[str] = _f(["none"], f"Trackers besides metrics.jsonl: {', '.join(REPORT_TARGETS)}.")
    seed: int = _f(42, "Random seed.")
    bf16: bool = _f(False, "Train in bfloat16 (TRL's default; needs a GPU or a CPU with bf16 support).")
    gradient_checkpointing: bool = _f(False, "Recompute activations to save memory (TRL defaults to on; about 20 percent slower).")

    def check_trainer_keys(self) -> None:
        # nan passes every comparison below, and trained on (a reviewer's --beta nan, --learning_rate nan)
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{setting.name} must be a finite number, got {value}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_train_epochs <= 0 or self.learning_rate <= 0:
            raise ConfigError("num_train_epochs and learning_rate must be > 0")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be >= 1, or -1 for num_train_epochs, got {self.max_steps}")
        if self.warmup_steps < 0 or (self.warmup_steps >= 1 and not float(self.warmup_steps).is_integer()):
            raise ConfigError(f"warmup_steps must be a whole number of steps or a fraction in [0, 1), got {self.warmup_steps}")
        for name in ("weight_decay", "max_grad_norm", "save_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be >= 1 or none, got {self.save_total_limit}")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ConfigError(f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of: {', '.join(LR_SCHEDULERS)}")
        for target in self.report_to:
            if target not in REPORT_TARGETS:
                raise ConfigError(f"report_to {target!r} is not one of: {', '.join(REPORT_TARGETS)}")


def trainer_kwargs(config: TrainerKeys) -> dict[str, Any]:
    """The TrainingArguments keywords of ``config`` (our save_steps 0 = the Trainer's save_strategy "no")."""
    warmup = int(config.warmup_steps) if config.warmup_steps >= 1 else config.warmup_steps
    targets = [t for t in config.report_to if t != "none"]
    return {
        "num_train_epochs": config.num_train_epochs, "max_steps": config.max_steps,
        "learning_rate": config.learning_rate, "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps, "weight_decay": config.weight_decay,
        "lr_scheduler_type": config.lr_scheduler_type, "warmup_steps": warmup, "max_grad_norm": config.max_grad_norm,
        "logging_steps": config.logging_steps, "save_strategy": "steps" if config.save_steps else "no",
        **({"save_steps": config.save_steps} if config.save_steps else {}),
        "save_total_limit": config.save_total_limit, "report_to": targets or "none", "seed": config.seed,
        "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
    }
