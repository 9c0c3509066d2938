"""Reward-model training: `python scripts/train_reward_model.py --config configs/reward_model.yaml`.

The output dir works as a `--reward_funcs` entry of the RL scripts.
"""

from rlhf.cli import reward_model_main

if __name__ == "__main__":
    reward_model_main()
