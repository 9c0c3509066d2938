"""GRPO / Dr. GRPO / RLOO / REINFORCE++ / GSPO / CISPO / DAPO and TRPO through their scripts on the tiny
model (in-process: the script's code path without paying a new interpreter; conftest.run_in_process)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import FIXTURES, ROOT, tiny_args
from rlhf.algorithms import zero_spread_groups
from rlhf.config import RLConfig
from rlhf.errors import ConfigError
from test_train_e2e import lora_b_norm, read_metrics

GROUP_CONFIGS = ["grpo", "dr_grpo", "rloo", "reinforce_pp", "gspo", "cispo", "sapo"]


@pytest.mark.parametrize("name", GROUP_CONFIGS)
def test_group_config_runs_two_steps(run_here, name, tiny_model_dir, tmp_path):
    out = tmp_path / name
    result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / f"{name}.yaml"),
                        *tiny_args(tiny_model_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = (out / "config.yaml").read_text()
    settings = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    assert f"advantage_estimator: {settings['advantage_estimator']}" in saved and "num_generations: 4" in saved
    assert f"policy_loss: {settings['policy_loss']}" in saved
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["frac_reward_zero_std"] <= 1.0
        for key in ("reward_mean", "policy_loss", "entropy"):
            assert math.isfinite(row[key]), key
        if settings["kl_coef"] > 0:
            assert math.isfinite(row["kl"])
        else:  # gspo, cispo: no reference, no KL measured
            assert row["kl"] is None
        assert row["value_loss"] is None  # no critic
    assert lora_b_norm(out / "final") > 0


def test_grpo_puts_kl_in_the_loss_and_rloo_in_the_reward(run_here, tiny_model_dir, tmp_path):
    runs = {}
    for name in ("grpo", "rloo"):
        out = tmp_path / name
        result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / f"{name}.yaml"),
                            *tiny_args(tiny_model_dir, out, "--max_steps", "1"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_metrics(out)[0]
    assert math.isfinite(runs["grpo"]["kl_loss"])
    assert "kl_loss" not in runs["rloo"]


def test_zero_spread_groups_pure_function():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 7.0])
    groups = torch.tensor([5, 5, 5, 9, 9, 3, 3, 4])  # sizes 3, 2, 2, 1; ids arbitrary
    assert zero_spread_groups(scores, groups).tolist() == [True, True, True, False, False, True, True, True]


def test_frac_reward_zero_std_matches_the_prompts(run_here, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / "grpo.yaml"), *tiny_args(
        tiny_model_dir, out, "--reward_funcs", f"{FIXTURES / 'rewards.py'}:constant_for_write_prompts",
        "--num_samples_to_log", "16"))
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for row in read_metrics(out):
        prompts = [s["prompt"] for s in samples if s["step"] == row["step"]][::4]  # one per group of 4
        assert len(prompts) == 4
        expected = sum(p.startswith("Write") for p in prompts) / 4
        assert row["frac_reward_zero_std"] == pytest.approx(expected)


@pytest.mark.parametrize("filter_groups", ["true", "false"])
def test_filter_zero_std_groups_skips_signal_free_updates(run_here, filter_groups, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / "grpo.yaml"), *tiny_args(
        tiny_model_dir, out, "--reward_funcs", f"{FIXTURES / 'rewards.py'}:constant",
        "--filter_zero_std_groups", filter_groups))
    assert result.returncode == 0, result.stderr[-3000:]
    for row in read_metrics(out):
        assert row["frac_reward_zero_std"] == 1.0
        if filter_groups == "true":  # every group dropped: no minibatch left to step on
            assert row["policy_loss"] is None
        else:
            assert row["policy_loss"] == pytest.approx(0.0, abs=1e-6)


def test_trpo_script_two_steps(run_here, tiny_model_dir, tmp_path):
    out = tmp_path / "trpo"
    result = run_here("train_trpo.py", "--config", str(ROOT / "configs" / "trpo.yaml"),
                        *tiny_args(tiny_model_dir, out, "--max_kl", "0.005"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["trpo/accepted"] in (0.0, 1.0)
        assert row["trpo/kl_after_step"] <= 0.005 * (1 + 1e-4)
        assert 1 <= row["trpo/line_search_steps"] <= 10
        assert math.isfinite(row["value_loss"])
    assert any(row["trpo/accepted"] == 1.0 for row in rows)
    assert lora_b_norm(out / "final") > 0
    head = load_file(str(out / "final" / "value_head.safetensors"))
    assert any(t.abs().sum() > 0 for t in head.values())


def test_trpo_with_reinforce_advantages_and_kl_loss(run_here, tiny_model_dir, tmp_path):
    out = tmp_path / "trpo"
    result = run_here("train_trpo.py", "--config", str(ROOT / "configs" / "trpo.yaml"), *tiny_args(
        tiny_model_dir, out, "--advantage_estimator", "reinforce", "--kl_in_reward", "false", "--kl_estimator", "k3",
        "--max_steps", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    row = read_metrics(out)[0]
    assert row["value_loss"] is None and not (out / "final" / "value_head.safetensors").exists()
    assert row["trpo/accepted"] in (0.0, 1.0)


def test_group_batch_that_does_not_split_into_minibatches_exits_2(run_here, tiny_model_dir, tmp_path):
    result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / "grpo.yaml"),
                        *tiny_args(tiny_model_dir, tmp_path / "run", "--mini_batch_size", "6"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: mini_batch_size 6 must divide rollout_batch_size*num_generations = 16; e.g. --mini_batch_size 16")
    assert not (tmp_path / "run").exists()


def test_groups_must_split_whole_over_processes():
    config = RLConfig(advantage_estimator="grpo", num_generations=4, rollout_batch_size=6, mini_batch_size=8)
    with pytest.raises(ConfigError, match=r"rollout_batch_size 6 prompts \(x num_generations 4 samples each\) "
                                          r"cannot be split into whole groups over 4 processes; set "
                                          r"--rollout_batch_size to a multiple of 4 \(e.g. 8\)"):
        config.check_world_size(4)
    config.check_world_size(2)


@pytest.mark.parametrize("flags, message", [
    (["--advantage_estimator", "rloo", "--num_generations", "1"], "set num_generations >= 2"),
    (["--filter_zero_std_groups", "true", "--num_generations", "1", "--advantage_estimator", "reinforce_pp"], "filter_zero_std_groups needs groups"),
    (["--update_method", "natural"], "update_method 'natural' is not one of: optimizer, trpo"),
    (["--policy_loss", "sac"], "policy_loss 'sac' is not one of: pg, ppo_clip, luspo, gspo, gspo_token, cispo, sapo, vespo, gmpo, clip_cov, kl_cov, dppo"),
    (["--advantage_estimator", "vtrace"], "advantage_estimator 'vtrace' is not one of: reinforce, gae, grpo"),
    (["--loss_agg_mode", "sum"], "loss_agg_mode 'sum' is not one of: token-mean"),
    (["--max_kl", "0"], "max_kl must be > 0"),
    (["--policy_loss", "cispo", "--policy_loss_kwargs", '{"epsilon_hihg": 4}'],
     "policy_loss_kwargs: policy loss 'cispo' has no parameter 'epsilon_hihg'; did you mean 'epsilon_high'?"),
    (["--policy_loss", "cispo", "--policy_loss_kwargs", '{"epsilon_high": -0.5}'],
     "policy loss 'cispo' refuses them (cispo: epsilon_high caps the importance ratio and must be > 0"),
    (["--policy_loss", "gspo", "--policy_loss_kwargs", '{"clip_range": -0.5}'],
     "gspo: clip_range and clip_range_high must be > 0"),
    (["--dynamic_sampling", "true", "--num_generations", "1", "--advantage_estimator", "reinforce_pp"],
     "dynamic_sampling keeps groups whose rewards differ: set num_generations >= 2"),
    (["--overlong_buffer_length", "32", "--max_new_tokens", "32"], "overlong_buffer_length must be in [0, max_new_tokens=32)"),
])
def test_group_and_trpo_config_errors(run_here, flags, message, tmp_path):
    result = run_here("train_grpo.py", "--output_dir", str(tmp_path / "x"), *flags)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_trpo_checkpoint_and_resume(run_here, tiny_model_dir, tmp_path):
    out = tmp_path / "trpo"
    args = [*tiny_args(tiny_model_dir, out, "--save_steps", "1"), "--config", str(ROOT / "configs" / "trpo.yaml")]
    result = run_here("train_trpo.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "step-2" / "value_head.safetensors").is_file()
    result = run_here("train_trpo.py", *args, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "4"),
                        "--resume_from_checkpoint", "latest")
    assert result.returncode == 2
    assert "was trained with update_method='trpo', this run has 'optimizer'" in result.stderr


def test_dapo_samples_until_groups_have_spread_and_penalises_overlong_responses(run_here, tiny_model_dir, tmp_path):
    """dapo.yaml end to end: dynamic sampling, the overlong penalty (every tiny-model response runs
    to max_new_tokens 8, so each pays the full factor) and, with truncated responses masked, no
    update at all (none of them ends with EOS)."""
    runs = {}
    for masked in ("true", "false"):
        out = tmp_path / masked
        result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / "dapo.yaml"), *tiny_args(
            tiny_model_dir, out, "--overlong_buffer_length", "4", "--mask_truncated_completions", masked,
            "--reward_funcs", f"{FIXTURES / 'rewards.py'}:constant_for_write_prompts"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[masked] = read_metrics(out)
    for row in runs["false"]:
        assert 1 <= row["dynamic_sampling/rounds"] <= 3
        assert row["frac_reward_zero_std"] == 0.0 or row["dynamic_sampling/missing_groups"] > 0
        assert row["overlong_penalty_mean"] == pytest.approx(1.0) and row["eos_rate"] == 0.0
        assert math.isfinite(row["policy_loss"])
    assert lora_b_norm(tmp_path / "false" / "final") > 0
    assert all(row["policy_loss"] is None for row in runs["true"])
    assert lora_b_norm(tmp_path / "true" / "final") == 0
