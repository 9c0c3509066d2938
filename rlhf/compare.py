"""Which algorithm should I use? Every shipped RL config trained on the same task and step budget,
then evaluated together on held-out prompts (scripts/compare_algorithms.py).

Each config in configs/ names its entry point in its header (``python scripts/train_X.py --config
configs/<name>.yaml``); the RL ones (not DPO or reward-model training) run one after another, each
in its own process, so timings do not compete. Every run gets the same task flags (dataset,
reward, step budget, response length) on top of its own config. Then one ``rlhf.evaluate`` call
samples every final adapter and the base with the same prompts and seeds, so the reward gain over
the base is a paired difference per prompt, with a bootstrap 95% interval over prompts.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from rlhf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RL_SCRIPTS = ("train_ppo.py", "train_grpo.py", "train_reinforce.py", "train_trpo.py")
_ENTRY = re.compile(r"python scripts/(train_\w+\.py) --config configs/([\w-]+)\.yaml")

# A runner trains one config: (script, flags) -> exit code. The default is a fresh interpreter.
Runner = Callable[[str, list[str]], int]


def shipped_rl_configs(configs_dir: Path = CONFIGS) -> dict[str, str]:
    """name -> train script of every config whose header names an RL train script, sorted by name."""
    found = {}
    for path in sorted(configs_dir.glob("*.yaml")):
        scripts = [m.group(1) for m in _ENTRY.finditer(path.read_text()) if m.group(2) == path.stem]
        if scripts and scripts[0] in RL_SCRIPTS:
            found[path.stem] = scripts[0]
    return found


def subprocess_runner(script: str, flags: list[str]) -> int:
    command = [sys.executable, str(ROOT / "scripts" / script), *flags]
    print("+", " ".join(command), flush=True)
    return subprocess.run(command).returncode


def paired_gains(samples_path: Path, labels: list[str], base_label: str, seed: int,
                 resamples: int) -> dict[str, dict[str, float]]:
    """Per label: mean over prompts of (its reward - the base's, same prompt and sample seed),
    with a bootstrap 95% interval over prompts (rlhf.report.bootstrap_ci). Samples either side
    could not score (NaN) are left out."""
    from rlhf.report import bootstrap_ci

    per_prompt: dict[str, dict[int, list[float]]] = {label: defaultdict(list) for label in labels}
    for line in samples_path.read_text().splitlines():
        row = json.loads(line)
        base = row["responses"][base_label]["reward"]
        for label in labels:
            mine = row["responses"][label]["reward"]
            if base is not None and mine is not None and not (math.isnan(base) or math.isnan(mine)):
                per_prompt[label][row["prompt_index"]].append(mine - base)
    gains = {}
    for label in labels:
        values = [statistics.fmean(v) for _, v in sorted(per_prompt[label].items())]
        low, high = bootstrap_ci(values, seed, resamples)
        gains[label] = {"mean": statistics.fmean(values) if values else math.nan, "ci_low": low, "ci_high": high}
    return gains


def train_all(names: list[str], scripts: dict[str, str], output_dir: Path, max_steps: int, task_flags: list[str],
              runner: Runner, reuse: bool = False) -> dict[str, Path]:
    """Train each config (with ``reuse``, a run whose final/ exists is kept); name -> its run dir."""
    runs = {}
    for name in names:
        run_dir = output_dir / name
        if not (reuse and (run_dir / "final" / "adapter_config.json").is_file()):
            flags = ["--config", str(CONFIGS / f"{name}.yaml"), "--max_steps", str(max_steps),
                     "--output_dir", str(run_dir), "--save_steps", "0", "--overwrite_output_dir", "true", *task_flags]
            code = runner(scripts[name], flags)
            if code != 0:
                raise ConfigError(f"{name} exited with {code}; see its output above (its run dir: {run_dir})")
        runs[name] = run_dir
    return runs


def seconds_per_step(run_dir: Path) -> float:
    """Median wall time of the run's steps (metrics.jsonl step_time_s): robust to a busy moment.
    A damaged metrics.jsonl is a DataError (one line; rlhf.plots.read_metrics)."""
    from rlhf.plots import read_metrics

    times = [row["step_time_s"] for row in read_metrics(run_dir)
             if isinstance(row.get("step_time_s"), (int, float)) and not isinstance(row["step_time_s"], bool)]
    return statistics.median(times) if times else math.nan


def compare(names: list[str] | None = None, *, output_dir: str = "outputs/compare", max_steps: int = 10,
            task_flags: list[str] | None = None, eval_num_prompts: int = 40, eval_num_samples: int = 2,
            max_new_tokens: int = 32, seed: int = 0, bootstrap_resamples: int = 2000, reuse: bool = False,
            runner: Runner = subprocess_runner) -> dict[str, Any]:
    """Train ``names`` (default: every shipped RL config), evaluate them with the base, write
    compare.json, compare.md and compare.png to output_dir; returns compare.json's dict."""
    from rlhf.evaluate import BASE_LABEL, evaluate

    scripts = shipped_rl_configs()
    names = list(scripts) if not names else names
    unknown = [name for name in names if name not in scripts]
    if unknown:
        raise ConfigError(f"no shipped RL config named {', '.join(unknown)}; shipped: {', '.join(scripts)}")
    out = Path(output_dir)
    task = ["--dataset", "builtin:prompts", "--reward_funcs", "sentiment", "--max_new_tokens", str(max_new_tokens),
            "--seed", str(seed), *(task_flags or [])]
    runs = train_all(names, scripts, out, max_steps, task, runner, reuse)
    step_seconds = {name: seconds_per_step(run_dir) for name, run_dir in runs.items()}  # a damaged log stops it here
    finals = {name: str(run_dir / "final") for name, run_dir in runs.items()}
    report = evaluate(list(finals.values()), "builtin:prompts", ["sentiment"], str(out / "eval"), include_base=True,
                      num_samples=eval_num_samples, max_new_tokens=max_new_tokens, seed=seed,
                      num_prompts=eval_num_prompts, dataset_split="eval", bootstrap_resamples=bootstrap_resamples,
                      update_model_cards=False)
    gains = paired_gains(out / "eval" / "samples.jsonl", list(finals.values()), BASE_LABEL, seed, bootstrap_resamples)
    base = report["checkpoints"][BASE_LABEL]
    rows = []
    for name, final in finals.items():
        numbers = report["checkpoints"][final]
        rows.append({"config": name, "script": scripts[name], "reward": numbers["reward"], "gain": gains[final],
                     "kl_per_sequence": numbers["kl_per_sequence"], "seconds_per_step": step_seconds[name]})
    result = {"settings": {"max_steps": max_steps, "task_flags": task, "eval_num_prompts": report["settings"]["num_prompts"],
                           "eval_num_samples": eval_num_samples, "max_new_tokens": max_new_tokens, "seed": seed,
                           "eval_split": "eval"},
              "base_reward": base["reward"], "rows": rows}
    from rlhf.report import json_safe

    (out / "compare.json").write_text(json.dumps(json_safe(result), indent=2))
    (out / "compare.md").write_text(render_table(result))
    plot_comparison(result, out / "compare.png")
    return result


def _interval(numbers: dict[str, float], digits: int = 3) -> str:
    return f"{numbers['mean']:+.{digits}f} [{numbers['ci_low']:+.{digits}f}, {numbers['ci_high']:+.{digits}f}]"


def render_table(result: dict[str, Any]) -> str:
    """Markdown: one row per config, best reward gain first."""
    settings, base = result["settings"], result["base_reward"]
    lines = [f"Same task for every config: builtin:prompts, sentiment reward, {settings['max_steps']} steps, "
             f"{settings['max_new_tokens']} new tokens, seed {settings['seed']}; evaluated on "
             f"{settings['eval_num_prompts']} held-out prompts x {settings['eval_num_samples']} samples "
             f"(base reward {base['mean']:.3f} [{base['ci_low']:.3f}, {base['ci_high']:.3f}]).", "",
             "| config | reward (95% CI) | gain over base (95% CI) | KL/seq to base | s/step |", "|---|---|---|---|---|"]
    for row in sorted(result["rows"], key=lambda r: -r["gain"]["mean"] if not math.isnan(r["gain"]["mean"]) else math.inf):
        reward = row["reward"]
        lines.append(f"| {row['config']} | {reward['mean']:.3f} [{reward['ci_low']:.3f}, {reward['ci_high']:.3f}] | "
                     f"{_interval(row['gain'])} | {row['kl_per_sequence']['mean']:.2f} | {row['seconds_per_step']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict[str, Any], path: Path) -> None:
    """Reward gain over the base with its interval (left) against seconds per step (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["rows"], key=lambda r: r["gain"]["mean"])
    names = [row["config"] for row in rows]
    means = [row["gain"]["mean"] for row in rows]
    errors = [[m - row["gain"]["ci_low"] for m, row in zip(means, rows)],
              [row["gain"]["ci_high"] - m for m, row in zip(means, rows)]]
    figure, (gain_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.5), sharey=True)
    gain_axis.barh(names, means, xerr=errors, color="tab:blue", capsize=3)
    gain_axis.axvline(0.0, color="black", linewidth=0.8)
    gain_axis.set_xlabel("held-out reward gain over base (95% CI)")
    time_axis.barh(names, [row["seconds_per_step"] for row in rows], color="tab:gray")
    time_axis.set_xlabel("seconds per step (median)")
    figure.suptitle(f"{result['settings']['max_steps']} steps each, same task and seed")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
