"""Entry points shared by scripts/*.py and the ``rlhf`` console command.

Bad input (rlhf.errors.UserError) becomes one line on stderr and exit code 2, as does a run that
needs more memory than it has (``out_of_memory``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from rlhf.defaults import ALGORITHM_DEFAULTS
from rlhf.errors import ConfigError, UserError
from rlhf.signals import TrainingInterrupted

# The repository's configs/ and scripts/ (absent from a plain `pip install`; then the built-in
# defaults above apply and the repo-only commands say so).
ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
# The config each script documents; without --config the script reads it, so that a run with no
# --config trains as the README describes, and --help shows those values.
DOCUMENTED_CONFIGS = {"ppo": "ppo.yaml", "reinforce": "reinforce.yaml", "grpo": "grpo.yaml", "trpo": "trpo.yaml",
                      "dr_grpo": "dr_grpo.yaml", "rloo": "rloo.yaml", "reinforce_pp": "reinforce_pp.yaml",
                      "dpo": "dpo.yaml", "reward_model": "reward_model.yaml"}


def documented_config(name: str) -> tuple[Path | None, str]:
    """(the documented config of ``name`` if present, a --help sentence saying where defaults come from)."""
    path = CONFIG_DIR / DOCUMENTED_CONFIGS[name]
    if path.is_file():
        return path, f"Defaults from configs/{path.name}; --config FILE is read instead of it, flags override either."
    return None, f"Defaults built in (configs/{path.name} is not here); --config FILE and flags override them."


def parse_train_args(algorithm: str, argv: list[str] | None = None, prog: str | None = None) -> Any:
    """What ``train_<algorithm>.py ARGV`` trains with."""
    from rlhf.config import RLConfig
    from rlhf.parsing import parse_dataclass

    path, defaults = documented_config(algorithm)
    return parse_dataclass(RLConfig, argv, ALGORITHM_DEFAULTS[algorithm], prog=prog or f"train_{algorithm}.py",
                           description=f"{algorithm.upper()} fine-tuning of a LoRA policy (see README). {defaults}",
                           default_config=path)


def parse_reward_model_args(argv: list[str] | None = None, prog: str | None = None) -> Any:
    from rlhf.parsing import parse_dataclass
    from rlhf.reward_training import RewardModelConfig

    path, defaults = documented_config("reward_model")
    return parse_dataclass(RewardModelConfig, argv, prog=prog or "train_reward_model.py", default_config=path,
                           description=f"Train a Bradley-Terry reward model with TRL's RewardTrainer. {defaults}")


def parse_dpo_args(argv: list[str] | None = None, prog: str | None = None) -> Any:
    from rlhf.dpo import DPORunConfig
    from rlhf.parsing import parse_dataclass

    path, defaults = documented_config("dpo")
    return parse_dataclass(DPORunConfig, argv, prog=prog or "train_dpo.py", default_config=path,
                           description=f"DPO on a LoRA adapter with TRL's DPOTrainer (output: final/ adapter). {defaults}")


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
    code = 0
    try:
        return fn()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except TrainingInterrupted as exc:  # a signal, after the checkpoint was written
        print(str(exc), file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except (MemoryError, RuntimeError, OSError) as exc:  # torch's OutOfMemoryError is a RuntimeError
        message = out_of_memory(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        code = 2
    finally:
        _leave_if_reward_calls_hang(code)
    sys.exit(code)


LOW_MEMORY_BYTES = 1 << 30
# what an allocation that failed says, where no exception class tells: torch's CPU allocator
# (Linux, Windows), a CUDA call outside PyTorch's allocator, cuBLAS, Apple's MPS backend
OUT_OF_MEMORY_TEXTS = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory",
                       "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "MPS backend out of memory")


def _memory_left() -> int:
    """What the process can still take, not shared among the machine's processes."""
    import psutil

    from rlhf.cpu_memory import address_space_headroom, cgroup_memory_headroom

    limits = [int(psutil.virtual_memory().available), cgroup_memory_headroom(), address_space_headroom()]
    return min(limit for limit in limits if limit is not None)


def out_of_memory(exc: BaseException) -> str | None:
    """The one line for an allocation that failed (a CPU allocation past the machine's memory, a
    cgroup's limit or ``ulimit -v``; a GPU's memory), or None for any other error. Checkpoints
    written before it stay; the run's settings asked for more memory than the process has."""
    import errno

    import torch

    text = str(exc).strip()
    first = text.splitlines()[0].rstrip(".") if text else ""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        found = first or "the GPU's memory ran out"
    elif isinstance(exc, MemoryError):
        found = first or "an allocation failed"
    elif isinstance(exc, OSError):
        if exc.errno != errno.ENOMEM:
            return None
        found = first
    elif any(marker in text for marker in OUT_OF_MEMORY_TEXTS):
        # the line that says so ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: ...")
        found = next(line for line in text.splitlines() if any(marker in line for marker in OUT_OF_MEMORY_TEXTS))
        marker = next(marker for marker in OUT_OF_MEMORY_TEXTS if marker in found)
        found = found[found.index(marker):].strip().rstrip(".")
    elif text == "could not create a primitive" and (left := _memory_left()) < LOW_MEMORY_BYTES:
        # oneDNN says only this when its allocation fails; its products were probed at the start
        # (an unsupported one says "could not create a primitive descriptor ...")
        found = f"oneDNN could not create a primitive with {left >> 20} MB left to this process"
    else:
        return None
    return (f"out of memory: {found}. Shorter sequences or smaller batches need less; "
            "or give the process more memory")


ABANDONED_CALLS_GRACE_SECONDS = 5.0


def _leave_if_reward_calls_hang(code: int) -> None:
    """A reward call given up on (reward_timeout, a signal) may still run in a daemon thread;
    interpreter shutdown can then abort inside native code (exit 134 after a successful run).
    Everything is written by now, so leave at once with the run's own exit code."""
    from reward_models.guard import abandoned_calls_running, wait_for_abandoned_calls

    if abandoned_calls_running() and not wait_for_abandoned_calls(ABANDONED_CALLS_GRACE_SECONDS):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def train_main(algorithm: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    """``python scripts/train_<algorithm>.py [--config FILE] [--key value ...]``."""

    def run() -> None:
        # the config's warnings (TRL defaults it leaves out, TRL names that mean something else here)
        # wait until the trainer is built: a model, dataset or reward file that is not there is
        # then its one error line, not that line after four of warnings
        with warnings.catch_warnings(record=True) as config_warnings:
            config = parse_train_args(algorithm, argv, prog)
        from rlhf.trainer import RLTrainer  # heavy imports only after the config is valid

        trainer = RLTrainer(config)
        for held in config_warnings:
            warnings.showwarning(held.message, held.category, held.filename, held.lineno)
        trainer.train()

    exit_on_user_error(run)


def reward_model_main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """``python scripts/train_reward_model.py [--config configs/reward_model.yaml] [--key value ...]``."""

    def run() -> None:
        config = parse_reward_model_args(argv, prog)
        from rlhf.reward_training import train_reward_model

        metrics = train_reward_model(config)
        print(json.dumps(metrics))

    exit_on_user_error(run)


def dpo_main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """``python scripts/train_dpo.py [--config configs/dpo.yaml] [--key value ...]``."""

    def run() -> None:
        config = parse_dpo_args(argv, prog)
        from rlhf.dpo import train_dpo

        print(json.dumps(train_dpo(config)))

    exit_on_user_error(run)


def evaluate_main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """``python scripts/evaluate.py --checkpoints A B [--include_base] [--key value ...]``."""

    def run() -> None:
        from rlhf.config import parse_config
        from rlhf.evaluate import EvalConfig, evaluate_from_config

        config = parse_config(argv, prog=prog or "evaluate.py", cls=EvalConfig,
                              description="Compare checkpoints on a prompt set (report.md, report.json, plots).")
        report = evaluate_from_config(config)
        from rlhf.report import render_markdown

        print(render_markdown(report))

    exit_on_user_error(run)


def plot_metrics_main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """``python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] [--output_dir DIR]``."""

    def run() -> None:
        from pathlib import Path

        from rlhf.config import OneLineParser

        parser = OneLineParser(prog=prog or "plot_metrics.py", description="Training curves from metrics.jsonl files.")
        parser.add_argument("run_dirs", nargs="+", help="Run output dirs holding metrics.jsonl.")
        parser.add_argument("--output_dir", default=None, help="Where the PNGs go (default: RUN_DIR/plots).")
        args = parser.parse_args(argv)
        from rlhf.plots import plot_training_curves  # matplotlib only once the arguments are valid

        output = Path(args.output_dir) if args.output_dir else Path(args.run_dirs[0]) / "plots"
        for path in plot_training_curves([Path(d) for d in args.run_dirs], output):
            print(path)

    exit_on_user_error(run)


def export_main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """``python scripts/export.py --checkpoint RUN_OR_ADAPTER --output_dir DIR [--dtype bfloat16]``."""

    def run() -> None:
        from rlhf.parsing import OneLineParser

        parser = OneLineParser(prog=prog or "export.py", description=(
            "Merge a trained adapter (a run's output_dir, its final/, or checkpoints/step-N) into its base model "
            "and write a standalone Hugging Face model dir (safetensors, tokenizer, chat template, "
            "generation_config with every end-of-response id)."))
        parser.add_argument("--checkpoint", required=True, help="Run dir, final/ dir or checkpoints/step-N dir.")
        parser.add_argument("--output_dir", required=True, help="Where the merged model goes.")
        parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                            help="Weight dtype of the export.")
        parser.add_argument("--overwrite", "--overwrite_output_dir", default="false", choices=["true", "false"],
                            help="Replace a non-empty output_dir (never the checkpoint's run nor its base model).")
        parser.add_argument("--push_to_hub", default="false", choices=["true", "false"],
                            help="Upload the export to the Hugging Face hub after writing it.")
        parser.add_argument("--hub_model_id", default=None, help="Hub repo (default: the output_dir's name).")
        parser.add_argument("--hub_private_repo", default=None, choices=["true", "false"], help="Create it private.")
        args = parser.parse_args(argv)
        from rlhf.export import export_merged

        target = export_merged(args.checkpoint, args.output_dir, args.dtype, overwrite=args.overwrite == "true")
        print(f"exported {args.checkpoint} -> {target}")
        if args.push_to_hub == "true":
            from rlhf.hub import push_folder

            private = None if args.hub_private_repo is None else args.hub_private_repo == "true"
            url = push_folder(target, args.hub_model_id or target.name, private, what="the merged model")
            print(f"pushed {target} to {url}")

    exit_on_user_error(run)


def serve_reward_main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """``python scripts/serve_reward.py --reward_funcs sentiment my_rewards.py:brevity --port 8000``."""

    def run() -> None:
        from rlhf.parsing import OneLineParser

        parser = OneLineParser(prog=prog or "serve_reward.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                               description="Serve reward functions over HTTP for `--reward_funcs http://HOST:PORT` "
                                           "in another process.")
        parser.add_argument("--reward_funcs", nargs="+", default=["sentiment"], help="Reward specs, as in training.")
        parser.add_argument("--reward_weights", nargs="+", type=float, default=None, help="One weight per reward.")
        parser.add_argument("--reward_kwargs", type=json.loads, default={}, help="JSON: parameters per reward name.")
        parser.add_argument("--host", default="127.0.0.1",
                            help="Interface to listen on. Another than loopback exposes the rewards to the network: "
                                 "set --token then.")
        parser.add_argument("--port", type=int, default=8000, help="TCP port.")
        parser.add_argument("--token", default=None,
                            help="Shared secret clients must send (Authorization: Bearer); default: $RLHF_REWARD_TOKEN. "
                                 "Clients: reward_kwargs {\"host:port\": {\"token\": ...}} or the same variable.")
        parser.add_argument("--max_body_bytes", type=int, default=16 * 1024 * 1024, help="Largest request body.")
        parser.add_argument("--timeout", type=float, default=30.0, help="Seconds a connection may stay silent.")
        parser.add_argument("--workers", type=int, default=8, help="Requests served at once.")
        parser.add_argument("--max_queued", type=int, default=64,
                            help="Connections that may wait for a worker; more get 503 (clients retry).")
        args = parser.parse_args(argv)
        from reward_models.loader import CombinedReward
        from reward_models.server import TOKEN_ENV, make_server

        if min(args.max_body_bytes, args.workers) < 1 or args.max_queued < 0 or not args.timeout > 0:
            raise ConfigError("max_body_bytes and workers must be >= 1, max_queued >= 0 and timeout > 0")
        token = args.token or os.environ.get(TOKEN_ENV) or None
        if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
            print(f"warning: serving on {args.host} without --token: anyone who reaches the port can call the "
                  "rewards", file=sys.stderr, flush=True)
        server = make_server(CombinedReward(args.reward_funcs, args.reward_weights, args.reward_kwargs),
                             args.host, args.port, token=token, max_body_bytes=args.max_body_bytes,
                             timeout=args.timeout, workers=args.workers, max_queued=args.max_queued)
        print(f"serving {', '.join(args.reward_funcs)} on http://{args.host}:{server.server_port}", flush=True)
        server.serve_forever()

    exit_on_user_error(run)


def benchmark_main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """``python scripts/benchmark.py [--lengths 32 128 256] [--roofline true] [--grow true] [--learning true
    --seconds 600] [--out bench.json]``."""

    def run() -> None:
        from rlhf.benchmark import BenchmarkConfig, benchmark_to_files, stopping_on_sigterm
        from rlhf.config import parse_config

        config = parse_config(argv, cls=BenchmarkConfig, prog=prog or "benchmark.py",
                              description="This project's trainers vs TRL's GRPOTrainer on identical work, at one or "
                                          "more response lengths; or (--grow) our GRPO against length, group and "
                                          "model size; or (--learning) what our GRPO and TRL's learn in --seconds "
                                          "each, evaluated on held-out prompts.")
        with stopping_on_sigterm():
            report, table, written = benchmark_to_files(config)
        print(table)
        print("written: " + ", ".join(map(str, written)))
        profile = report["runs"][0]["results"].get("profile", {}) if report["kind"] == "sweep" else {}
        if config.profile and "error" in profile:
            print(f"the profile of one ours-grpo step failed: {profile['error']}")

    exit_on_user_error(run)


def repo_script(name: str) -> Callable[[list[str], str], None]:
    """A developer tool that lives in the repository's scripts/ (it reads configs/ or writes
    rlhf/data/), run as ``rlhf <command>`` from a checkout."""

    def run(argv: list[str], prog: str) -> None:
        path = ROOT / "scripts" / f"{name}.py"
        if not path.is_file():
            print(f"error: {prog} runs scripts/{name}.py of the repository checkout, which this install lacks",
                  file=sys.stderr)
            sys.exit(2)
        runpy.run_path(str(path), run_name=f"scripts.{name}")["main"](argv, prog)

    return run


COMMANDS: dict[str, Callable[[list[str], str], None]] = {
    "train-dpo": dpo_main, "train-reward-model": reward_model_main, "evaluate": evaluate_main, "export": export_main,
    "plot-metrics": plot_metrics_main, "serve-reward": serve_reward_main, "benchmark": benchmark_main,
    "compare-algorithms": repo_script("compare_algorithms"), "make-preference-data": repo_script("make_preference_data"),
}


def main(argv: list[str] | None = None) -> None:
    """``rlhf train <algorithm> | <command> [flags]``: the same code as scripts/*.py."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = (f"usage: rlhf train {{{','.join(ALGORITHM_DEFAULTS)}}} [--config FILE] [--key value ...] | "
             f"rlhf {{{','.join(COMMANDS)}}} [flags]")
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:], f"rlhf {argv[0]}")
        return
    if len(argv) < 2 or argv[0] != "train" or argv[1] not in ALGORITHM_DEFAULTS:
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return
        print(f"error: {usage}", file=sys.stderr)
        sys.exit(2)
    train_main(argv[1], argv[2:], prog=f"rlhf train {argv[1]}")


if __name__ == "__main__":
    main()
