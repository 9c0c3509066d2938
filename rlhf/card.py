"""The model card of a trained adapter (final/) or an export, rendered from the run with
huggingface_hub's ModelCard and the template in rlhf/templates/model_card.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
# What a reader needs to know to reproduce or judge the run, in this order.
KEY_SETTINGS = ("advantage_estimator", "policy_loss", "learning_rate", "num_generations", "rollout_batch_size",
                "mini_batch_size", "ppo_epochs", "kl_coef", "kl_estimator", "clip_range", "temperature",
                "max_new_tokens", "lora_r", "lora_alpha", "lora_target_modules", "seed")
KEY_METRICS = ("reward_mean", "reward_std", "kl", "entropy", "response_length_mean", "eos_rate", "eval/reward_mean",
               "eval/kl")


def render_model_card(settings: dict[str, Any], metrics: dict[str, Any] | None, steps: int,
                      merged: bool = False, algorithm: str | None = None) -> str:
    """The card's text. ``settings``: the run's config as plain data (RLConfig.to_dict / config.yaml);
    ``metrics``: the last metrics.jsonl row; ``merged``: an export (full model) rather than an adapter."""
    from huggingface_hub import ModelCard, ModelCardData

    base = str(settings.get("model_name_or_path", "unknown"))
    dataset = str(settings.get("dataset", "unknown"))
    algorithm = algorithm or _algorithm(settings)
    funcs = list(settings.get("reward_funcs") or [])
    weights = list(settings.get("reward_weights") or [1.0] * len(funcs))
    data = ModelCardData(
        base_model=base if "/" in base and not Path(base).exists() else None,
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        tags=["rlhf", algorithm.lower(), "lora" if not merged else "merged-lora"],
        datasets=[dataset] if "/" in dataset and not Path(dataset).exists() else None,
    )
    shown = [(name, metrics[name]) for name in KEY_METRICS
             if metrics and isinstance(metrics.get(name), (int, float)) and math.isfinite(metrics[name])]
    if merged:
        usage = ("A standalone model: `AutoModelForCausalLM.from_pretrained(<this dir>)`; the generation config "
                 "lists every token id that ended a response in training.")
    else:
        usage = (f"A LoRA adapter: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), "
                 "<this dir>)`, or merge it into a standalone model with `python scripts/export.py --checkpoint "
                 "<this dir> --output_dir merged`.")
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE),
        title=f"{algorithm} fine-tune of {base}",
        summary=f"{'A merged model' if merged else 'A LoRA adapter'} trained for {steps} RL steps with {algorithm} "
                f"on `{dataset}`, scored by {', '.join(f'`{f}`' for f in funcs) or 'no reward function'}.",
        base_model_name=base, algorithm=algorithm, steps=steps, dataset_name=dataset,
        hyperparameters=[(key, settings[key]) for key in KEY_SETTINGS if settings.get(key) is not None],
        rewards=list(zip(funcs, weights)), metrics=[(name, f"{value:.4g}") for name, value in shown],
        metrics_step=(metrics or {}).get("step"), usage=usage)
    return str(card)


def _algorithm(settings: dict[str, Any]) -> str:
    estimator, loss = settings.get("advantage_estimator"), settings.get("policy_loss")
    if settings.get("update_method") == "trpo":
        return "TRPO"
    if estimator == "gae":
        return "PPO" if loss == "ppo_clip" else f"actor-critic ({loss})"
    return f"{str(estimator).upper()} ({loss})" if estimator else "RL"


def read_run_settings(adapter_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(run dir, its config.yaml as data) of the run an adapter dir belongs to (final/ or
    checkpoints/step-N inside a run dir), or None when there is no readable config.yaml."""
    import yaml

    for run_dir in (adapter_dir.parent, adapter_dir.parent.parent):
        config_file = run_dir / "config.yaml"
        if config_file.is_file():
            try:
                settings = yaml.safe_load(config_file.read_text()) or {}
            except yaml.YAMLError:
                return None
            return run_dir, settings if isinstance(settings, dict) else {}
    return None


def read_run_for_card(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None, int] | None:
    """(settings, metrics row of the adapter's step, steps) of its run, or None (read_run_settings)."""
    run = read_run_settings(adapter_dir)
    if run is None:
        return None
    run_dir, settings = run
    at_step = _checkpoint_step(adapter_dir)  # a checkpoints/step-N dir: that step, not the run's last
    metrics = None
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and (at_step is None or (row.get("step") or 0) <= at_step):
                metrics = row
    steps = at_step if at_step is not None else int((metrics or {}).get("step") or 0)
    return settings, metrics, steps


def _checkpoint_step(adapter_dir: Path) -> int | None:
    try:
        step = json.loads((adapter_dir / "trainer_state.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
