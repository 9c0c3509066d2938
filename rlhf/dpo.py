"""DPO (Rafailov et al. 2023) with TRL's DPOTrainer on a LoRA adapter of the policy model.

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

The reference is the same model with the adapter switched off (TRL does this for PEFT models), so
one copy of the weights is in memory. The output ``final/`` is a PEFT adapter: the RL scripts
start from it with ``--init_adapter``, and evaluation loads it like any RL adapter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import save_config
from rlhf.errors import ConfigError
from rlhf.tracking import write_trainer_log
from rlhf.trainer_keys import TrainerKeys, trainer_kwargs

# The pairwise losses of TRL 1.x's DPOTrainer (DPOConfig.loss_type).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DPORunConfig(TrainerKeys):
    """Keys of scripts/train_dpo.py (YAML or CLI); the Trainer's keys come from TrainerKeys."""

    model_name_or_path: str = _f("smollm2-135m-instruct", "Policy base: 'smollm2-135m-instruct' (embedded), a local dir, or a hub id.")
    dataset: str = _f("builtin:preferences", "Preference pairs in TRL's formats (prompt, chosen, rejected, or chosen "
                      "and rejected that begin with the prompt; strings or chat messages): jsonl/json/csv/parquet, "
                      "datasets dir, hub id, or builtin:preferences.")
    eval_dataset: str | None = _f(None, "Held-out pairs for preference accuracy (default: the eval split of the built-in set).")
    output_dir: str = _f("outputs/dpo", "Where final/ (the PEFT adapter), metrics.jsonl and config.yaml go.")
    overwrite_output_dir: bool = _f(False, "Allow replacing an existing DPO run.")
    beta: float = _f(0.1, "DPO temperature beta: strength of the implicit KL to the reference.")
    loss_type: str = _f("sigmoid", f"TRL loss: one of {', '.join(DPO_LOSS_TYPES)}.")
    learning_rate: float = _f(2e-4, "AdamW learning rate of the LoRA weights.")
    per_device_eval_batch_size: int = _f(16, "Pairs per device per evaluation step.")
    max_length: int = _f(256, "Truncate prompt + reply to this many tokens.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling numerator.")
    lora_target_modules: list[str] = _f(["all-linear"], "Modules that get LoRA adapters.")

    def __post_init__(self) -> None:
        self.check_trainer_keys()
        for name in ("per_device_eval_batch_size", "max_length", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0 (typical 0.1), got {self.beta}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"loss_type {self.loss_type!r} is not one of: {', '.join(DPO_LOSS_TYPES)}")


def train_dpo(config: DPORunConfig) -> dict[str, float]:
    """Evaluate, train, evaluate, save final/; returns the metrics also written to metrics.jsonl."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from rlhf.cpu_linear import check_cpu_settings
    from rlhf.cpu_memory import freed_memory_kept
    from rlhf.data import load_preference_dataset
    from rlhf.models import load_base_model, load_tokenizer

    check_cpu_settings()
    output_dir = Path(config.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not config.overwrite_output_dir:
        raise ConfigError(f"output_dir {output_dir} is not empty; choose another or pass --overwrite_output_dir true")
    train_pairs = load_preference_dataset(config.dataset, "train")
    eval_spec = config.eval_dataset or ("builtin:preferences" if config.dataset.startswith("builtin:") else None)
    eval_pairs = load_preference_dataset(eval_spec, "eval") if eval_spec else None

    tokenizer = load_tokenizer(config.model_name_or_path)
    train_pairs = _pairs_as_the_policy_reads_them(train_pairs, tokenizer, config.dataset, config.model_name_or_path)
    if eval_pairs is not None:
        eval_pairs = _pairs_as_the_policy_reads_them(eval_pairs, tokenizer, eval_spec, config.model_name_or_path)
    model = load_base_model(config.model_name_or_path, bf16=config.bf16)
    targets: Any = "all-linear" if config.lora_target_modules == ["all-linear"] else config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=str(output_dir), beta=config.beta, loss_type=[config.loss_type],
                     per_device_eval_batch_size=config.per_device_eval_batch_size, max_length=config.max_length,
                     **trainer_kwargs(config))
    try:
        trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=train_pairs,
                             eval_dataset=eval_pairs, peft_config=lora)
    except ValueError as exc:  # e.g. LoRA target modules the model does not have
        raise ConfigError(f"DPO setup failed: {str(exc).strip().splitlines()[0]}") from None

    with freed_memory_kept(trainer.accelerator.device.type):  # its logits' buffers reused, not faulted in afresh
        before = _preference_metrics(trainer, "before") if eval_pairs is not None else {}
        start = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - start
        after = _preference_metrics(trainer, "after") if eval_pairs is not None else {}

    trainer.save_model(str(output_dir / "final"))  # the PEFT adapter + tokenizer, written by the main process
    final = {**before, **after, "train_time_s": train_time, "train_steps": trainer.state.global_step}
    if trainer.accelerator.is_main_process:
        write_trainer_log(output_dir, trainer.state.log_history, final,
                          {"loss": "loss", "epoch": "epoch", "accuracy": "rewards/accuracies", "margin": "rewards/margins"})
        save_config(config, output_dir / "config.yaml")
    return final


def _pairs_as_the_policy_reads_them(pairs: Any, tokenizer: Any, dataset: str, model: str) -> Any:
    """Text pairs framed as RL's rollouts frame a text prompt (``format_prompt``): through the chat
    template when the tokenizer has one, else raw text, which TRL trains as its standard format
    (prompt + reply + EOS)."""
    from rlhf.data import preference_conversations

    if tokenizer.chat_template:
        return preference_conversations(pairs)
    if not isinstance(pairs[0]["chosen"], str):
        raise ConfigError(f"preference pairs of {dataset} are chat messages but the tokenizer of {model!r} has no "
                          "chat template to render them; give prompt, chosen and rejected as strings (trained as "
                          "plain text) or use a model with a chat template")
    return pairs


def _preference_metrics(trainer: Any, when: str) -> dict[str, float]:
    """Held-out accuracy = share of pairs whose implicit reward margin
    beta * (log-ratio(chosen) - log-ratio(rejected)) is > 0. Before training the policy equals
    the reference, so every margin is exactly 0 and the accuracy 0."""
    metrics = trainer.evaluate()
    return {f"eval_accuracy_{when}": metrics["eval_rewards/accuracies"],
            f"eval_margin_{when}": metrics["eval_rewards/margins"], f"eval_loss_{when}": metrics["eval_loss"]}

