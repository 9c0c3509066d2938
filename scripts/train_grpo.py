"""Group-relative RL without a critic: GRPO, Dr. GRPO, RLOO, REINFORCE++.

    python scripts/train_grpo.py --config configs/grpo.yaml          # or rloo / dr_grpo / reinforce_pp
Works under `accelerate launch [--config_file configs/accelerate/...] scripts/train_grpo.py ...`.
"""

from rlhf.cli import train_main

if __name__ == "__main__":
    train_main("grpo")
