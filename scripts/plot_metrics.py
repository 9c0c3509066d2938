"""Training curves: `python scripts/plot_metrics.py outputs/ppo outputs/grpo [--output_dir plots/]`.

Draws reward.png, kl.png, loss.png, length.png and reward_functions.png (RL runs), loss.png,
accuracy.png and margin.png (DPO and reward-model runs) with one line per run from metrics.jsonl.
"""

from rlhf.cli import plot_metrics_main

if __name__ == "__main__":
    plot_metrics_main()
