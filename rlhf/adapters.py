"""Saved adapters of runs that start from an ``init_adapter``: one LoRA that is the trained policy.

Training merges the init adapter (e.g. a DPO run's final/) into the base and learns a fresh RL
LoRA on top, so the trained policy is  W + s_init B_init A_init + s_rl B_rl A_rl  for every
layer. Saving only the RL LoRA would load as base + RL LoRA, without the init adapter. Two LoRAs
on one base are one LoRA of their summed rank, exactly:

    s_init B_init A_init + s_rl B_rl A_rl = [s_init B_init | s_rl B_rl] [A_init ; A_rl]   (scaling 1)

(peft's ``add_weighted_adapter(combination_type="cat")`` builds the same on two live adapters;
here it runs on the saved tensors, with no second copy of the base in memory). A layer that only
one of them adapts gets zeros in the other's block. The layout written next to it:

    adapter_config.json, adapter_model.safetensors   the concatenated LoRA on the original base
    init_adapter/                                    the init adapter: the starting policy and KL reference
    rl_adapter/                                      the RL LoRA alone (what resuming loads)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from rlhf.errors import CheckpointError

INIT_ADAPTER_DIR = "init_adapter"
RL_ADAPTER_DIR = "rl_adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Saved LoRA tensors of linear (and conv) layers and of embeddings: rank is dim 0 of A, dim 1 of B.
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}


def read_adapter_config(adapter_dir: Path, subject: str) -> dict[str, Any]:
    """adapter_config.json of ``adapter_dir``, read and checked (``check_adapter_config``)."""
    import json

    file = adapter_dir / "adapter_config.json"
    if not file.is_file():
        raise CheckpointError(f"{subject} is not a PEFT adapter dir (no adapter_config.json)")
    try:
        settings = json.loads(file.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    check_adapter_config(settings, file)
    return settings


def check_adapter_config(settings: Any, file: Path) -> None:
    """The adapter_config.json settings peft uses without checking their type: a hand-edited
    ``"r": "abc"`` ends in a TypeError deep in peft's layer code, a missing peft_type in a bare
    KeyError. One line naming the file and the setting instead (CheckpointError)."""
    from rlhf.checkpoint import is_finite_number, is_int  # here: rlhf.checkpoint imports this module

    def refuse(what: str) -> None:
        raise CheckpointError(f"{file}: {what}; restore the file (it is the adapter's, written by peft)")

    if not isinstance(settings, dict):
        refuse(f"expected a JSON object, got {type(settings).__name__}")
    from peft import PeftType

    if settings.get("peft_type") not in {member.value for member in PeftType}:
        refuse(f"peft_type must name a PEFT method as peft writes it (e.g. \"LORA\"), got {settings.get('peft_type')!r}")
    if settings["peft_type"] != "LORA":
        return  # other methods: peft's own checks (LoRA on top refuses them where it matters)
    if settings.get("bias", "none") not in ("none", "all", "lora_only"):
        refuse(f"bias must be none, all or lora_only, got {settings.get('bias')!r}")
    rank = settings.get("r", 8)
    if not is_int(rank) or rank <= 0:
        refuse(f"r must be a positive integer, got {rank!r}")
    for name in ("lora_alpha", "lora_dropout"):
        if name in settings and not is_finite_number(settings[name]):
            refuse(f"{name} must be a number, got {settings[name]!r}")
    targets = settings.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(name, str) for name in targets))):
        refuse(f"target_modules must be a module name or a list of them, got {targets!r}")


@contextmanager
def adapter_load_errors(subject: str, mismatch: str) -> Iterator[None]:
    """peft loading ``subject`` (an adapter dir, named as the user gave it): its errors as one line.
    ``mismatch`` says what a shape or key mismatch means for this caller."""
    try:
        yield
    except SafetensorError as exc:
        raise CheckpointError(f"{subject} is corrupted: its {ADAPTER_WEIGHTS} is unreadable ({exc})") from None
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:  # the last two: a setting's type
        raise CheckpointError(f"{subject} {mismatch}: {str(exc).strip().splitlines()[0][:200]}") from None


@dataclass
class SavedLora:
    """A LoRA adapter as files hold it: its config and the tensors under peft's saved key names."""

    config: LoraConfig
    weights: dict[str, Tensor]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(directory))
        save_file({key: value.contiguous() for key, value in self.weights.items()}, str(directory / ADAPTER_WEIGHTS))


def _modules(adapter: SavedLora, source: str) -> dict[str, dict[str, Tensor | str]]:
    """{module path in the base model: {"A": tensor, "B": tensor, "suffixes": (A key suffix, B key
    suffix)}}; refuses tensors that are not LoRA A/B weights."""
    modules: dict[str, dict[str, Tensor | str]] = {}
    for key, tensor in adapter.weights.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PREFIX):
            raise CheckpointError(f"{source} holds {key!r}, which is not a LoRA A/B weight (e.g. a saved embedding "
                                  "layer); merge it into the base model (peft merge_and_unload + save_pretrained) and "
                                  "pass that dir as model_name_or_path")
        module = modules.setdefault(key[len(_PREFIX):-len(suffix)], {})
        module[_SUFFIXES[suffix]] = tensor
        module["suffixes"] = ((".lora_embedding_A", ".lora_embedding_B") if "embedding" in suffix
                              else (".lora_A.weight", ".lora_B.weight"))
    return modules


def _scaling(config: LoraConfig, rank: int) -> float:
    return config.lora_alpha / (math.sqrt(rank) if config.use_rslora else rank)


def read_init_adapter(adapter_dir: str) -> SavedLora:
    """The init adapter's config and weights, refused (CheckpointError) where concatenation could
    not reproduce it exactly: another PEFT method, DoRA, trained biases or full modules, per-module alphas."""
    path = Path(adapter_dir)
    read_adapter_config(path, f"init_adapter {adapter_dir}")
    try:
        config = PeftConfig.from_pretrained(str(path))
        weights = load_peft_weights(str(path), device="cpu")
    except (OSError, ValueError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"init_adapter {adapter_dir} is unreadable: {str(exc).strip().splitlines()[0][:200]}") from None
    unsupported = [
        reason for reason, present in (
            (f"PEFT type {config.peft_type}", not isinstance(config, LoraConfig)),
            ("DoRA", getattr(config, "use_dora", False)),
            (f"bias={getattr(config, 'bias', 'none')!r}", getattr(config, "bias", "none") != "none"),
            ("modules_to_save", bool(getattr(config, "modules_to_save", None))),
            ("alpha_pattern", bool(getattr(config, "alpha_pattern", None))),
            ("lora_bias", getattr(config, "lora_bias", False)),
        ) if present
    ]
    if unsupported:
        raise CheckpointError(
            f"init_adapter {adapter_dir} uses {', '.join(unsupported)}, which a LoRA on top cannot be saved together "
            "with; merge it into the base model (peft merge_and_unload + save_pretrained) and pass that dir as "
            "model_name_or_path")
    adapter = SavedLora(config, dict(weights))
    _modules(adapter, f"init_adapter {adapter_dir}")
    return adapter


def check_untied_targets(adapter: SavedLora, model: torch.nn.Module, adapter_dir: str) -> None:
    """Refuse an init adapter on a weight tied to another module (lm_head and embed_tokens with
    tie_word_embeddings): merging it moves both modules, which no LoRA of one of them reproduces."""
    shared: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        shared[param.data_ptr()] = shared.get(param.data_ptr(), 0) + 1
    for path in _modules(adapter, f"init_adapter {adapter_dir}"):
        weight = getattr(model.get_submodule(path), "weight", None)
        if weight is not None and shared.get(weight.data_ptr(), 0) > 1:
            raise CheckpointError(
                f"init_adapter {adapter_dir} adapts {path}, whose weight is tied to another module; merging it "
                "changes both, which the saved RL adapter could not reproduce: merge it into the model (peft "
                "merge_and_unload + save_pretrained) and pass that dir as model_name_or_path")


def concatenate_loras(first: SavedLora, second: SavedLora) -> SavedLora:
    """One LoRA whose delta is first's plus second's on every module (see the module docstring).

    Both must be adapters of the same base (same module paths). Returns a rank R = max over
    modules of (r_first + r_second) LoRA with lora_alpha = R (scaling 1), targets = the union of
    module paths, base and task type of ``second``.
    """
    if bool(first.config.fan_in_fan_out) != bool(second.config.fan_in_fan_out):
        raise CheckpointError("the init adapter and the RL adapter disagree on fan_in_fan_out; they cannot be combined")
    parts = [(adapter, _modules(adapter, name)) for adapter, name in ((first, "init adapter"), (second, "RL adapter"))]
    paths = sorted(set(parts[0][1]) | set(parts[1][1]))
    ranks = {path: [modules[path]["A"].shape[0] if path in modules else 0 for _, modules in parts] for path in paths}
    total_rank = max(sum(r) for r in ranks.values())
    weights: dict[str, Tensor] = {}
    for path in paths:
        present = [(adapter, modules[path]) for adapter, modules in parts if path in modules]
        a_like, b_like = present[0][1]["A"], present[0][1]["B"]
        combined_a = a_like.new_zeros((total_rank, *a_like.shape[1:]), dtype=torch.float32)
        combined_b = b_like.new_zeros((b_like.shape[0], total_rank, *b_like.shape[2:]), dtype=torch.float32)
        offset = 0
        for adapter, tensors in present:
            rank = tensors["A"].shape[0]
            combined_a[offset:offset + rank] = tensors["A"].float()
            combined_b[:, offset:offset + rank] = tensors["B"].float() * _scaling(adapter.config, rank)
            offset += rank
        a_key, b_key = present[0][1]["suffixes"]
        weights[f"{_PREFIX}{path}{a_key}"] = combined_a
        weights[f"{_PREFIX}{path}{b_key}"] = combined_b
    config = LoraConfig(
        r=total_rank, lora_alpha=total_rank, lora_dropout=0.0, target_modules=paths, bias="none",
        fan_in_fan_out=second.config.fan_in_fan_out, task_type=second.config.task_type,
        base_model_name_or_path=second.config.base_model_name_or_path,
    )
    return SavedLora(config, weights)
