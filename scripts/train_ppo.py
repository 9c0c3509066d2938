"""PPO fine-tuning: `python scripts/train_ppo.py --config configs/ppo.yaml [--key value ...]`.

Works under `accelerate launch [--config_file configs/accelerate/...] scripts/train_ppo.py ...`.
"""

from rlhf.cli import train_main

if __name__ == "__main__":
    train_main("ppo")
