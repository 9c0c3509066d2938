"""scripts/benchmark.py runs both systems on the same work and reports ratios (no timing asserts)."""

from __future__ import annotations

import json
import math

from conftest import run_script


def test_benchmark_runs_ours_and_trl_and_the_floor(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("benchmark.py", "--model", str(tiny_model_dir), "--systems", "ours-grpo", "trl-grpo",
                        "--steps", "1", "--warmup_steps", "1", "--prompts_per_step", "2", "--num_generations", "2",
                        "--max_new_tokens", "4", "--lora_r", "4", "--floor", "true", "--profile", "true",
                        "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for system in ("ours-grpo", "trl-grpo"):
        numbers = report["results"][system]
        assert "error" not in numbers, numbers
        assert numbers["steps_measured"] == 1
        assert numbers["samples_per_second"] > 0 and numbers["peak_rss_mb"] > 50
        assert numbers["generation_s"] > 0 and numbers["update_s"] > 0
        assert math.isclose(numbers["samples_per_second"] * numbers["step_time_s"], 4)  # 2 prompts x 2
    ours, trl = report["results"]["ours-grpo"], report["results"]["trl-grpo"]
    assert math.isclose(report["ratios_ours_grpo_over_trl_grpo"]["samples_per_second"],
                        ours["samples_per_second"] / trl["samples_per_second"])
    assert report["results"]["floor"]["floor_step_s"] > 0 and report["ours_grpo_step_over_floor"] > 0
    assert "ours-grpo / trl-grpo: samples/s x" in result.stdout
    profile = (tmp_path / "bench.profile.txt").read_text()
    for phase in ("rollout", "score", "make_experience", "update"):
        assert f"## {phase}" in profile
    assert "aten::mm" in profile


def test_benchmark_unknown_system_exits_2(tmp_path, run_here):
    result = run_here("benchmark.py", "--systems", "openrlhf", "--out", str(tmp_path / "b.json"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown system(s) openrlhf; choose from ours-grpo, ours-ppo, ours-reinforce, trl-grpo")
    assert not (tmp_path / "b.json").exists()
