"""scripts/compare_algorithms.py: every shipped RL config on one task, evaluated against the base."""

from __future__ import annotations

import json
import math
import re

import pytest

from conftest import ROOT, assert_one_line_error, run_in_process
from rlhf.compare import RL_SCRIPTS, compare, paired_gains, shipped_rl_configs

TINY = ["--rollout_batch_size", "2", "--num_generations", "2", "--mini_batch_size", "4", "--ppo_epochs", "1",
        "--max_prompt_length", "48", "--lora_r", "4", "--lora_alpha", "8", "--logging_steps", "1"]


def test_every_config_names_its_entry_point_and_every_rl_one_is_compared():
    """A config without the header line would silently drop out of the comparison."""
    compared = shipped_rl_configs()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        header = path.read_text().split("\n\n")[0]
        entry = re.search(rf"python scripts/(\w+\.py) --config configs/{path.stem}\.yaml", header)
        assert entry, f"{path.name} does not name its train script"
        assert (path.stem in compared) == (entry.group(1) in RL_SCRIPTS), path.name
    assert {"grpo", "ppo", "reinforce", "trpo"} <= set(compared) and "dpo" not in compared
    assert compared["ppo"] == "train_ppo.py" and compared["dapo"] == "train_grpo.py"


def test_gain_over_base_is_the_paired_per_prompt_difference(tmp_path):
    rows = [  # prompt 0: a beats the base by 0.5 and 0.3; prompt 1: by -0.2, and one unscorable sample
        {"prompt_index": 0, "sample_index": 0, "responses": {"base": {"reward": 0.0}, "a": {"reward": 0.5}}},
        {"prompt_index": 0, "sample_index": 1, "responses": {"base": {"reward": 0.1}, "a": {"reward": 0.4}}},
        {"prompt_index": 1, "sample_index": 0, "responses": {"base": {"reward": 0.2}, "a": {"reward": 0.0}}},
        {"prompt_index": 1, "sample_index": 1, "responses": {"base": {"reward": None}, "a": {"reward": 9.0}}},
    ]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    gain = paired_gains(path, ["a"], "base", seed=0, resamples=500)["a"]
    assert gain["mean"] == pytest.approx((0.4 + -0.2) / 2)
    assert gain["ci_low"] == pytest.approx(-0.2) and gain["ci_high"] == pytest.approx(0.4)


def test_two_configs_train_on_one_task_and_are_evaluated_against_the_base(tiny_model_dir, tmp_path):
    calls = []

    def tiny_runner(script: str, flags: list[str]) -> int:
        calls.append((script, flags))
        return run_in_process(script, *flags, "--model_name_or_path", str(tiny_model_dir), *TINY).returncode

    out = tmp_path / "compare"
    result = compare(["grpo", "ppo"], output_dir=str(out), max_steps=1, eval_num_prompts=3, eval_num_samples=2,
                     max_new_tokens=4, bootstrap_resamples=200, runner=tiny_runner)
    assert [script for script, _ in calls] == ["train_grpo.py", "train_ppo.py"]
    for _, flags in calls:  # the same task for every config
        joined = " ".join(flags)
        assert "--dataset builtin:prompts --reward_funcs sentiment --max_new_tokens 4 --seed 0" in joined
        assert "--max_steps 1" in joined
    rows = {row["config"]: row for row in result["rows"]}
    assert set(rows) == {"grpo", "ppo"}
    for row in rows.values():
        assert math.isfinite(row["gain"]["mean"]) and row["gain"]["ci_low"] <= row["gain"]["mean"] <= row["gain"]["ci_high"]
        assert row["reward"]["mean"] == pytest.approx(result["base_reward"]["mean"] + row["gain"]["mean"], abs=1e-9)
        assert row["seconds_per_step"] > 0 and row["kl_per_sequence"]["mean"] >= 0
    table = (out / "compare.md").read_text()
    assert "| grpo |" in table and "| ppo |" in table and "3 held-out prompts x 2 samples" in table
    assert (out / "compare.png").stat().st_size > 0 and json.loads((out / "compare.json").read_text())["rows"]
    assert (out / "eval" / "report.json").is_file()

    # --reuse keeps finished runs: nothing is trained again
    calls.clear()
    compare(["grpo"], output_dir=str(out), max_steps=1, eval_num_prompts=3, eval_num_samples=1, max_new_tokens=4,
            bootstrap_resamples=200, runner=tiny_runner, reuse=True)
    assert calls == []


def test_unknown_config_and_failing_run_are_one_line(tmp_path, run_here):
    result = run_here("compare_algorithms.py", "--configs", "grpo", "nonesuch", "--output_dir", str(tmp_path))
    assert_one_line_error(result, "no shipped RL config named nonesuch")
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="grpo exited with 3"):
        compare(["grpo"], output_dir=str(tmp_path / "x"), runner=lambda script, flags: 3)
