"""Where a run's metrics and completions become visible: W&B (offline here), TensorBoard and
metrics.jsonl, under the names TRL users look for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FIXTURES, tiny_args
from rlhf.tracking import markdown_table, tracker_names

def small_grpo(tiny_model_dir, out, *extra):
    """Flags of a one-step GRPO run of 2 prompts x 2 samples on the tiny model."""
    return tiny_args(tiny_model_dir, out, "--config", "configs/grpo.yaml", "--num_generations", "2",
                     "--rollout_batch_size", "2", "--max_steps", "1", *extra)


TWO_REWARDS = ("--reward_funcs", f"{FIXTURES / 'rewards.py'}:char_diversity", f"{FIXTURES / 'rewards.py'}:reward_each_e")


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """A two-step GRPO run reporting to TensorBoard and offline W&B, named by W&B's variables."""
    from conftest import run_in_process

    out = tmp_path_factory.mktemp("tracked") / "run"
    args = tiny_args(tiny_model_dir, out, "--config", "configs/grpo.yaml", "--num_generations", "2",
                     "--rollout_batch_size", "2", *TWO_REWARDS, "--report_to", "jsonl", "tensorboard", "wandb")
    result = run_in_process("train_grpo.py", *args,
                            env={"WANDB_PROJECT": "my-project", "WANDB_NAME": "my-run", "WANDB_MODE": "offline"})
    return result, out


def test_names_come_from_the_config_then_wandb_variables_then_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_NAME", raising=False)
    assert tracker_names(None, None, tmp_path / "out") == ("rlhf", "out")
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_NAME", "env-run")
    assert tracker_names(None, None, tmp_path / "out") == ("env-project", "env-run")
    assert tracker_names("cfg-project", "cfg-run", tmp_path / "out") == ("cfg-project", "cfg-run")


def test_trl_names_for_project_and_printed_completions_are_read():
    from rlhf.config import RLConfig
    from rlhf.parsing import parse_dataclass

    config = parse_dataclass(RLConfig, ["--project", "p", "--run_name", "r", "--num_completions_to_print", "3",
                                   "--log_completions", "false"])
    assert (config.project_name, config.run_name, config.num_samples_to_log, config.log_completions) == ("p", "r", 3, False)


def test_wandb_run_gets_project_name_and_completion_tables(tracked_run):
    result, out = tracked_run
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = out.glob("wandb/offline-run-*")
    # The offline run's record holds the project and run name as plain protobuf strings.
    record = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert b"my-project" in record and b"my-run" in record
    tables = sorted(run_dir.glob("files/media/table/completions_*.table.json"))
    assert len(tables) == 2, "one completions table per logged step"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion", "char_diversity", "reward_each_e", "reward", "advantage"]
    assert len(table["data"]) == 4  # every sample of the step (2 prompts x 2 generations)
    for step, prompt, completion, diversity, each_e, reward, advantage in table["data"]:
        assert step in (1, 2) and prompt and isinstance(completion, str)
        assert reward == pytest.approx(diversity + each_e, abs=1e-5)
        assert advantage is not None
    # GRPO: the two samples of a prompt have opposite advantages (or both zero)
    advantages = [row[-1] for row in table["data"]]
    assert advantages[0] == pytest.approx(-advantages[1], abs=1e-5)


def test_tensorboard_events_and_completion_text_under_output_dir_tensorboard(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, out = tracked_run
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(out / "tensorboard" / "my-run"), size_guidance={"tensors": 0})
    events.Reload()
    assert {"reward_mean", "rewards/char_diversity/mean", "frac_reward_zero_std"} <= set(events.Tags()["scalars"])
    texts = events.Tensors("completions/text_summary")
    assert [t.step for t in texts] == [1, 2]
    text = texts[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| prompt | completion | char_diversity | reward_each_e | reward | advantage |")
    assert len(text.splitlines()) == 2 + 4


def test_trl_named_metrics_in_metrics_jsonl(tracked_run):
    result, out = tracked_run
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        mine = [s for s in samples if s["step"] == row["step"]]
        for name in ("char_diversity", "reward_each_e"):
            assert row[f"rewards/{name}/std"] >= 0
        assert row["reward_mean"] == pytest.approx(
            row["rewards/char_diversity/mean"] + row["rewards/reward_each_e/mean"], abs=1e-5)
        assert 0 <= row["frac_reward_zero_std"] <= 1
        assert row["completions/min_length"] <= row["completions/mean_length"] <= row["completions/max_length"] <= 8
        assert row["completions/mean_length"] == pytest.approx(row["response_length_mean"])
        assert row["completions/clipped_ratio"] == pytest.approx(1 - row["eos_rate"])
        for spread in ("min", "mean", "max"):  # the tiny random model never ends a response: none terminated
            assert row[f"completions/{spread}_terminated_length"] is None
        assert mine, "samples.jsonl has rows of every logged step"


def test_the_function_std_is_bessel_corrected_and_skips_not_applicable():
    import math

    import torch

    from rlhf.scoring import function_reward_stats

    class OneProcess:
        def gather(self, tensor):
            return tensor

    stats = function_reward_stats("f", torch.tensor([1.0, float("nan"), 3.0, 5.0]), OneProcess())
    assert stats == {"rewards/f/mean": 3.0, "rewards/f/std": pytest.approx(2.0)}
    assert math.isnan(function_reward_stats("f", torch.tensor([float("nan")]), OneProcess())["rewards/f/mean"])


def test_markdown_table_keeps_cells_on_their_row():
    text = markdown_table([{"prompt": "a | b\nc", "reward": 0.123456, "advantage": None}])
    assert text.splitlines() == ["| prompt | reward | advantage |", "|---|---|---|", "| a \\| b<br>c | 0.1235 |  |"]


def test_no_tables_when_log_completions_is_off(tiny_model_dir, tmp_path, run_here):
    out = tmp_path / "run"
    result = run_here("train_grpo.py", *small_grpo(tiny_model_dir, out, "--report_to", "tensorboard",
                                                   "--log_completions", "false"))
    assert result.returncode == 0, result.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / Path(out).name))
    events.Reload()
    assert "reward_mean" in events.Tags()["scalars"] and not events.Tags()["tensors"]


def test_wandb_without_login_or_offline_mode_is_one_line_before_anything_is_written(tiny_model_dir, tmp_path, run_here):
    from conftest import assert_one_line_error

    out = tmp_path / "run"
    home = tmp_path / "home"
    home.mkdir()
    result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, out, "--report_to", "wandb"),
                      env={"WANDB_MODE": "online", "WANDB_API_KEY": "", "NETRC": str(home / ".netrc"), "HOME": str(home)})
    assert_one_line_error(result, "report_to wandb", "wandb login", "WANDB_MODE=offline")
    assert not out.exists()


def test_markdown_table_escapes_backslashes_before_pipes():
    assert markdown_table([{"completion": "use a\\|b"}]).splitlines()[-1] == "| use a\\\\\\|b |"


def test_wandb_login_check_accepts_what_wandb_accepts(monkeypatch, tmp_path):
    from rlhf.errors import ConfigError
    from rlhf.tracking import check_wandb_login

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(ConfigError):
        check_wandb_login(["wandb"])
    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text("machine api.wandb.ai login user password k\n")
    netrc_file.chmod(0o644)  # Python's default netrc lookup refuses this; wandb reads it
    check_wandb_login(["wandb"])
    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")  # wandb's netrc entry names host:port
    with pytest.raises(ConfigError):
        check_wandb_login(["wandb"])
    netrc_file.write_text("machine localhost:8080 login user password k\n")
    check_wandb_login(["wandb"])
    netrc_file.unlink()
    (tmp_path / "wandb-config").mkdir()
    (tmp_path / "wandb-config" / "settings").write_text("[default]\nmode = offline\n")  # `wandb offline`
    check_wandb_login(["wandb"])


def test_logged_rewards_are_the_raw_ones_with_normalised_training_scores(tiny_model_dir, tmp_path, run_here):
    out = tmp_path / "run"
    result = run_here("train_grpo.py", *small_grpo(tiny_model_dir, out, "--normalize_rewards", "true",
                                                   "--reward_clip", "0.4"))
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4  # every sample of the step
    assert sum(s["reward"] for s in samples) / 4 == pytest.approx(row["reward_mean"], abs=1e-5)
    assert row["reward_mean"] > 0.1  # char_diversity is positive; normalised scores would average 0


def test_resume_purges_later_tensorboard_steps_and_overwrite_deletes_them(tiny_model_dir, tmp_path, run_here):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    common = ("--report_to", "tensorboard", "--log_completions", "false", "--max_steps", "3", "--save_steps", "1")
    assert run_here("train_grpo.py", *small_grpo(tiny_model_dir, out, *common)).returncode == 0
    resumed = run_here("train_grpo.py", *small_grpo(tiny_model_dir, out, *common,
                                                    "--resume_from_checkpoint", str(out / "checkpoints" / "step-2")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = EventAccumulator(str(out / "tensorboard" / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [1, 2, 3]  # step 3 once, the new branch's
    from rlhf.lineage import delete_run_outputs

    delete_run_outputs(out)
    assert not (out / "tensorboard").exists()


def test_completion_length_metrics_follow_trl():
    import torch

    from rlhf.tracking import throughput

    class OneProcess:
        def sum(self, value):
            return torch.as_tensor(value, dtype=torch.float32)

        def mean(self, value):
            return float(torch.as_tensor(value).mean())

        def gather(self, tensor):
            return tensor

    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.float32)
    metrics = throughput(type("R", (), {"mask": mask, "eos_found": torch.tensor([True, False, True]),
                                        "__len__": lambda self: 3})(), OneProcess(), 1.0, 0.5, 0.5)
    assert (metrics["completions/min_length"], metrics["completions/max_length"]) == (2.0, 4.0)
    assert metrics["completions/mean_length"] == pytest.approx(3.0)
    assert metrics["completions/clipped_ratio"] == pytest.approx(1 / 3)
    assert (metrics["completions/min_terminated_length"], metrics["completions/mean_terminated_length"],
            metrics["completions/max_terminated_length"]) == (2.0, 2.5, 3.0)
