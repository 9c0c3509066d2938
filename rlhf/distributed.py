"""Accelerate glue: one place that builds the Accelerator (so every launcher forms a process
group) and the context that gives generation full weights under ZeRO-3 / FSDP."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from rlhf.errors import ConfigError


def launched_world_size() -> int:
    """Processes the launcher (torchrun, accelerate launch, mpirun) started; 1 for plain python."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def local_process_count() -> int:
    """Processes the launcher started on this machine: torchrun's ``LOCAL_WORLD_SIZE`` or an MPI
    launcher's per-host count (the variables Accelerate reads), else all it started."""
    for name in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"):
        local = os.environ.get(name, "").strip()
        if local.isdigit() and int(local) > 0:
            return int(local)
    return launched_world_size()


def share_cpu_cores() -> int:
    """Give each of the processes on this host its share of the CPU cores, unless OMP_NUM_THREADS
    says otherwise; returns the thread count now in use.

    Every torch process takes all cores by default; several of them on one CPU spin their OpenMP
    threads against each other and a step gets several times slower (8x measured here with two
    2-thread processes on 2 cores). torchrun sets OMP_NUM_THREADS=1, accelerate launch does not.
    """
    local_processes = local_process_count()
    if "OMP_NUM_THREADS" not in os.environ and local_processes > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // local_processes))
    return torch.get_num_threads()


def make_accelerator(**kwargs: Any) -> Accelerator:
    """``Accelerator(**kwargs)`` that also works for several processes on a machine without a GPU.

    Accelerate only forms a gloo group on CPU when asked for ``cpu=True`` (``accelerate launch
    --cpu``/``use_cpu: true``); under ``torchrun`` or ``accelerate launch --multi_gpu`` without a
    GPU it would otherwise hand every process rank 0 of 1, and each would write the same outputs.
    We ask for CPU exactly then, so both launchers give a gloo group on CPU.
    """
    if launched_world_size() > 1 and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
        share_cpu_cores()
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != launched_world_size():
        raise ConfigError(
            f"the launcher started {launched_world_size()} processes but Accelerate formed a group of "
            f"{accelerator.num_processes}; launch with torchrun or `accelerate launch --config_file "
            "configs/accelerate/<one of them>.yaml`")
    return accelerator


@contextlib.contextmanager
def unwrapped_full_weights(model: torch.nn.Module, accelerator: Accelerator) -> Iterator[torch.nn.Module]:
    """The plain module with full weights, for generation and the no-grad passes.

    Under DDP or one process this is just ``unwrap_model``. DeepSpeed ZeRO-3 keeps each weight
    partitioned across processes and would all-gather every layer for every generated token, so
    the weights are gathered once for the whole generation with DeepSpeed's ``GatheredParameters``
    (TRL's ``unwrap_model_for_generation`` does the same). FSDP (version 2, configs/accelerate/
    fsdp.yaml) shards per parameter with forward hooks on each module, so calling the unwrapped
    module gathers correctly; FSDP version 1 flattens weights and needs ``summon_full_params``.
    """
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            remove_hooks(model)  # the gathered weights stay put instead of re-gathering per token
            try:
                yield unwrapped
            finally:
                add_hooks(model)
    elif accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
            yield unwrapped
    else:
        yield unwrapped


def needs_synced_generation(accelerator: Accelerator) -> bool:
    """FSDP2 all-gathers weights inside every forward, a collective: a process whose rows all hit
    EOS early must keep stepping until every process is done (``generate(synced_gpus=True)``)."""
    return accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version == 2


def shards_weights(accelerator: Accelerator) -> bool:
    """DeepSpeed or FSDP: weights are partitioned and gathered by hooks, so the speed-ups that
    swap weight tensors or run a module twice per forward (rlhf.models) stay off there."""
    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


class Reducer:
    """Sums, means and maxima over all processes, as float32 tensors on the accelerator's device.

    Every process must make the same calls in the same order (each is a collective)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def sum(self, value: float | list[float] | torch.Tensor) -> torch.Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device)
        return self.accelerator.reduce(tensor.clone(), reduction="sum")

    def mean(self, value: float | torch.Tensor) -> float:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    def max(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor(value, dtype=torch.float32, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="max"))

    def token_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean over every response token of every process (processes may hold different token counts)."""
        total, count = self.sum(torch.stack([(x * mask).sum(), mask.sum()])).tolist()
        return total / max(count, 1.0)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor)


def configure_sharding(accelerator: Accelerator, config: Any, micro_batch_size: int, unsharded_weights: bool) -> None:
    """DeepSpeed and FSDP (configs/accelerate/deepspeed_*.yaml, fsdp.yaml) take their batch sizes
    and clipping from the run config; what they cannot do is refused here. unsharded_weights: the
    update method needs the LoRA weights whole (TRPO's natural-gradient step)."""
    if not shards_weights(accelerator):
        return
    backend = "DeepSpeed" if accelerator.distributed_type == DistributedType.DEEPSPEED else "FSDP"
    if unsharded_weights:
        raise ConfigError(f"update_method {config.update_method} needs unsharded LoRA weights; run it without "
                          f"{backend} (e.g. configs/accelerate/multi_gpu.yaml)")
    if config.bf16:
        raise ConfigError(f"with {backend} set mixed_precision: bf16 in the accelerate config and keep --bf16 false "
                          "(it keeps float32 master weights; a bfloat16 base would mix dtypes in one shard)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # No dataloader goes through prepare(), so DeepSpeed cannot infer these ("auto").
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds_config["gradient_accumulation_steps"] = config.gradient_accumulation_steps
        ds_config["train_batch_size"] = config.mini_batch_size
        ds_config["gradient_clipping"] = config.max_grad_norm or 0.0


def gathered_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full weights when ZeRO-3/FSDP shard them (every process must call this), else None."""
    return accelerator.get_state_dict(model) if shards_weights(accelerator) else None
