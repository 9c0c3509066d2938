"""Speed-ups must not change what is trained."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import FIXTURES
from rlhf.cli import ALGORITHM_DEFAULTS
from rlhf.config import RLConfig
from rlhf.trainer import RLTrainer


class AlwaysRecomputeOldLogprobs(RLTrainer):
    @property
    def old_logprobs_from_update(self) -> bool:
        return False


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_skipping_the_old_logprob_pass_gives_the_same_update(tiny_model_dir, tmp_path, kl_coef):
    """GRPO, one epoch, one minibatch: the old logprobs taken from the update's forward equal the
    no-grad pass's, so weights and logged metrics agree with the slow path."""
    runs = {}
    for name, cls in (("fast", RLTrainer), ("slow", AlwaysRecomputeOldLogprobs)):
        config = RLConfig(**{
            **ALGORITHM_DEFAULTS["grpo"], "model_name_or_path": str(tiny_model_dir),
            "output_dir": str(tmp_path / name), "max_steps": 2, "rollout_batch_size": 2, "num_generations": 2,
            "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6, "max_prompt_length": 48, "lora_r": 4,
            "lora_alpha": 8, "learning_rate": 1e-3, "kl_coef": kl_coef, "save_steps": 0, "num_samples_to_log": 0,
            "reward_funcs": [f"{FIXTURES / 'rewards.py'}:char_diversity"],
        })
        trainer = cls(config)
        assert trainer.old_logprobs_from_update is (name == "fast")
        trainer.train()
        runs[name] = tmp_path / name
    fast, slow = (load_file(str(runs[n] / "final" / "adapter_model.safetensors")) for n in ("fast", "slow"))
    assert max(float((fast[k] - slow[k]).abs().max()) for k in fast) < 1e-6
    rows = {n: [json.loads(line) for line in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in runs}
    for fast_row, slow_row in zip(rows["fast"], rows["slow"]):
        for key in ("reward_mean", "entropy", "policy_loss", "adv_mean"):
            assert fast_row[key] == pytest.approx(slow_row[key], abs=1e-5), key
        if kl_coef:
            assert fast_row["kl"] == pytest.approx(slow_row["kl"], abs=1e-5)


def test_old_logprob_pass_is_kept_where_it_is_needed():
    def trainer_for(**overrides):
        config = RLConfig(**{**ALGORITHM_DEFAULTS["grpo"], "rollout_batch_size": 4, "num_generations": 4,
                             "mini_batch_size": 16, "ppo_epochs": 1, **overrides})
        fake = object.__new__(RLTrainer)
        fake.config = config
        return fake

    assert trainer_for().old_logprobs_from_update
    assert not trainer_for(ppo_epochs=2).old_logprobs_from_update  # later epochs see a moved policy
    assert not trainer_for(mini_batch_size=8).old_logprobs_from_update  # so do later minibatches
    assert not trainer_for(kl_in_reward=True).old_logprobs_from_update  # KL in the reward needs them first
    assert not trainer_for(advantage_estimator="gae").old_logprobs_from_update  # values feed GAE
    assert not trainer_for(update_method="trpo").old_logprobs_from_update
