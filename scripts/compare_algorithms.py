"""Run several algorithms with the same step budget and print one markdown table.

    python scripts/compare_algorithms.py --max_steps 10 [--algorithms ppo grpo ...] [--output_dir outputs/compare]
        [-- extra flags passed to every run, e.g. --max_new_tokens 24]

Each algorithm runs its own configs/<name>.yaml through its train script, one after another (so
timings do not compete). Existing runs in output_dir/<name> are reused, not retrained.
Columns: reward_mean averaged over the first and the last `--window` steps, the last step's KL
(nats per sequence), and the median wall time per step (robust to a busy machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"ppo": "train_ppo.py", "reinforce": "train_reinforce.py", "trpo": "train_trpo.py",
           "grpo": "train_grpo.py", "dr_grpo": "train_grpo.py", "rloo": "train_grpo.py",
           "reinforce_pp": "train_grpo.py"}


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarise(name: str, rows: list[dict], window: int) -> str:
    rewards = [r["reward_mean"] for r in rows]
    head = sum(rewards[:window]) / len(rewards[:window])
    tail = sum(rewards[-window:]) / len(rewards[-window:])
    step_time = statistics.median(r["step_time_s"] for r in rows)
    kl = rows[-1]["kl"]
    return f"| {name} | {len(rows)} | {head:.3f} → {tail:.3f} | {kl:.2f} | {step_time:.1f} |"


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--max_steps", type=int, default=10)
    parser.add_argument("--window", type=int, default=3, help="Steps averaged at the start and at the end.")
    parser.add_argument("--output_dir", default="outputs/compare")
    args, extra = parser.parse_known_args(argv)
    extra = [flag for flag in extra if flag != "--"]
    table = ["| algorithm | steps | reward_mean first→last | final KL | median s/step |", "|---|---|---|---|---|"]
    for name in args.algorithms:
        run_dir = Path(args.output_dir) / name
        if not (run_dir / "final").is_dir():
            command = [sys.executable, str(ROOT / "scripts" / SCRIPTS[name]), "--config",
                       str(ROOT / "configs" / f"{name}.yaml"), "--max_steps", str(args.max_steps),
                       "--output_dir", str(run_dir), "--save_steps", "0", "--overwrite_output_dir", "true", *extra]
            print("+", " ".join(command), flush=True)
            if subprocess.run(command).returncode != 0:
                sys.exit(f"error: {name} failed; see its output above")
        table.append(summarise(name, read_rows(run_dir), args.window))
    print("\n".join(table))


if __name__ == "__main__":
    main()
