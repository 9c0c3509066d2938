"""REINFORCE fine-tuning: `python scripts/train_reinforce.py --config configs/reinforce.yaml [--key value ...]`.

Works under `accelerate launch [--config_file configs/accelerate/...] scripts/train_reinforce.py ...`.
"""

from rlhf.cli import train_main

if __name__ == "__main__":
    train_main("reinforce")
