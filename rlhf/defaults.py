"""What each algorithm means besides its estimator: the settings a train script, ``RLConfig(...)``
and ``RLConfig.from_dict`` fill in where the user gave none (no heavy imports: the entry points
read it before torch loads)."""

from __future__ import annotations

from typing import Any

# The group methods differ only in their estimator (and RLOO/REINFORCE++ put KL in the reward);
# train_grpo.py runs all of them, picked by --config or --advantage_estimator.
_GROUP = {"policy_loss": "ppo_clip", "num_generations": 4, "whiten_advantages": False}
# What each train script means by its name; a --config file or CLI flag can still override.
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {"advantage_estimator": "gae", "policy_loss": "ppo_clip", "whiten_advantages": True},
    "reinforce": {"advantage_estimator": "reinforce", "policy_loss": "pg", "whiten_advantages": False},
    "grpo": {**_GROUP, "advantage_estimator": "grpo", "kl_in_reward": False, "kl_estimator": "k3"},
    "dr_grpo": {**_GROUP, "advantage_estimator": "dr_grpo", "kl_in_reward": False, "kl_estimator": "k3",
                "loss_agg_mode": "seq-mean-token-sum-norm"},
    "rloo": {**_GROUP, "advantage_estimator": "rloo", "kl_in_reward": True, "kl_estimator": "k1"},
    "reinforce_pp": {**_GROUP, "advantage_estimator": "reinforce_pp", "kl_in_reward": True, "kl_estimator": "k1"},
    "trpo": {"advantage_estimator": "gae", "update_method": "trpo", "whiten_advantages": True},
}
# Estimators without a script of their own (configs/reinforce_pp_baseline.yaml's settings).
_MORE_ESTIMATORS = {
    "reinforce_pp_baseline": {**_GROUP, "advantage_estimator": "reinforce_pp_baseline", "kl_in_reward": True,
                              "kl_estimator": "k1"},
}
# The RL settings that follow the estimator (PPO's: RLConfig's field defaults).
ESTIMATOR_SETTINGS = ("policy_loss", "num_generations", "whiten_advantages", "kl_in_reward", "kl_estimator",
                      "loss_agg_mode")


def estimator_defaults(estimator: str) -> dict[str, Any]:
    """Those of ESTIMATOR_SETTINGS that make ``estimator`` the algorithm its script trains (GRPO's
    k3 KL loss and no batch whitening, REINFORCE's plain policy gradient, ...); the ones missing
    here are RLConfig's field defaults (PPO's). An estimator registered by the user has none."""
    by_estimator = {d["advantage_estimator"]: d for name, d in ALGORITHM_DEFAULTS.items() if name != "trpo"}
    chosen = {**by_estimator, **_MORE_ESTIMATORS}.get(estimator, {})
    return {key: value for key, value in chosen.items() if key in ESTIMATOR_SETTINGS}
