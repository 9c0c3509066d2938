"""DPO: `python scripts/train_dpo.py --config configs/dpo.yaml [--key value ...]`.

Writes a PEFT adapter to <output_dir>/final; start RL from it with `--init_adapter <output_dir>/final`.
"""

from rlhf.cli import dpo_main

if __name__ == "__main__":
    dpo_main()
