"""Several processes on CPU (torchrun -> Accelerate's MULTI_CPU/gloo path, the same code as DDP on
GPUs): one update equals the one-process update, and a 2-process run writes and resumes once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import FIXTURES, ROOT, tiny_args

# Every RL config shipped in configs/ (tests/fixtures/one_update.py runs each), and GRPO with one epoch.
# Clip-Cov and KL-Cov pick their tokens within each micro-batch, as verl does (at least one per
# call; rlhf/algorithms/verl_losses.py says why), so their update depends on the split by design.
SPLIT_DEPENDENT = ("clip_cov", "kl_cov")
# tools_grpo / env_grpo (and ppo_env: PPO's value head and GAE in the same environment) run
# multi-turn episodes on the tiny tool-calling model.
ALGORITHMS = (*sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")
                      if p.stem not in ("dpo", "reward_model", *SPLIT_DEPENDENT)), "grpo_one_epoch", "ppo_env")
TOLERANCE = 1e-5


def torchrun(processes: int, script: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # One thread per process on both sides, so float reductions run in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline"}
    port = 20000 + (os.getpid() * 7 + processes) % 20000
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(port), str(script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


@pytest.fixture(scope="module")
def one_update_runs(tiny_model_dir, tool_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The same fixed-rollout step as 2 processes x B, 1 process x 2B, and 1 process x B x 2 accumulation."""
    root = tmp_path_factory.mktemp("one_update")
    runs = {"2 processes": (2, 1), "1 process": (1, 1), "1 process, accumulation 2": (1, 2)}
    outputs = {}
    for name, (processes, accumulation) in runs.items():
        out = root / name.replace(" ", "_").replace(",", "")
        result = torchrun(processes, FIXTURES / "one_update.py", str(out), str(tiny_model_dir), str(accumulation),
                          str(tool_model_dir))
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[name] = out
    return outputs


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_update_is_the_same_on_two_processes_and_with_accumulation(one_update_runs, algorithm):
    reference = one_update_runs["1 process"] / algorithm
    ref_weights = load_file(str(reference / "final" / "adapter_model.safetensors"))
    ref_grads = load_file(str(reference / "grads.safetensors"))
    ref_metrics = json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])
    config = yaml.safe_load((reference / "config.yaml").read_text())
    steps = {key.split("/")[0] for key in ref_grads}
    if config["update_method"] == "trpo":  # one natural-gradient step; AdamW fits only the value head
        assert ref_metrics["trpo/accepted"] == 1.0
        assert all("value_head" in key for key in ref_grads)
    assert len(steps) == config["ppo_epochs"]  # one minibatch per epoch
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-4  # the update is not trivially zero

    for name in ("2 processes", "1 process, accumulation 2"):
        run = one_update_runs[name] / algorithm
        weights = load_file(str(run / "final" / "adapter_model.safetensors"))
        grads = load_file(str(run / "grads.safetensors"))
        weight_difference, grad_difference = max_difference(weights, ref_weights), max_difference(grads, ref_grads)
        print(f"{algorithm} {name} vs 1 process: max |dW| {weight_difference:.2e}, max |dgrad| {grad_difference:.2e}")
        assert weight_difference < TOLERANCE, (name, weight_difference)
        # Adam's first steps are nearly sign(grad) * lr, so the weights alone would hide a wrongly
        # scaled gradient; the gradients themselves must agree too.
        assert grad_difference < TOLERANCE, (name, grad_difference)
        if (reference / "final" / "value_head.safetensors").is_file():
            heads = load_file(str(run / "final" / "value_head.safetensors"))
            assert max_difference(heads, load_file(str(reference / "final" / "value_head.safetensors"))) < TOLERANCE
        metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        for key in ("reward_mean", "reward_std", "kl", "entropy", "adv_mean", "response_length_mean", "eos_rate",
                    "policy_loss", "value_loss", "kl_loss"):
            if key not in ref_metrics or ref_metrics[key] is None or ref_metrics[key] != ref_metrics[key]:
                continue  # NaN or absent: meaningless for this algorithm
            assert metrics[key] == pytest.approx(ref_metrics[key], abs=TOLERANCE), (name, key)


def test_two_process_run_writes_once_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, out, "--save_steps", "1", "--num_samples_to_log", "1", "--report_to", "tensorboard")
    first = torchrun(2, ROOT / "scripts" / "train_ppo.py", *args)
    assert first.returncode == 0, first.stderr[-4000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "run"), size_guidance={"tensors": 0})
    events.Reload()
    table = events.Tensors("completions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert len(table.splitlines()) == 2 + 4, "the completion table holds the samples of both processes"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    accelerate_state = out / "checkpoints" / "step-2" / "accelerate"
    assert (accelerate_state / "random_states_0.pkl").is_file() and (accelerate_state / "random_states_1.pkl").is_file()
    assert (out / "final" / "adapter_model.safetensors").is_file()

    resumed = torchrun(2, ROOT / "scripts" / "train_ppo.py",
                       *tiny_args(tiny_model_dir, out, "--save_steps", "1", "--num_samples_to_log", "1",
                                  "--max_steps", "3", "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    samples = [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples == [1, 2, 3]  # one process logs samples, not two
    assert (out / "checkpoints" / "step-3").is_dir()


def _sharded(distributed_type, **overrides):
    """An accelerator stand-in and a config for configure_sharding (no GPU, no DeepSpeed install needed)."""
    from types import SimpleNamespace

    from rlhf.config import RLConfig

    config = RLConfig(**{"mini_batch_size": 8, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5, **overrides})
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto"}))
    return SimpleNamespace(distributed_type=distributed_type, state=state), config


def _configure(accelerator, config):
    from rlhf.distributed import configure_sharding
    from rlhf.update import UPDATERS

    configure_sharding(accelerator, config, 2, UPDATERS[config.update_method].needs["unsharded_weights"])


def test_deepspeed_gets_batch_sizes_and_clipping_from_the_run_config():
    from accelerate.utils import DistributedType

    accelerator, config = _sharded(DistributedType.DEEPSPEED)
    _configure(accelerator, config)
    assert accelerator.state.deepspeed_plugin.deepspeed_config == {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 8,
        "gradient_clipping": 0.5}


@pytest.mark.parametrize("overrides, message", [
    ({"update_method": "trpo"}, "update_method trpo needs unsharded LoRA weights"),
    ({"bf16": True}, "set mixed_precision: bf16 in the accelerate config and keep --bf16 false"),
])
@pytest.mark.parametrize("backend", ["DEEPSPEED", "FSDP"])
def test_sharded_backends_refuse_what_they_cannot_do(backend, overrides, message):
    from accelerate.utils import DistributedType

    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _configure(*_sharded(DistributedType[backend], **overrides))


def test_processes_on_one_cpu_share_its_cores(monkeypatch):
    import torch

    from rlhf.distributed import share_cpu_cores

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two hosts with two processes each
        assert share_cpu_cores() == max(1, cores // 2)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 4))
        assert share_cpu_cores() == 1
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
        assert share_cpu_cores() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert share_cpu_cores() == before  # one process keeps every core
    finally:
        torch.set_num_threads(before)
