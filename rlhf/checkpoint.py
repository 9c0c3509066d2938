"""Checkpoints: adapter + value head + trainer state, optimizer/scheduler/RNG through Accelerate.

Layout of ``output_dir/checkpoints/step-N/``:
    adapter_model.safetensors, adapter_config.json   PEFT adapter (PeftModel.from_pretrained works)
    init_adapter/, rl_adapter/                        runs with an init_adapter (rlhf.adapters): the
                                                      adapter above is then init + RL concatenated
    value_head.safetensors                            when the run has a critic
    trainer_state.json                                step, KL controller, baseline, data order
    accelerate/                                       optimizer, scheduler, RNG of every process
A checkpoint is written to ``.tmp-step-N``, fsynced and renamed, so ``step-N`` is always complete.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlhf.adapters import INIT_ADAPTER_DIR, RL_ADAPTER_DIR, SavedLora, concatenate_loras
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
                          full_state: dict[str, torch.Tensor] | None = None,
                          init_adapter: SavedLora | None = None) -> None:
    """Write the adapter (PEFT layout) and value head. ``full_state`` is the gathered state dict of
    the whole PolicyWithValue when weights are sharded (ZeRO-3, FSDP): the local modules then hold
    only this process's shards. With ``init_adapter`` (merged into the base for training) the
    top-level adapter is init + RL in one LoRA, so it loads on the original base as the trained
    policy; ``init_adapter/`` and ``rl_adapter/`` keep the parts (rlhf.adapters)."""
    def part(prefix: str) -> dict[str, torch.Tensor] | None:
        if full_state is None:
            return None
        return {key[len(prefix):]: value for key, value in full_state.items() if key.startswith(prefix)}

    if init_adapter is None:
        # peft would also save the frozen base weight of an adapted lm_head/embed_tokens (vocab x hidden,
        # GBs for an untied Llama-3 head) in every checkpoint; the base has it, and an adapter holding it
        # could not be a later run's init_adapter (rlhf.adapters accepts LoRA tensors only).
        policy.save_pretrained(directory, safe_serialization=True, state_dict=part("policy."),
                               save_embedding_layers=False)
    else:
        rl_dir = directory / RL_ADAPTER_DIR
        # The frozen embedding weights peft adds when embed_tokens/lm_head carry LoRA are the merged base's
        # own: not part of the RL LoRA (and no LoRA tensor to concatenate).
        policy.save_pretrained(rl_dir, safe_serialization=True, state_dict=part("policy."), save_embedding_layers=False)
        rl_adapter = SavedLora(policy.peft_config["default"], load_file(str(rl_dir / "adapter_model.safetensors")))
        concatenate_loras(init_adapter, rl_adapter).save(directory)
        init_adapter.save(directory / INIT_ADAPTER_DIR)
    if value_head is not None:
        head_state = part("value_head.") or value_head.state_dict()
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in head_state.items()}
        save_file(tensors, str(directory / VALUE_HEAD_FILE))


def write_atomically(accelerator: Any, final: Path, write_on_main: Callable[[Path], None],
                     write_on_every_process: Callable[[Path], None] | None = None) -> Path:
    """Build ``final`` in ``.tmp-<name>`` next to it, fsync, rename (all processes must call this).

    Leftover staging dirs of killed saves are removed first. A crash at any moment leaves the
    earlier version of ``final`` (if any) complete; a failed write (disk full, no permission)
    removes the staging dir and raises CheckpointError on every process, so none of them waits
    forever at the next barrier.
    """
    staging = final.with_name(f".tmp-{final.name}")
    error: OSError | None = None
    try:
        if accelerator.is_main_process:
            _remove_leftovers(final.parent, final.name)
            staging.mkdir(parents=True)
    except OSError as exc:
        error = exc
    _raise_if_any_failed(accelerator, error, final, staging)
    if write_on_every_process is not None:
        try:
            write_on_every_process(staging)
        except OSError as exc:
            error = exc
        _raise_if_any_failed(accelerator, error, final, staging)
    try:
        if accelerator.is_main_process:
            write_on_main(staging)
            fsync_tree(staging)
            publish(staging, final)
    except OSError as exc:
        error = exc
    _raise_if_any_failed(accelerator, error, final, staging)
    return final


def save_checkpoint(accelerator: Any, policy: PeftModel, value_head: torch.nn.Module | None,
                    trainer_state: dict[str, Any], checkpoints_dir: Path, step: int, total_limit: int | None,
                    full_state: dict[str, torch.Tensor] | None = None, init_adapter: SavedLora | None = None,
                    after_state_saved: Callable[[Path], None] | None = None, tokenizer: Any = None) -> Path:
    """Write ``checkpoints_dir/step-<step>`` atomically (``write_atomically``), then delete the
    complete checkpoints beyond ``total_limit``, oldest first. ``after_state_saved(dir)`` runs on
    every process once Accelerate wrote its state into ``dir``. ``tokenizer``: saved beside the
    adapter, as in final/ (its chat template is how the run wrote prompts; evaluate.py reads it)."""
    def write_weights_and_state(staging: Path) -> None:
        save_adapter_and_head(policy, value_head, staging, full_state, init_adapter)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))

    def write_accelerate_state(staging: Path) -> None:
        accelerator.save_state(str(staging / "accelerate"))
        if after_state_saved is not None:
            after_state_saved(staging / "accelerate")

    final = write_atomically(accelerator, checkpoints_dir / f"step-{step}", write_weights_and_state,
                             write_on_every_process=write_accelerate_state)
    if accelerator.is_main_process:
        _rotate(checkpoints_dir, total_limit)
    return final


def _raise_if_any_failed(accelerator: Any, error: OSError | None, final: Path, staging: Path) -> None:
    """All processes learn whether any of them failed, so none waits forever at the next barrier."""
    failed = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if float(failed) == 0:
        return
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    reason = f"{error.strerror or error}" if error is not None else "another process failed to write its part"
    raise CheckpointError(f"could not write checkpoint {final}: {reason}; the earlier checkpoints are intact")


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk, so a later rename publishes
    complete data even after a power loss."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(staging: Path, final: Path) -> None:
    """Rename a complete ``staging`` dir to ``final``; an existing ``final`` is swapped out
    first and deleted last, so some complete version exists at every moment."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(parent: Path, name: str) -> None:
    """Staging (and swapped-out) dirs of a run killed mid-save are incomplete by definition: those
    of ``name`` and of any ``step-N`` in ``parent``, nothing else a user may keep there."""
    if parent.is_dir():
        for path in parent.iterdir():
            if path.name.startswith((".tmp-", ".old-")) and (
                    path.name[5:] == name or CHECKPOINT_PATTERN.match(path.name[5:])):
                shutil.rmtree(path, ignore_errors=True)


def _rotate(checkpoints_dir: Path, total_limit: int | None) -> None:
    if total_limit is None:
        return
    complete = list_checkpoints(checkpoints_dir)
    for old in complete[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The ``step-N`` checkpoints, oldest first. Saves are staged and renamed into place, so every
    one was complete when written; one whose trainer_state.json is gone or damaged is listed, so
    that resuming it reports the damage and a save never silently replaces it (``lineage``)."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: Path) -> Path:
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir / "checkpoints")
        if not checkpoints:
            raise CheckpointError(f"resume_from_checkpoint=latest but {output_dir / 'checkpoints'} has no complete checkpoint")
        return checkpoints[-1]
    path = Path(spec)
    if not (path / TRAINER_STATE).exists():
        raise CheckpointError(f"{spec} is not a complete checkpoint (no {TRAINER_STATE}); use a checkpoints/step-N dir or 'latest'")
    return path


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json, checked (one line naming what is wrong)."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: {TRAINER_STATE} unreadable ({exc}); restore it or "
                              "resume from another checkpoint with --resume_from_checkpoint DIR") from None
    _check_trainer_state(state, path / TRAINER_STATE)
    named = CHECKPOINT_PATTERN.match(path.name)
    if named and int(named.group(1)) != state["step"]:  # a copied or edited state: the resume would skip or redo steps
        raise CheckpointError(f"{path / TRAINER_STATE} is invalid: step is {state['step']} in the checkpoint of "
                              f"step {named.group(1)}; restore the file or resume from another checkpoint")
    return state


def load_checkpoint(accelerator: Any, policy: PeftModel, value_head: torch.nn.Module | None, path: Path,
                    expected: dict[str, Any]) -> dict[str, Any]:
    """Restore weights, optimizer/scheduler/RNG; returns the saved trainer state.

    ``expected`` holds the settings that must match (model, LoRA shape, algorithm); a mismatch is
    a CheckpointError naming the key, because continuing would silently train something else.
    """
    state = read_trainer_state(path)
    saved = state.get("compatibility", {})
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            hint = ("; the restored optimizer and learning-rate schedule keep the checkpoint's, so start a new run "
                    "(another output_dir) to change it" if key in OPTIMIZER_SETTINGS else "")
            raise CheckpointError(f"checkpoint {path} was trained with {key}={saved[key]!r}, this run has {value!r}{hint}")
    # With an init adapter the top-level adapter is init + RL concatenated; training resumes the RL part.
    adapter_dir = path / RL_ADAPTER_DIR if (path / RL_ADAPTER_DIR).is_dir() else path
    adapter_file = adapter_dir / "adapter_model.safetensors"
    if not adapter_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {adapter_file.relative_to(path)}")
    try:
        result = set_peft_model_state_dict(policy, load_file(str(adapter_file)))
    except SafetensorError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: adapter_model.safetensors unreadable ({exc})") from None
    except RuntimeError as exc:
        raise CheckpointError(f"adapter in {path} does not fit this model: {str(exc).splitlines()[0]}") from None
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"adapter in {path} has weights this model lacks: {result.unexpected_keys[:3]}")
    if value_head is not None:
        head_file = path / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise CheckpointError(f"checkpoint {path} has no {VALUE_HEAD_FILE} but this run trains a value head")
        try:
            value_head.load_state_dict(load_file(str(head_file)))
        except (SafetensorError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path}: {VALUE_HEAD_FILE} unreadable or of another shape ({exc})") from None
    _verify_state_files(path / "accelerate", accelerator.process_index)
    try:
        # Accelerate loads optimizer/scheduler/RNG with torch.load(weights_only=True): no pickled code runs.
        accelerator.load_state(str(path / "accelerate"))
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: optimizer/RNG state unreadable "
                              f"({str(exc).splitlines()[0][:200]})") from None
    return state


def _verify_state_files(state_dir: Path, process_index: int) -> None:
    """Accelerate logs and skips an RNG state it cannot load (the resume would then sample other
    responses than the uninterrupted run): check that this process's RNG state is there and that
    every torch-saved state file is a complete, uncorrupted archive (the zip CRCs) first."""
    import zipfile

    rng_file = state_dir / f"random_states_{process_index}.pkl"
    if not rng_file.is_file():
        raise CheckpointError(f"checkpoint {state_dir.parent} is corrupted: optimizer/RNG state unreadable "
                              f"({rng_file.name}, this process's RNG state, is missing); resume from another checkpoint")
    for file in sorted(state_dir.glob("*.bin")) + [rng_file]:
        try:
            damaged = zipfile.ZipFile(file).testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            damaged = f"not a complete archive ({exc})"
        if damaged:
            raise CheckpointError(f"checkpoint {state_dir.parent} is corrupted: optimizer/RNG state unreadable "
                                  f"({file.name}: {damaged}); resume from another checkpoint")
    _check_rng_state(rng_file)


def _check_rng_state(rng_file: Path) -> None:
    """Load the RNG states the way Accelerate's load_state does (which logs and skips one it cannot
    set, e.g. another state file copied over it) and set them on throwaway generators."""
    import random

    import numpy
    from accelerate.utils import load

    try:
        states = load(rng_file)
        random.Random().setstate(states["random_state"])
        numpy.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {rng_file.parent.parent} is corrupted: optimizer/RNG state unreadable "
                              f"({rng_file.name} is not an RNG state: {type(exc).__name__} {str(exc)[:100]}); "
                              "resume from another checkpoint") from None


def is_int(value: Any) -> bool:
    """An integer as JSON gives it (not a bool): for the checks of files read back."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A finite int or float as JSON gives it (not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_trainer_state(state: Any, file: Path) -> None:
    """A hand-edited trainer_state.json: one line naming the file and the entry, not a KeyError
    or TypeError from deep inside the resume."""
    import random

    def refuse(what: str) -> None:
        raise CheckpointError(f"{file} is invalid: {what}; restore the file or resume from another checkpoint")

    if not isinstance(state, dict):
        refuse(f"expected a JSON object, got {type(state).__name__}")
    if "step" not in state and "global_step" in state:  # transformers' Trainer writes global_step, log_history, ...
        raise CheckpointError(f"{file.parent} is a checkpoint of transformers' Trainer (TRL's checkpoint-N), not of "
                              "a run here, so it holds no RL state to resume; start a run with init_adapter "
                              f"{file.parent} to train on from its adapter")
    for key in ("step", "kl_controller", "baseline", "sampler", "python_rng"):
        if key not in state:
            refuse(f"no {key!r} entry")
    if not is_int(state["step"]) or state["step"] < 0:
        refuse(f"step must be an integer >= 0, got {state['step']!r}")
    skips = state.get("consecutive_skips", 0)
    if not is_int(skips) or skips < 0:
        refuse(f"consecutive_skips must be an integer >= 0, got {skips!r}")
    for key, fields in (("kl_controller", {"value": lambda v: is_finite_number(v) and v >= 0}),
                        ("baseline", {"value": is_finite_number, "initialized": lambda v: isinstance(v, bool)}),
                        ("sampler", {"epoch": lambda v: is_int(v) and v >= 0, "position": lambda v: is_int(v) and v >= 0})):
        entry = state[key]
        if not isinstance(entry, dict):
            refuse(f"{key} must be a JSON object, got {type(entry).__name__}")
        for name, ok in fields.items():
            if name not in entry or not ok(entry[name]):
                refuse(f"{key}.{name} is missing, of the wrong type or out of range ({entry.get(name)!r})")
    if "entropy_controller" in state:  # adaptive entropy control (use_adaptive_entropy)
        entry = state["entropy_controller"]
        if not isinstance(entry, dict) or not is_finite_number(entry.get("value")) or not (
                entry.get("last_entropy") is None or is_finite_number(entry.get("last_entropy"))):
            refuse(f"entropy_controller must hold a number value and a number or null last_entropy, got {entry!r}")
    if not isinstance(state.get("compatibility", {}), dict):
        refuse("compatibility must be a JSON object")
    if "lineage" in state:
        from rlhf.lineage import Lineage

        Lineage.from_dict(state["lineage"], file)
    try:
        random.Random().setstate(decode_python_rng(state["python_rng"]))
    except (TypeError, ValueError, OverflowError):
        refuse("python_rng is not a saved random-generator state")


def encode_python_rng(state: tuple) -> list:
    """``random.getstate()`` as JSON-safe lists (trainer_state.json holds no pickles)."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def decode_python_rng(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def check_output_dir(output_dir: Path, process_index: int, resuming: bool, overwrite: bool,
                     other_run: bool = True) -> Path | None:
    """Fail before the first step's compute when output_dir is not writable, and never write
    over another run's results (a resumed run continues its own; ``other_run`` False leaves that
    check to ``refuse_other_run`` later). Returns the outermost dir it created (None: output_dir
    was there), for ``remove_created_dirs`` if the start is refused."""
    from rlhf.errors import ConfigError

    absolute = Path(os.path.abspath(output_dir))  # "a/new/../out" makes a/out, not a/new
    created = next((path for path in reversed([absolute, *absolute.parents]) if not path.exists()), None)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{process_index}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output_dir {output_dir} is not writable ({exc.strerror or exc}); "
                          "choose another --output_dir") from None
    # what the run writes, of the kind it writes it: a folder where a file goes (or the other way
    # round) would fail mid-start, some of it already written
    for name, folder in (("run.json", False), ("config.yaml", False), ("metrics.jsonl", False),
                         ("samples.jsonl", False), (".run.lock", False), ("abandoned", True),
                         ("checkpoints", True), ("final", True)):
        path = output_dir / name
        if path.exists() and path.is_dir() != folder:
            raise ConfigError(f"output_dir {output_dir}: {name} is a {'file' if folder else 'folder'}, where the run "
                              f"keeps its {'folder' if folder else 'file'} of that name; move it away")
    if other_run:
        refuse_other_run(output_dir, resuming, overwrite)
    return created


def refuse_other_run(output_dir: Path, resuming: bool, overwrite: bool) -> None:
    """ConfigError where output_dir holds a run that this start would neither resume nor replace."""
    from rlhf.errors import ConfigError

    existing = [p for p in ("metrics.jsonl", "samples.jsonl", "final", "checkpoints") if (output_dir / p).exists()]
    if existing and not resuming and not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} already holds a run ({', '.join(existing)}); choose another output_dir, "
            "resume it with --resume_from_checkpoint latest (trainer.train(resume_from_checkpoint=True)), or pass "
            "--overwrite_output_dir true"
        )


def remove_created_dirs(output_dir: Path, created: Path | None) -> None:
    """A start refused after ``check_output_dir`` made output_dir (a model that cannot load, a
    missing dataset) leaves no empty dirs behind: output_dir and the parents it made, while empty."""
    if created is None:
        return
    absolute = Path(os.path.abspath(output_dir))
    for path in [absolute, *absolute.parents]:
        try:
            path.rmdir()  # only an empty dir; another process may be writing into it
        except OSError:
            return
        if path == created:
            return


OPTIMIZER_SETTINGS = ("learning_rate", "value_learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps")


def compatibility(config: Any) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it (load_checkpoint checks)."""
    c = config
    return {"model_name_or_path": c.model_name_or_path, "init_adapter": c.init_adapter, "lora_r": c.lora_r,
            "lora_alpha": c.lora_alpha, "lora_target_modules": c.lora_target_modules,
            "advantage_estimator": c.advantage_estimator, "policy_loss": c.policy_loss,
            "update_method": c.update_method, "value_head": c.needs_value_head,
            # The restored optimizer and schedule carry these; a resume could not apply new values.
            **{key: getattr(c, key) for key in OPTIMIZER_SETTINGS}}
