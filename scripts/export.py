"""Merge a trained adapter into its base and write a standalone model dir:

    python scripts/export.py --checkpoint outputs/ppo --output_dir outputs/ppo-merged [--dtype bfloat16]

Loads with AutoModelForCausalLM.from_pretrained(outputs/ppo-merged) (see rlhf/export.py).
"""

from rlhf.cli import export_main

if __name__ == "__main__":
    export_main()
