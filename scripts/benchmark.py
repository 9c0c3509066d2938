"""Throughput against TRL on identical work: `python scripts/benchmark.py [--steps N] [--lengths 32 128 256]
[--roofline true] [--floor true] [--grow true] [--out bench.json]`.

Runs this project's GRPO, PPO and REINFORCE and TRL's GRPOTrainer back to back, each in its own
process, at each response length; prints one table and writes it (.md), the JSON and a plot (.png).
--grow: our GRPO's step time and memory against response length, group size and model size.
See rlhf/benchmark.py.
"""

from rlhf.cli import benchmark_main

if __name__ == "__main__":
    benchmark_main()
