"""The registries: entries take only what they declare, say what they need, and bring their own
hyperparameters (policy_loss_kwargs / advantage_kwargs) without touching the config."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURES
from rlhf import algorithms as A
from rlhf.algorithms import Registry
from rlhf.config import UPDATE_METHODS, RLConfig
from rlhf.errors import ConfigError


def test_an_entry_is_passed_only_the_inputs_it_declares():
    registry = Registry("policy loss", inputs=("logprobs", "old_logprobs", "advantages", "mask", "loss_agg_mode"))
    seen = {}

    @registry.register("probe")
    def probe(logprobs, old_logprobs, advantages, mask, *, beta: float = 0.5, loss_agg_mode: str = "token-mean"):
        seen.update(beta=beta, loss_agg_mode=loss_agg_mode)
        return logprobs.sum(), {}

    registry["probe"](torch.zeros(1), None, None, None, beta=2.0, clip_range=0.2, values=object(),
                      loss_agg_mode="seq-mean-token-sum")
    assert seen == {"beta": 2.0, "loss_agg_mode": "seq-mean-token-sum"}
    assert registry["probe"].hyperparameters == {"beta": 0.5}  # loss_agg_mode is an input, not a setting
    assert registry["probe"].__doc__ == probe.__doc__ and registry["probe"].__name__ == "probe"
    with pytest.raises(ValueError, match="has no parameter 'betta'; did you mean 'beta'"):
        registry["probe"].check_kwargs({"betta": 1.0}, "policy_loss_kwargs")
    with pytest.raises(ValueError, match="unknown needs"):
        registry.register("bad", critic=True)(probe)


def test_required_inputs_are_named_when_missing():
    with pytest.raises(ValueError, match="'gae' needs values"):
        A.ADVANTAGE_ESTIMATORS["gae"](torch.zeros(1, 2), torch.ones(1, 2), values=None)


def test_needs_metadata_not_names_drives_the_config():
    assert RLConfig(advantage_estimator="gae").needs_value_head
    assert not RLConfig(advantage_estimator="reinforce").needs_value_head
    with pytest.raises(ConfigError, match="num_generations >= 2"):
        RLConfig(advantage_estimator="rloo", num_generations=1)
    try:
        @A.ADVANTAGE_ESTIMATORS.register("critic_probe", values=True, groups=True)
        def critic_probe(token_rewards, mask, *, values, group_ids):
            return values, values

        with pytest.raises(ConfigError, match="num_generations >= 2"):
            RLConfig(advantage_estimator="critic_probe")
        assert RLConfig(advantage_estimator="critic_probe", num_generations=2).needs_value_head
    finally:
        del A.ADVANTAGE_ESTIMATORS["critic_probe"]


def test_update_methods_in_the_config_are_the_registered_updaters():
    from rlhf.update import UPDATERS

    assert set(UPDATERS) == set(UPDATE_METHODS)


def test_kwargs_settings_are_checked_against_the_functions_parameters():
    assert RLConfig(policy_loss="cispo", policy_loss_kwargs={"epsilon_high": 4.0}).policy_loss_kwargs == {"epsilon_high": 4.0}
    with pytest.raises(ConfigError, match="policy_loss_kwargs: policy loss 'cispo' has no parameter 'epsilon_hi'; "
                                          "did you mean 'epsilon_high'"):
        RLConfig(policy_loss="cispo", policy_loss_kwargs={"epsilon_hi": 4.0})
    with pytest.raises(ConfigError, match="advantage_kwargs: advantage estimator 'grpo' has no parameter 'lam'"):
        RLConfig(advantage_estimator="grpo", num_generations=2, advantage_kwargs={"lam": 0.9})
    with pytest.raises(ConfigError, match="has no parameter 'values'"):  # inputs are no settings
        RLConfig(advantage_estimator="gae", advantage_kwargs={"values": 1})
    # YAML reads 1e-4 as a string; a float hyperparameter takes it as the number
    assert RLConfig(advantage_estimator="grpo", num_generations=2, advantage_kwargs={"eps": "1e-4"}).advantage_kwargs == {"eps": 1e-4}
    with pytest.raises(ConfigError, match=r"advantage estimator 'grpo' refuses them \(grpo: eps must be > 0"):
        RLConfig(advantage_estimator="grpo", num_generations=2, advantage_kwargs={"eps": 0})


def test_loss_agg_mode_left_unset_is_the_losss_own_default():
    assert RLConfig(policy_loss="gspo").aggregation == "seq-mean-token-mean"
    assert RLConfig(policy_loss="ppo_clip").aggregation == "token-mean"
    assert RLConfig(policy_loss="gspo", loss_agg_mode="token-mean").aggregation == "token-mean"


def test_a_newcomers_loss_with_its_own_hyperparameter_trains_from_one_file(tiny_model_dir, tmp_path):
    """The newcomer's task: a loss function + this test, nothing else edited."""
    from rlhf.trainer import RLTrainer

    calls = []
    try:
        @A.POLICY_LOSSES.register("scaled_pg")
        def scaled_pg(logprobs, old_logprobs, advantages, mask, *, scale: float = 1.0, loss_agg_mode="token-mean",
                      norm_length=None):
            """-scale * A * lp:  logprobs, advantages, mask [B, T] -> scalar."""
            calls.append(scale)
            return A.agg_loss(-scale * advantages.detach() * logprobs, mask, loss_agg_mode, norm_length), {}

        config = RLConfig(
            model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path), max_steps=1, rollout_batch_size=2,
            num_generations=2, mini_batch_size=4, max_new_tokens=6, max_prompt_length=48, lora_r=4, lora_alpha=8,
            advantage_estimator="grpo", policy_loss="scaled_pg", policy_loss_kwargs={"scale": 3.0}, kl_coef=0.0,
            num_samples_to_log=0, reward_funcs=[f"{FIXTURES / 'rewards.py'}:char_diversity"])
        RLTrainer(config).train()
    finally:
        del A.POLICY_LOSSES["scaled_pg"]
    assert calls and all(scale == 3.0 for scale in calls)  # the config's check of the value, then the update
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["grad_norm"] > 0
