"""Reward outputs and local paths (issue 19, items 10 and 12): what is a batch of rewards, and
what is a path that must never be looked up on the hub."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_args

from reward_models import CombinedReward
from rlhf.errors import ConfigError, DataError, RewardError


@pytest.mark.parametrize("result,kind", [({"a": 1.0, "b": 2.0}, "dict"), ("10", "str"), (1.0, "float")])
def test_a_dict_string_or_scalar_is_not_a_batch(result, kind):
    """Before: a dict's keys or a string's characters became the rewards."""
    reward = CombinedReward([lambda completions, **kw: result])
    with pytest.raises(RewardError, match=f"returned {kind}, not a list of floats"):
        reward(["p", "q"], ["a", "b"])
    tolerant = CombinedReward([lambda completions, **kw: result], on_error="zero")(["p", "q"], ["a", "b"])
    assert tolerant.failed == [True, True]


def test_python_numpy_and_torch_booleans_count_alike():
    def flags(completions, **kwargs):
        return [True, np.bool_(True), torch.tensor(True), False]

    assert CombinedReward([flags])(["p"] * 4, ["a"] * 4).components["flags"] == [1.0, 1.0, 1.0, 0.0]


def test_system_exit_in_a_reward_is_an_error(tiny_model_dir, tmp_path, run_here):
    """Before: the run ended with exit code 0 and no output."""
    rewards = tmp_path / "quitter.py"
    rewards.write_text("import sys\n\ndef quitter(prompts, completions, **kwargs):\n    sys.exit(0)\n")
    with pytest.raises(RewardError, match="quitter' raised SystemExit"):
        CombinedReward([f"{rewards}:quitter"])(["p"], ["a"])
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--reward_funcs",
                                                       f"{rewards}:quitter"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: reward") and "SystemExit" in result.stderr


def test_empty_chat_message_content_is_refused_like_an_empty_string(tmp_path):
    from rlhf.data import load_prompt_dataset

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "  "}]}) + "\n")
    with pytest.raises(DataError, match="row 0: 'prompt' must be a non-empty string or a list of .* non-empty content"):
        load_prompt_dataset(str(data))


def test_missing_local_paths_are_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """README's outputs/reward_model before it exists was a hub id of user 'outputs'."""
    from rlhf import data
    from rlhf.models import resolve_model_path
    from rlhf.paths import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    assert looks_local("outputs/reward_model") and looks_local("./x") and looks_local("mydata/prompts")
    assert not looks_local("trl-lib/tldr") and not looks_local("Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(RewardError, match="reward model dir not found: outputs/reward_model"):
        CombinedReward(["outputs/reward_model"])
    with pytest.raises(ConfigError, match="no such local dir"):
        resolve_model_path("outputs/my-sft-model")

    def hub(*args, **kwargs):
        raise AssertionError("looked up on the hub")

    monkeypatch.setattr(data.datasets, "load_dataset", hub)
    with pytest.raises(DataError, match="dataset not found: mydata/prompts"):
        data.load_prompt_dataset("mydata/prompts")
