"""Checkpoints: adapter + value head + trainer state, optimizer/scheduler/RNG through Accelerate.

Layout of ``output_dir/checkpoints/step-N/``:
    adapter_model.safetensors, adapter_config.json   PEFT adapter (PeftModel.from_pretrained works)
    value_head.safetensors                            when the run has a critic
    trainer_state.json                                step, KL controller, baseline, data order
    accelerate/                                       optimizer, scheduler, RNG of every process
A checkpoint is written to ``.tmp-step-N`` and renamed, so ``step-N`` is always complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from rlhf.errors import CheckpointError

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"
VALUE_HEAD_FILE = "value_head.safetensors"


def skip_model_weights_in_accelerate_state(accelerator: Any) -> None:
    """Accelerate would save the full base model with every checkpoint (~0.5 GB for 135M params);
    the frozen base never changes, so only the adapter and value head are saved, by us."""

    def drop_weights_on_save(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def drop_models_on_load(models: list, input_dir: str) -> None:
        models.clear()

    accelerator.register_save_state_pre_hook(drop_weights_on_save)
    accelerator.register_load_state_pre_hook(drop_models_on_load)


def save_adapter_and_head(policy: PeftModel, value_head: torch.nn.Module | None, directory: Path,
                          full_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter (PEFT layout) and value head. ``full_state`` is the gathered state dict of
    the whole PolicyWithValue when weights are sharded (ZeRO-3, FSDP): the local modules then hold
    only this process's shards."""
    def part(prefix: str) -> dict[str, torch.Tensor] | None:
        if full_state is None:
            return None
        return {key[len(prefix):]: value for key, value in full_state.items() if key.startswith(prefix)}

    policy.save_pretrained(directory, safe_serialization=True, state_dict=part("policy."))
    if value_head is not None:
        head_state = part("value_head.") or value_head.state_dict()
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in head_state.items()}
        save_file(tensors, str(directory / VALUE_HEAD_FILE))


def save_checkpoint(accelerator: Any, policy: PeftModel, value_head: torch.nn.Module | None,
                    trainer_state: dict[str, Any], checkpoints_dir: Path, step: int, total_limit: int | None,
                    full_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``step-<step>`` atomically (all processes must call this)."""
    final = checkpoints_dir / f"step-{step}"
    staging = checkpoints_dir / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging / "accelerate"))
    if accelerator.is_main_process:
        save_adapter_and_head(policy, value_head, staging, full_state)
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        _rotate(checkpoints_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _rotate(checkpoints_dir: Path, total_limit: int | None) -> None:
    if total_limit is None:
        return
    complete = list_checkpoints(checkpoints_dir)
    for old in complete[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints (those with trainer_state.json), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: Path) -> Path:
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir / "checkpoints")
        if not checkpoints:
            raise CheckpointError(f"resume_from_checkpoint=latest but {output_dir / 'checkpoints'} has no complete checkpoint")
        return checkpoints[-1]
    path = Path(spec)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{spec} is not a complete checkpoint (no {TRAINER_STATE}); use a checkpoints/step-N dir or 'latest'")
    return path


def load_checkpoint(accelerator: Any, policy: PeftModel, value_head: torch.nn.Module | None, path: Path,
                    expected: dict[str, Any]) -> dict[str, Any]:
    """Restore weights, optimizer/scheduler/RNG; returns the saved trainer state.

    ``expected`` holds the settings that must match (model, LoRA shape, algorithm); a mismatch is
    a CheckpointError naming the key, because continuing would silently train something else.
    """
    state = json.loads((path / TRAINER_STATE).read_text())
    saved = state.get("compatibility", {})
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise CheckpointError(f"checkpoint {path} was trained with {key}={saved[key]!r}, this run has {value!r}")
    adapter_file = path / "adapter_model.safetensors"
    if not adapter_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no adapter_model.safetensors")
    try:
        result = set_peft_model_state_dict(policy, load_file(str(adapter_file)))
    except RuntimeError as exc:
        raise CheckpointError(f"adapter in {path} does not fit this model: {str(exc).splitlines()[0]}") from None
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"adapter in {path} has weights this model lacks: {result.unexpected_keys[:3]}")
    if value_head is not None:
        head_file = path / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise CheckpointError(f"checkpoint {path} has no {VALUE_HEAD_FILE} but this run trains a value head")
        value_head.load_state_dict(load_file(str(head_file)))
    accelerator.load_state(str(path / "accelerate"))
    return state


def encode_python_rng(state: tuple) -> list:
    """``random.getstate()`` as JSON-safe lists (trainer_state.json holds no pickles)."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def decode_python_rng(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
