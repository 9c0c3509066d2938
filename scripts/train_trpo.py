"""TRPO: natural-gradient steps of the LoRA policy inside a KL trust region.

    python scripts/train_trpo.py --config configs/trpo.yaml [--key value ...]
Works under `accelerate launch [--config_file configs/accelerate/...] scripts/train_trpo.py ...`.
"""

from rlhf.cli import train_main

if __name__ == "__main__":
    train_main("trpo")
