"""End-to-end runs of the real train scripts on a tiny random model.

train_ppo.py and train_reinforce.py each run once in a subprocess, as a user runs them (the
other scripts' subprocess runs are in their own test files); tests that only read a run's outputs
share those runs, and the rest call the scripts in this process (run_here) to save ~6 s of
imports each."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, run_script, tiny_args
from rlhf.tracking import METRIC_KEYS


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def lora_b_norm(adapter_dir) -> float:
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    b_weights = [t for name, t in tensors.items() if "lora_B" in name]
    assert b_weights, "adapter has no LoRA B matrices"
    return float(sum(t.float().norm() for t in b_weights))


@pytest.fixture(scope="module")
def script_runs(tiny_model_dir, tmp_path_factory):
    """One two-step run of train_ppo.py and of train_reinforce.py (their configs, an evaluation at
    step 2), each in a subprocess; the reinforce run also reports to TensorBoard and W&B."""
    runs = {}

    def get(algorithm):
        if algorithm not in runs:
            out = tmp_path_factory.mktemp(algorithm) / "run"
            trackers = ("--report_to", "jsonl", "tensorboard", "wandb") if algorithm == "reinforce" else ()
            result = run_script(f"train_{algorithm}.py", "--config", str(ROOT / "configs" / f"{algorithm}.yaml"),
                                *tiny_args(tiny_model_dir, out, "--eval_steps", "2", "--eval_num_prompts", "3", *trackers))
            runs[algorithm] = result, out
        return runs[algorithm]

    return get


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce"])
def test_two_steps_through_the_script(algorithm, script_runs):
    result, out = script_runs(algorithm)
    assert result.returncode == 0, result.stderr[-3000:]

    rows = read_metrics(out)
    assert "eval/reward_mean" not in rows[0] and math.isfinite(rows[1]["eval/reward_mean"])
    assert rows[1]["eval/kl"] is not None
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        missing = [k for k in METRIC_KEYS if k not in row]
        assert not missing, missing
        for key in ("reward_mean", "kl", "entropy", "policy_loss", "response_length_mean", "eos_rate",
                    "samples_per_second", "step_time_s"):
            assert row[key] is not None and math.isfinite(row[key]), key
    assert (rows[0]["value_loss"] is not None) == (algorithm == "ppo")

    # LoRA B starts at zero and the value head is zero-initialised: non-zero means they trained.
    assert lora_b_norm(out / "final") > 0
    if algorithm == "ppo":
        head = load_file(str(out / "final" / "value_head.safetensors"))
        assert any(t.abs().sum() > 0 for t in head.values())
    assert (out / "config.yaml").is_file()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reward", "step"} <= samples[0].keys()


def test_final_adapter_loads_with_peft_and_generates_and_trackers_write(tiny_model_dir, script_runs):
    result, out = script_runs("reinforce")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(out.glob("tensorboard/run/events.out.tfevents.*")), "no TensorBoard events in output_dir/tensorboard/<run name>"
    assert list(out.glob("wandb/offline-run-*")), "no offline W&B run"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(out / "final"))
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    inputs = tokenizer("Hello there", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


def test_custom_reward_file_and_dataset_columns(tiny_model_dir, tmp_path, run_here):
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(
        "def reward_topic(prompts, completions, topic, **kwargs):\n"
        "    assert len(topic) == len(completions)\n"
        "    return [1.0 if t == 'cats' else -1.0 for t in topic]\n"
    )
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tell me about {t}.", "topic": t}) + "\n" for t in ["cats"] * 4))
    out = tmp_path / "run"
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, out, "--dataset", str(data),
                                                        "--reward_funcs", f"{reward_file}:reward_topic",
                                                        "--reward_clip", "0.5", "--normalize_rewards", "true"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    assert rows[0]["rewards/reward_topic/mean"] == 1.0 and rows[0]["reward_mean"] == 1.0  # logged raw
    assert rows[0]["reward_clip_frac"] == 1.0


def test_resume_from_latest_restores_and_continues(tiny_model_dir, tmp_path, run_here):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, out, "--save_steps", "1", "--save_total_limit", "2")
    assert run_here("train_ppo.py", *args).returncode == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["sampler"]["position"] == 8
    result = run_here("train_ppo.py", *args, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]


def test_resume_with_other_lora_shape_exits_2(tiny_model_dir, tmp_path, run_here):
    out = tmp_path / "run"
    assert run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "1", "--save_steps", "1")).returncode == 0
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--lora_r", "8", "--max_steps", "2",
                                                 "--resume_from_checkpoint", "latest"))
    assert result.returncode == 2
    assert "lora_r" in result.stderr and "Traceback" not in result.stderr


def test_accelerate_launch_cpu_config(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "cpu.yaml"), str(ROOT / "scripts" / "train_ppo.py"),
               *tiny_args(tiny_model_dir, out, "--max_steps", "1")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1]


def test_existing_run_is_not_overwritten(tiny_model_dir, tmp_path, run_here):
    out = tmp_path / "run"
    assert run_here("train_reinforce.py", *tiny_args(tiny_model_dir, out, "--max_steps", "1")).returncode == 0
    before = (out / "metrics.jsonl").read_text()
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, out, "--max_steps", "1"))
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (out / "metrics.jsonl").read_text() == before


def test_rlhf_console_command(tmp_path):
    console = Path(sys.executable).parent / "rlhf"
    result = subprocess.run([str(console), "train", "reinforce", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--baseline_decay" in result.stdout
    result = subprocess.run([str(console), "fly"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "usage: rlhf train" in result.stderr


@pytest.mark.slow
def test_embedded_model_ppo_step(tmp_path):
    """One PPO step on the real embedded SmolLM2 (converted from the GGUF on first use).

    The critic starts at zero, so a rollout whose rewards are all equal has zero advantages and
    leaves the LoRA untouched (correctly). Sentiment alone is often 0.0 for every short sample;
    a character-count reward (n/200 below 200 characters) keeps the step's rewards distinct."""
    out = tmp_path / "run"
    result = run_script("train_ppo.py", "--config", str(ROOT / "configs" / "ppo.yaml"), "--output_dir", str(out),
                        "--max_steps", "1", "--rollout_batch_size", "4", "--mini_batch_size", "4", "--ppo_epochs", "1",
                        "--max_new_tokens", "8", "--save_steps", "0", "--reward_funcs", "sentiment", "length",
                        "--reward_kwargs", '{"length": {"target": 200, "tolerance": 0, "unit": "chars"}}', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = read_metrics(out)[0]
    assert -1.0 <= row["rewards/sentiment/mean"] <= 1.0 and row["response_length_mean"] > 0
    assert row["reward_std"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert any(s["completion"].strip() for s in samples)  # the real model writes text
    assert lora_b_norm(out / "final") > 0
