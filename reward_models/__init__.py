"""Reward plug-ins behind one signature: ``fn(prompts, completions, **columns) -> list[float]``."""

from reward_models.builtins import BUILTIN_REWARDS, sentiment
from reward_models.loader import CombinedReward, RewardOutput, load_reward_function, reward_name

__all__ = ["BUILTIN_REWARDS", "CombinedReward", "RewardOutput", "load_reward_function", "reward_name", "sentiment"]
