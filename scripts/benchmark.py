"""Throughput against TRL on identical work: `python scripts/benchmark.py [--steps N] [--floor true] [--out bench.json]`.

Runs this project's GRPO, PPO and REINFORCE and TRL's GRPOTrainer back to back, each in its own
process; prints a table and writes JSON. See rlhf/benchmark.py.
"""

from rlhf.cli import benchmark_main

if __name__ == "__main__":
    benchmark_main()
