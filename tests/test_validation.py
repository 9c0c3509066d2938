"""Issue 19 items 8-9: non-finite and out-of-range settings, non-UTF-8 data, hand-edited resume
files: one line on stderr and exit code 2 (or a ConfigError), never a traceback or a silent run."""

from __future__ import annotations

import json
import math

import pytest

from conftest import assert_one_line_error, tiny_args
from rlhf.config import LR_SCHEDULER_TYPES, RLConfig
from rlhf.errors import ConfigError


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--learning_rate", "inf"], ["learning_rate must be a finite number, got inf"]),
        (["--kl_coef", "inf"], ["kl_coef must be a finite number"]),
        (["--missing_eos_penalty", "nan"], ["missing_eos_penalty must be a finite number, got nan"]),
        (["--weight_decay=-1"], ["weight_decay must be >= 0, got -1"]),
        (["--temperature", "inf"], ["temperature must be a finite number"]),
        (["--seed", str(2**32)], ["seed must be an integer in 0..4294967295", "4294967296"]),
        (["--seed=-1"], ["seed must be an integer in 0..4294967295, got -1"]),
        (["--lr_scheduler_type", "cosine_annealing"], ["lr_scheduler_type 'cosine_annealing' is not one of", "linear", "cosine"]),
        (["--max_new_tokens", "1000000000"], ["max_prompt_length + max_new_tokens", "1,000,000", "--max_new_tokens"]),
        (["--reward_timeout", "0"], ["reward_timeout must be > 0 seconds or none"]),
    ],
)
def test_bad_numbers_on_cli_exit_2(args, fragments, tmp_path, run_here):
    result = run_here("train_ppo.py", "--output_dir", str(tmp_path / "out"), *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_non_finite_values_in_yaml_exit_2(tmp_path, run_here):
    for line, fragment in (("learning_rate: .inf", "learning_rate must be a finite number"),
                           ("kl_coef: .inf", "kl_coef must be a finite number"),
                           ("missing_eos_penalty: .nan", "missing_eos_penalty must be a finite number"),
                           ("temperature: .inf", "temperature must be a finite number"),
                           ("max_grad_norm: .inf", "max_grad_norm must be a finite number"),
                           ("max_new_tokens: 1000000000", "max_prompt_length + max_new_tokens")):
        config = tmp_path / "bad.yaml"
        config.write_text(line + "\n")
        assert_one_line_error(run_here("train_ppo.py", "--config", str(config), "--output_dir", str(tmp_path / "o")),
                              fragment)


@pytest.mark.parametrize("name", ["learning_rate", "value_learning_rate", "weight_decay", "temperature", "top_p",
                                  "missing_eos_penalty", "reward_clip", "max_grad_norm", "clip_range",
                                  "clip_range_high", "dual_clip", "value_clip_range", "vf_coef", "gamma", "lam",
                                  "baseline_decay", "overlong_penalty_factor", "kl_coef", "adaptive_kl_target",
                                  "adaptive_kl_horizon", "max_kl", "cg_damping", "lora_dropout", "reward_timeout"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_float_setting_must_be_finite(name, bad):
    with pytest.raises(ConfigError, match=f"^{name} must be a finite number"):
        RLConfig(**{name: bad})


@pytest.mark.parametrize("weights", [[math.nan], [math.inf], [1.0, -math.inf]])
def test_reward_weights_must_be_finite(weights):
    funcs = ["sentiment"] * len(weights)
    with pytest.raises(ConfigError, match="reward_weights must be"):
        RLConfig(reward_funcs=funcs, reward_weights=weights)


def test_nested_algorithm_kwargs_must_be_finite():
    with pytest.raises(ConfigError, match="policy_loss_kwargs clip_range must be a finite number, got inf"):
        RLConfig(policy_loss_kwargs={"clip_range": math.inf})
    with pytest.raises(ConfigError, match="advantage_kwargs lam must be a finite number, got nan"):
        RLConfig(advantage_kwargs={"lam": math.nan})


def test_good_values_still_accepted():
    config = RLConfig(seed=0, weight_decay=0.0, lr_scheduler_type="cosine", max_new_tokens=4096,
                      missing_eos_penalty=1.0, reward_clip=10.0)
    assert config.seed == 0
    RLConfig(seed=2**32 - 1)


def test_lr_scheduler_types_build_with_transformers():
    """The hard-coded list (config import stays free of transformers) is what get_scheduler can
    build from warm-up and total steps and step without a metric."""
    import torch
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    known = {s.value for s in SchedulerType}
    for name in LR_SCHEDULER_TYPES:
        assert name in known, name
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=4)
        optimizer.step()
        scheduler.step()


def test_non_utf8_jsonl_names_file_and_line(tiny_model_dir, tmp_path, run_here):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9 latin-1"}\n')
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--dataset", str(data)))
    assert_one_line_error(result, f"{data}:2: not UTF-8", "0xe9")


def test_utf8_bom_jsonl_still_reads(tmp_path):
    from rlhf.data import _check_jsonl_lines

    data = tmp_path / "data.jsonl"
    data.write_bytes('\ufeff{"prompt": "café"}\n'.encode("utf-8"))
    _check_jsonl_lines(data)


def test_hand_edited_resume_files_exit_2(tiny_model_dir, tmp_path, run_here):
    out = tmp_path / "run"
    assert run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--save_steps", "1")).returncode == 0
    resume = tiny_args(tiny_model_dir, out, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    before = (out / "metrics.jsonl").read_text()

    config_file = out / "config.yaml"
    good_config = config_file.read_text()
    config_file.write_text("learning_rate: [unclosed\n")
    assert_one_line_error(run_here("train_ppo.py", *resume), str(config_file), "fix or delete")
    config_file.write_text("- a list\n- not a mapping\n")
    assert_one_line_error(run_here("train_ppo.py", *resume), str(config_file), "mapping")
    config_file.write_text(good_config)

    state_file = out / "checkpoints" / "step-2" / "trainer_state.json"
    good_state = json.loads(state_file.read_text())
    for edit, fragment in (
        (lambda s: [s], "expected a JSON object, got list"),
        (lambda s: {k: v for k, v in s.items() if k != "sampler"}, "no 'sampler' entry"),
        (lambda s: {**s, "step": "two"}, "step must be an integer >= 0"),
        (lambda s: {**s, "kl_controller": {"value": "big"}}, "kl_controller.value"),
        # in range too: a negative coefficient rewards drifting from the reference; a step other than
        # the checkpoint's own skips (1e6 "finished" at once) or redoes steps
        (lambda s: {**s, "kl_controller": {"value": -1e30}}, "kl_controller.value is missing, of the wrong type or out of range"),
        (lambda s: {**s, "step": 1000000}, "step is 1000000 in the checkpoint of step 2"),
        (lambda s: {**s, "sampler": {"epoch": 0}}, "sampler.position"),
        (lambda s: {**s, "python_rng": [3, [1, 2], None]}, "python_rng"),
    ):
        state_file.write_text(json.dumps(edit(good_state)))
        result = run_here("train_ppo.py", *resume)
        assert_one_line_error(result, str(state_file), fragment)
    assert (out / "metrics.jsonl").read_text() == before  # a refused resume drops no rows


def test_a_budget_beyond_the_models_positions_exits_2(tiny_model_dir, tmp_path, run_here):
    """Issue 19 item 9. Before: 48 + 600 tokens on a model with 512 positions started training
    (rotary models degrade silently past their positions; learned tables fail with an index error)."""
    from conftest import assert_one_line_error, tiny_args

    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--max_new_tokens", "600"))
    assert_one_line_error(result, "max_prompt_length 48 + max_new_tokens 600 = 648 tokens exceeds the model's 512 "
                                  "positions (max_position_embeddings); lower max_new_tokens")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
