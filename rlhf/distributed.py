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


def share_cpu_cores() -> int:
    """Give each of the processes on this host its share of the CPU cores, unless OMP_NUM_THREADS
    says otherwise; returns the thread count now in use.

    Every torch process takes all cores by default; several of them on one CPU spin their OpenMP
    threads against each other and a step gets several times slower (8x measured here with two
    2-thread processes on 2 cores). torchrun sets OMP_NUM_THREADS=1, accelerate launch does not.
    """
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "") or launched_world_size())
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
