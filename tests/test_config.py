"""Config precedence, parsing and validation (in-process, fast)."""

from __future__ import annotations

import pytest

from rlhf.config import RLConfig, parse_config
from rlhf.errors import ConfigError


def test_precedence_default_script_yaml_cli(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("learning_rate: 2.0e-5\nkl_coef: 0.2\nreward_funcs: [sentiment, a.py:f]\n")
    config = parse_config(["--config", str(config_file), "--kl_coef", "0.3"],
                          {"advantage_estimator": "reinforce", "policy_loss": "pg", "learning_rate": 1.0})
    assert config.advantage_estimator == "reinforce"  # script default
    assert config.learning_rate == 2e-5                # yaml over script default
    assert config.kl_coef == 0.3                       # cli over yaml
    assert config.reward_funcs == ["sentiment", "a.py:f"]
    assert config.value_clip_range == 0.2 and config.clip_range is None  # dataclass defaults (none = the loss's own)


def test_cli_types_lists_bools_and_none():
    config = parse_config(["--reward_funcs", "sentiment", "x.py:g", "--reward_weights", "1", "0.5",
                           "--whiten_advantages", "false", "--max_grad_norm", "none", "--max_steps", "3"])
    assert config.reward_weights == [1.0, 0.5]
    assert config.whiten_advantages is False
    assert config.max_grad_norm is None
    assert config.max_steps == 3


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"gamma": 1.5}, "gamma"),
        ({"advantage_estimator": "grpo", "num_generations": 1}, "num_generations >= 2"),
        ({"rollout_batch_size": 6, "mini_batch_size": 4}, "must divide"),
        ({"report_to": ["mlflow"]}, "report_to"),
        ({"dual_clip": 0.5}, "dual_clip"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_impossible_values_raise(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RLConfig(**overrides)


def test_world_size_checks():
    config = RLConfig(rollout_batch_size=6, mini_batch_size=6)
    with pytest.raises(ConfigError, match="cannot be split into whole groups over 4 processes"):
        config.check_world_size(4)
    config.check_world_size(2)
