"""scripts/benchmark.py --learning: our GRPO and TRL's train for the same seconds, both adapters and
the base are evaluated on held-out prompts; the time stop ends each at a step boundary (fake clocks,
no timing asserts)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import assert_one_line_error, run_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_learning_race_trains_both_for_the_time_and_evaluates_both_and_the_base(tiny_model_dir, tmp_path):
    out = tmp_path / "race" / "race.json"
    result = run_script("benchmark.py", "--learning", "--seconds", "1", "--model", str(tiny_model_dir),
                        "--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "4", "--lora_r", "4",
                        "--eval_num_prompts", "3", "--eval_num_samples", "2", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kind"] == "learning" and report["settings"]["seconds"] == 1
    runs = tmp_path / "race" / "race-runs"
    for system in ("ours-grpo", "trl-grpo"):
        run = report["results"][system]
        assert "error" not in run, run
        assert run["steps"] >= 1 and run["optimizer_steps"] == run["steps"]  # one update per rollout
        assert run["samples"] == 4 * run["steps"]  # 2 prompts x 2 samples
        curve = run["curve"]
        assert [point["step"] for point in curve] == list(range(1, run["steps"] + 1))
        # stopped at the first step boundary at or after the budget, not before and not one later
        assert curve[-1]["seconds"] >= 1 and all(point["seconds"] < 1 for point in curve[:-1])
        assert run["trained_s"] == curve[-1]["seconds"]
        adapter = runs / system / "final"
        assert run["adapter"] == str(adapter) and (adapter / "adapter_model.safetensors").is_file()
        # TRL's adapter names the base as ours does, so rlhf.evaluate takes them for one base model
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base == str(tiny_model_dir)
    logged = (runs / "ours-grpo" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == report["results"]["ours-grpo"]["steps"]

    evaluation = report["evaluation"]
    assert evaluation["num_prompts"] == 3 and evaluation["dataset_split"] == "eval"
    for row in ("base", "ours-grpo", "trl-grpo"):
        reward = evaluation["results"][row]["reward"]
        assert reward["ci_low"] <= reward["mean"] <= reward["ci_high"]
        assert "kl_per_sequence" in evaluation["results"][row]
    for system in ("ours-grpo", "trl-grpo"):
        win = evaluation["results"][system]["win_rate_vs_base"]
        assert 0 <= win["ci_low"] <= win["rate"] <= win["ci_high"] <= 1
    assert 0 <= evaluation["ours_grpo_over_trl_grpo_win_rate"]["rate"] <= 1
    saved = json.loads((runs / "eval" / "report.json").read_text())
    assert saved["settings"]["dataset_split"] == "eval" and saved["settings"]["num_samples"] == 2
    assert set(saved["checkpoints"]) == {"base", str(runs / "ours-grpo" / "final"), str(runs / "trl-grpo" / "final")}

    table = out.with_suffix(".md").read_text()
    assert table.strip() in result.stdout
    interval = r"-?\d+\.\d{3} \[-?\d+\.\d{3}, -?\d+\.\d{3}\]"
    assert re.search(rf"^\| base \| — \| — \| — \| — \| {interval} \| — \| 0 \|", table, re.M), table
    for system in ("ours-grpo", "trl-grpo"):
        run = report["results"][system]
        done = rf"{run['steps']} \| {run['optimizer_steps']} \| {run['samples']} \| [\d.]+"
        row = rf"^\| {system} \| {done} \| {interval} \| {interval} \| {interval} \|"
        assert re.search(row, table, re.M), table
    assert "ours-grpo over trl-grpo" in table and "3 prompts of builtin:prompts (eval split) x 2 samples" in table
    assert out.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


def test_time_stop_ends_our_training_at_the_first_step_boundary_after_the_budget(tiny_model_dir, tmp_path):
    """A fake clock that reads one second per finished step: with 2.5 s the run stops after step 3
    (the first boundary at or after 2.5 s) and the trainer's own final save writes the adapter."""
    from rlhf.benchmark import BenchmarkConfig, ours_config
    from rlhf.learning_race import STEP_CAP, TimeBudget, TimedGRPO, optimizer_steps

    work = BenchmarkConfig(model=str(tiny_model_dir), prompts_per_step=2, num_generations=2, max_new_tokens=4, lora_r=4)
    trainer = None
    budget = TimeBudget(2.5, clock=lambda: float(trainer.step))
    trainer = TimedGRPO(ours_config("grpo", work, tmp_path / "run", STEP_CAP), budget)
    trainer.train()
    assert trainer.step == 3 and [(p["step"], p["seconds"]) for p in trainer.curve] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert trainer.samples_seen == 12 and optimizer_steps(trainer.optimizer) == 3
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert json.loads((final / "lineage.json").read_text())["step"] == 3


def test_trl_time_limit_stops_at_the_first_step_end_after_the_budget():
    from transformers import TrainerControl, TrainerState

    from rlhf.learning_race import TimeBudget, TimeLimit

    now = [100.0]
    limit = TimeLimit(TimeBudget(2.5, clock=lambda: now[0]))
    state, control = TrainerState(), TrainerControl()
    limit.on_train_begin(None, state, control)
    while not control.should_training_stop:  # as Trainer's loop does
        limit.scored([0.5, 1.5], 0.01)  # the reward function scores the step's generations
        now[0] += 1.0
        state.global_step += 1
        limit.on_step_end(None, state, control)
    assert state.global_step == 3 and limit.generations == 3 and limit.samples_seen == 6
    assert limit.curve == [{"step": s, "seconds": float(s), "reward": 1.0} for s in (1, 2, 3)]


@pytest.mark.parametrize(("args", "message"), [
    (["--seconds", "0"], "seconds must be > 0 (the wall time each system trains), got 0"),
    (["--seconds", "-5"], "seconds must be > 0 (the wall time each system trains), got -5"),
    (["--seconds", "soon"], "seconds expects"),
    (["--eval_num_samples", "0"], "eval_num_prompts and eval_num_samples must be >= 1"),
    (["--grow"], "learning races ours-grpo and trl-grpo for --seconds each: drop --grow"),
    (["--num_generations", "1"], "set num_generations >= 2"),
    (["--systems", "ours-ppo"], "their own systems: drop --systems"),
])
def test_bad_learning_input_is_one_line_and_exit_2(args, message, tmp_path, run_here):
    result = run_here("benchmark.py", "--learning", *args, "--out", str(tmp_path / "race.json"))
    assert_one_line_error(result, message)
    assert not list(tmp_path.iterdir())
