"""Compare checkpoints on a prompt set:

    python scripts/evaluate.py --checkpoints outputs/ppo/final outputs/reinforce/final --include_base \
        --dataset builtin:prompts --reward_funcs sentiment --output_dir outputs/eval

Writes report.md, report.json, samples.jsonl and PNG plots; works under `accelerate launch`.
Each adapter of a run gets its summary beside it (evaluation.json) and in its model card.
"""

from rlhf.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
