"""The trained model from a config: base (+ merged init adapter), LoRA, optional value head,
AdamW and its learning-rate schedule, all through ``accelerator.prepare``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import get_scheduler

from rlhf import checkpoint as ckpt
from rlhf.adapters import SavedLora, check_untied_targets
from rlhf.distributed import shards_weights
from rlhf.models import (
    PolicyWithValue, ValueHead, add_lora, check_bf16, disable_dropout, fuse_lora_layers, fuse_swiglu_mlps, load_base_model,
    last_hidden_size, merge_adapter, trainable_parameter_groups,
)


def build_model(config: Any, accelerator: Any, init_adapter: SavedLora | None,
                optimizer_trains_policy: bool = True, base: torch.nn.Module | None = None) -> tuple[Any, Any, Any]:
    """(prepared PolicyWithValue, optimizer | None, scheduler | None). optimizer_trains_policy=False
    (an update method that moves the policy itself, e.g. TRPO) leaves only the value head to AdamW.
    ``base``: a model loaded by the caller (the Python API) instead of config.model_name_or_path."""
    if config.bf16:
        check_bf16(accelerator.device)
    if base is not None:
        base = base.to(torch.bfloat16) if config.bf16 else base
        disable_dropout(base)
    else:
        with accelerator.main_process_first():  # the embedded model is converted once, by rank 0
            base = load_base_model(config.model_name_or_path, bf16=config.bf16)
    if config.init_adapter:
        check_untied_targets(init_adapter, base, config.init_adapter)
        base = merge_adapter(base, config.init_adapter)
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With a frozen base nothing before the first LoRA layer needs grad; the embedding
        # output must, or checkpointed blocks could return activations without a graph.
        base.enable_input_require_grads()
    if config.lora_dropout > 0 and accelerator.is_main_process:
        warnings.warn(f"lora_dropout {config.lora_dropout} is ignored: RL trains with every dropout off, so the "
                      "update's logprobs are those of the policy that sampled; the saved adapter "
                      "records lora_dropout 0", stacklevel=3)
    policy = add_lora(base, config.lora_r, config.lora_alpha, 0.0, config.lora_target_modules)
    if not shards_weights(accelerator):
        fuse_lora_layers(policy)
        fuse_swiglu_mlps(policy)
    value_head = ValueHead(last_hidden_size(base)) if config.needs_value_head else None
    # Sharing runs the policy twice in one forward with a cache: fine for DDP, not for sharding
    # hooks; checkpointed layers switch the cache off.
    share_prompt_prefix = (config.share_prompt_prefix and not config.gradient_checkpointing
                           and not shards_weights(accelerator))
    # The chunked projection reads the LM head's weight directly: not under DeepSpeed/FSDP sharding.
    chunk_bytes = (int(config.chunked_logprobs_mb * 2 ** 20)
                   if config.chunked_logprobs_mb is not None and not shards_weights(accelerator) else None)
    # SDPA on grouped heads: the CPU's kernel takes them; not under sharding (a CPU-offloaded FSDP
    # model computes on its GPU) nor with checkpointed layers (recomputed outside the switch)
    grouped_heads = (accelerator.device.type == "cpu" and not shards_weights(accelerator)
                     and not config.gradient_checkpointing)
    model = PolicyWithValue(policy, value_head, share_prompt_prefix=share_prompt_prefix, chunk_logits_bytes=chunk_bytes,
                            grouped_heads_in_sdpa=grouped_heads)
    param_groups = trainable_parameter_groups(model, config.learning_rate, config.value_learning_rate,
                                              config.weight_decay)
    if not optimizer_trains_policy:  # e.g. TRPO moves the policy itself; AdamW only fits the value head
        param_groups = param_groups[1:]
    optimizer = torch.optim.AdamW(param_groups, fused=fused_adamw(accelerator) or None) if param_groups else None
    updates_per_step = config.ppo_epochs * config.rollout_batch_size * config.num_generations // config.mini_batch_size
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.max_steps * updates_per_step) if optimizer else None
    prepared = accelerator.prepare(model, optimizer, scheduler)
    ckpt.skip_model_weights_in_accelerate_state(accelerator)
    return prepared


def fused_adamw(accelerator: Any) -> bool:
    """Whether AdamW runs torch's fused kernel, as transformers' Trainer (so TRL) takes by default
    on torch >= 2.8: one pass per tensor instead of a dozen ops (the benchmark's 420 LoRA tensors:
    21 -> 7.5 ms per optimizer step on the 2-core EPYC); the same update up to float rounding. On a
    CPU or CUDA, not under sharding, where DeepSpeed/FSDP hand the optimizer their own flat or
    sharded parameters."""
    return accelerator.device.type in ("cpu", "cuda") and not shards_weights(accelerator)


def use_fused_adamw(optimizer: Any, fused: bool) -> None:
    """Set AdamW's kernel (``fused_adamw``) after a checkpoint's optimizer state has loaded: its
    saved settings replace the built ones, so a run resumed from a checkpoint of the per-op AdamW
    (before 2026-12-06) would keep that one, and a fused checkpoint would bring the fused kernel
    under sharding. Each step count moves where that kernel keeps it (fused: on the parameter's
    device; per-op: on the CPU), as torch's own loading puts it."""
    inner = getattr(optimizer, "optimizer", optimizer)  # torch's, inside Accelerate's wrapper
    if not isinstance(inner, torch.optim.AdamW):
        return
    for group in inner.param_groups:
        group["fused"] = fused or None
        for parameter in group["params"]:
            state = inner.state.get(parameter, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=parameter.device if fused else "cpu", dtype=torch.float32)
