"""Which algorithm should I use? Train every shipped RL config on the same task and budget, then
evaluate them together against the base on held-out prompts.

    python scripts/compare_algorithms.py --max_steps 10 [--configs grpo dapo ...] [--output_dir outputs/compare]
        [-- extra flags passed to every run, e.g. --learning_rate 1e-4]

Each config in configs/ whose header names an RL train script runs through that script, one after
another (so timings do not compete), with the same dataset (builtin:prompts), reward (sentiment),
steps, response length and seed. Then rlhf.evaluate samples every final adapter and the base with
the same prompts and seeds. Writes compare.md (also printed), compare.json and compare.png: reward
and its gain over the base with bootstrap 95% intervals over prompts, KL to the base, median
seconds per step. The runs stay in output_dir/<config>, the evaluation in output_dir/eval.
"""

from __future__ import annotations

import argparse

from rlhf.cli import exit_on_user_error


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, help="Config names (default: every shipped RL config).")
    parser.add_argument("--max_steps", type=int, default=10)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_num_prompts", type=int, default=40, help="Held-out prompts (eval split of builtin:prompts).")
    parser.add_argument("--eval_num_samples", type=int, default=2, help="Samples per prompt and checkpoint.")
    parser.add_argument("--output_dir", default="outputs/compare")
    parser.add_argument("--reuse", action="store_true", help="Keep runs whose final/ exists instead of retraining them.")
    args, extra = parser.parse_known_args(argv)
    extra = [flag for flag in extra if flag != "--"]

    def run() -> None:
        from rlhf.compare import compare, render_table

        result = compare(args.configs, output_dir=args.output_dir, max_steps=args.max_steps, task_flags=extra,
                         eval_num_prompts=args.eval_num_prompts, eval_num_samples=args.eval_num_samples,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, reuse=args.reuse)
        print(render_table(result))
        print(f"written: {args.output_dir}/compare.md, compare.json, compare.png")

    exit_on_user_error(run)


if __name__ == "__main__":
    main()
