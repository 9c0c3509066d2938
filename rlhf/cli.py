"""Entry points shared by scripts/*.py and the ``rlhf`` console command.

Bad input (rlhf.errors.UserError) becomes one line on stderr and exit code 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from rlhf.errors import UserError
from rlhf.signals import TrainingInterrupted

# What each train script means by its name; a --config file or CLI flag can still override.
# The group methods differ only in their estimator (and RLOO/REINFORCE++ put KL in the reward);
# train_grpo.py runs all four, picked by --config or --advantage_estimator.
_GROUP = {"policy_loss": "ppo_clip", "num_generations": 4, "whiten_advantages": False}
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {"advantage_estimator": "gae", "policy_loss": "ppo_clip", "whiten_advantages": True},
    "reinforce": {"advantage_estimator": "reinforce", "policy_loss": "pg", "whiten_advantages": False},
    "grpo": {**_GROUP, "advantage_estimator": "grpo", "kl_in_reward": False, "kl_estimator": "k3"},
    "dr_grpo": {**_GROUP, "advantage_estimator": "dr_grpo", "kl_in_reward": False, "kl_estimator": "k3",
                "loss_agg_mode": "seq-mean-token-sum-norm"},
    "rloo": {**_GROUP, "advantage_estimator": "rloo", "kl_in_reward": True, "kl_estimator": "k1"},
    "reinforce_pp": {**_GROUP, "advantage_estimator": "reinforce_pp", "kl_in_reward": True, "kl_estimator": "k1"},
    "trpo": {"advantage_estimator": "gae", "update_method": "trpo", "whiten_advantages": True},
}


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as exc:  # a signal, after the checkpoint was written
        print(str(exc), file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def train_main(algorithm: str, argv: list[str] | None = None) -> None:
    """``python scripts/train_<algorithm>.py [--config FILE] [--key value ...]``."""

    def run() -> None:
        from rlhf.config import parse_config

        config = parse_config(argv, ALGORITHM_DEFAULTS[algorithm], prog=f"train_{algorithm}.py",
                              description=f"{algorithm.upper()} fine-tuning of a LoRA policy (see README).")
        from rlhf.trainer import RLTrainer  # heavy imports only after the config is valid

        RLTrainer(config).train()

    exit_on_user_error(run)


def reward_model_main(argv: list[str] | None = None) -> None:
    """``python scripts/train_reward_model.py [--config configs/reward_model.yaml] [--key value ...]``."""

    def run() -> None:
        from rlhf.config import parse_config
        from rlhf.reward_training import RewardModelConfig, train_reward_model

        config = parse_config(argv, prog="train_reward_model.py", cls=RewardModelConfig,
                              description="Train a Bradley-Terry reward model with TRL's RewardTrainer.")
        metrics = train_reward_model(config)
        print(json.dumps(metrics))

    exit_on_user_error(run)


def dpo_main(argv: list[str] | None = None) -> None:
    """``python scripts/train_dpo.py [--config configs/dpo.yaml] [--key value ...]``."""

    def run() -> None:
        from rlhf.config import parse_config
        from rlhf.dpo import DPORunConfig, train_dpo

        config = parse_config(argv, prog="train_dpo.py", cls=DPORunConfig,
                              description="DPO on a LoRA adapter with TRL's DPOTrainer (output: final/ adapter).")
        print(json.dumps(train_dpo(config)))

    exit_on_user_error(run)


def evaluate_main(argv: list[str] | None = None) -> None:
    """``python scripts/evaluate.py --checkpoints A B [--include_base] [--key value ...]``."""

    def run() -> None:
        from rlhf.config import parse_config
        from rlhf.evaluate import EvalConfig, evaluate_from_config

        args = sys.argv[1:] if argv is None else list(argv)
        # --include_base works as a bare switch (as in the README); the parser wants a value.
        for index in reversed(range(len(args))):
            if args[index] == "--include_base" and (index + 1 == len(args) or args[index + 1].startswith("--")):
                args.insert(index + 1, "true")
        config = parse_config(args, prog="evaluate.py", cls=EvalConfig,
                              description="Compare checkpoints on a prompt set (report.md, report.json, plots).")
        report = evaluate_from_config(config)
        from rlhf.report import render_markdown

        print(render_markdown(report))

    exit_on_user_error(run)


def plot_metrics_main(argv: list[str] | None = None) -> None:
    """``python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] [--output_dir DIR]``."""

    def run() -> None:
        from pathlib import Path

        from rlhf.config import OneLineParser

        parser = OneLineParser(prog="plot_metrics.py", description="Training curves from metrics.jsonl files.")
        parser.add_argument("run_dirs", nargs="+", help="Run output dirs holding metrics.jsonl.")
        parser.add_argument("--output_dir", default=None, help="Where the PNGs go (default: RUN_DIR/plots).")
        args = parser.parse_args(argv)
        from rlhf.plots import plot_training_curves  # matplotlib only once the arguments are valid

        output = Path(args.output_dir) if args.output_dir else Path(args.run_dirs[0]) / "plots"
        for path in plot_training_curves([Path(d) for d in args.run_dirs], output):
            print(path)

    exit_on_user_error(run)


def main(argv: list[str] | None = None) -> None:
    """``rlhf train <algorithm> | train-dpo | train-reward-model | evaluate | plot-metrics [flags]``:
    the same code as the scripts."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands: dict[str, Callable[[list[str]], None]] = {
        "train-dpo": dpo_main, "train-reward-model": reward_model_main, "evaluate": evaluate_main,
        "plot-metrics": plot_metrics_main,
    }
    usage = (f"usage: rlhf train {{{','.join(ALGORITHM_DEFAULTS)}}} [--config FILE] [--key value ...] | "
             f"rlhf {{{','.join(commands)}}} [flags]")
    if argv and argv[0] in commands:
        commands[argv[0]](argv[1:])
        return
    if len(argv) < 2 or argv[0] != "train" or argv[1] not in ALGORITHM_DEFAULTS:
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return
        print(f"error: {usage}", file=sys.stderr)
        sys.exit(2)
    train_main(argv[1], argv[2:])
