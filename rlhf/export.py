"""Merge a trained adapter into its base and write a standalone Hugging Face model dir.

    python scripts/export.py --checkpoint outputs/ppo --output_dir outputs/ppo-merged [--dtype bfloat16]

``--checkpoint``: a run's output_dir (its final/), a final/ dir or a checkpoints/step-N dir. The
adapter's ``base_model_name_or_path`` names the base (the embedded model by its registered name, a
hub id, or a local dir). With an init_adapter the top-level adapter is already init + RL in one
LoRA of the original base (rlhf.adapters), so one merge gives the trained policy. The result is
what ``AutoModelForCausalLM.from_pretrained`` and inference servers load: safetensors weights,
config, the tokenizer with its chat template, and a generation_config whose ``eos_token_id`` is
the full set of ids that end a response in training (rlhf.models.stop_token_ids). The value head
(PPO's critic) is not part of the policy and is not exported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rlhf.card import EVALUATION_FILE, read_evaluation, read_run_for_card, render_model_card
from rlhf.errors import CheckpointError, ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_export_keeps_its_inputs(target: Path, adapter_dir: Path, base: str) -> None:
    """ConfigError when writing ``target`` would replace the adapter being merged or the base model
    it is merged into: the dir itself or a dir holding it (its run). --overwrite replaces a dir
    whole, so the checkpoints, metrics or the base that other adapters name would be gone."""
    from rlhf.models import EMBEDDED_MODEL, resolve_model_path

    replaced = target.expanduser().resolve()
    inputs = {"the adapter it merges": adapter_dir}
    if base == EMBEDDED_MODEL or Path(base).expanduser().exists():  # not a hub id
        inputs["its base model"] = Path(resolve_model_path(base))
    for what, path in inputs.items():
        path = path.expanduser().resolve()
        if replaced == path or replaced in path.parents:
            raise ConfigError(f"output_dir {target} holds {what} ({path}); the export would replace it: "
                              "choose another output_dir")


def export_merged(checkpoint: str | Path, output_dir: str | Path, dtype: str = "float32",
                  overwrite: bool = False) -> Path:
    """Write the merged model to ``output_dir`` (atomically: a staging dir renamed at the end)."""
    from peft import PeftModel
    from transformers import GenerationConfig

    from rlhf.adapters import adapter_load_errors
    from rlhf.checkpoint import publish
    from rlhf.evaluate import resolve_candidate
    from rlhf.models import load_base_model, load_tokenizer, resolve_model_path, stop_token_ids

    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    candidate = resolve_candidate(str(checkpoint))
    if candidate.adapter_dir is None:
        raise CheckpointError(f"{checkpoint} is a model, not an adapter: there is nothing to merge")
    target = Path(output_dir)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"output_dir {target} is a file, not a folder; choose another output_dir")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"output_dir {target} is not empty; choose another or pass --overwrite true")
    check_export_keeps_its_inputs(target, candidate.adapter_dir, candidate.base)
    run = read_run_for_card(candidate.adapter_dir)  # a damaged run config.yaml is refused before the merge
    base = load_base_model(candidate.base)
    with adapter_load_errors(f"adapter {candidate.adapter_dir}", f"does not fit its base {candidate.base!r}"):
        merged = PeftModel.from_pretrained(base, str(candidate.adapter_dir)).merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    has_tokenizer = (candidate.adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(candidate.adapter_dir) if has_tokenizer else candidate.base)
    stops = stop_token_ids(candidate.base, tokenizer)
    try:
        generation = GenerationConfig.from_pretrained(resolve_model_path(candidate.base))
    except OSError:
        generation = GenerationConfig.from_model_config(merged.config)
    generation.eos_token_id = stops if len(stops) > 1 else stops[0]
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    merged.generation_config = generation

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".tmp-{target.name}")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        evaluation = read_evaluation(candidate.adapter_dir)
        if evaluation is not None:  # measured on the adapter; the card says so
            shutil.copyfile(candidate.adapter_dir / EVALUATION_FILE, staging / EVALUATION_FILE)
        if run is not None:
            (staging / "README.md").write_text(render_model_card(*run, merged=True, evaluation=evaluation))
        elif (candidate.adapter_dir / "README.md").is_file():
            shutil.copyfile(candidate.adapter_dir / "README.md", staging / "README.md")
        tokenizer.padding_side = "right"  # the usual default for inference servers; training pads left
        tokenizer.save_pretrained(staging)
        publish(staging, target)
    except OSError as exc:
        raise CheckpointError(f"could not write {target}: {exc.strerror or exc}") from None
    return target
