"""The table and plot of a learning race (rlhf.learning_race): what each system learned in the
same wall time, on held-out prompts, beside the steps and samples it got through."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from rlhf.benchmark_report import RANDOM_NOTE, _cells, _number, malloc_note  # noqa: E402

HEADERS = ("system", "steps", "optimizer steps", "samples", "trained s", "reward ↑ (95% CI)",
           "win vs base ↑ (95% CI)", "KL/seq to base (95% CI)", "length (tokens)")
ROWS = ("base", "ours-grpo", "trl-grpo")


def _interval(value: dict[str, float] | None) -> str:
    if not value:
        return "—"
    middle = value.get("mean", value.get("rate"))
    return f"{_number(middle)} [{_number(value['ci_low'])}, {_number(value['ci_high'])}]"


def render_race(report: dict[str, Any]) -> str:
    """One row per system and one for the base: training done in the time (steps, optimizer
    steps, samples) and the held-out evaluation (reward, win rate vs the base, KL to it)."""
    settings, evaluation = report["settings"], report["evaluation"]
    evaluated = evaluation.get("results", {})
    lines = [_cells(list(HEADERS)), "|---" * len(HEADERS) + "|"]
    for name in ROWS:
        run = report["results"].get(name, {})
        if "error" in run:
            lines.append(_cells([name, f"training failed: {run['error']}"]))
            continue
        done = (["—"] * 4 if name == "base" else
                [str(run["steps"]), str(run["optimizer_steps"]), str(run["samples"]), _number(run["trained_s"], 1)])
        numbers = evaluated.get(name)
        if numbers is None:
            lines.append(_cells([name, *done, "not evaluated", "—", "—", "—"]))
            continue
        lines.append(_cells([name, *done, _interval(numbers["reward"]), _interval(numbers.get("win_rate_vs_base")),
                             _interval(numbers["kl_per_sequence"]) if name != "base" else "0",
                             _number(numbers["response_length"], 1)]))
    notes = []
    if "ours_grpo_over_trl_grpo_win_rate" in evaluation:
        notes.append("ours-grpo over trl-grpo, same prompts and seeds (ties count half): win rate "
                     f"{_interval(evaluation['ours_grpo_over_trl_grpo_win_rate'])}")
    if "error" in evaluation:
        notes.append(f"evaluation failed: {evaluation['error']}")
    loaded = [f"{name} {report['results'][name]['load_s']:.1f} s" for name in ROWS[1:]
              if "load_s" in report["results"].get(name, {})]
    notes.append(f"each system trained for {settings['seconds']:g} s from the start of training (model load not "
                 f"counted: {', '.join(loaded) or '—'}), stopping at the first step boundary after it, one after the "
                 f"other on this machine; {settings['model']}, {settings['prompts_per_step']} prompts x "
                 f"{settings['num_generations']} samples per step from builtin:prompts (train), up to "
                 f"{settings['max_new_tokens']} new tokens (ending at EOS), temperature 1, LoRA r{settings['lora_r']} "
                 f"alpha {2 * settings['lora_r']} on all linear layers, learning rate {settings['learning_rate']:g} "
                 "(constant), sentiment reward, no KL term, one update per rollout")
    if "num_prompts" in evaluation:
        notes.append(f"evaluation: {evaluation['num_prompts']} prompts of builtin:prompts "
                     f"({evaluation['dataset_split']} split) x {settings['eval_num_samples']} samples, the same seeds "
                     f"for every row; 95% intervals bootstrap over prompts; full report {evaluation['report']}")
    notes.append(f"runs (adapters at <system>/final, our metrics.jsonl): {report['runs_dir']}")
    notes.extend(malloc_note(report))
    if settings["model"].startswith("random:"):
        notes.append(RANDOM_NOTE)
    return "\n".join([*lines, "", *notes])


def plot_race(report: dict[str, Any], path: Path) -> Path:
    """Left: each system's mean training reward per step against seconds of training (points, and
    a running mean over a tenth of its steps). Right: held-out reward with its 95% interval."""
    figure, (curves, final) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    colours = {"base": "tab:gray", "ours-grpo": "tab:blue", "trl-grpo": "tab:orange"}
    for name in ROWS[1:]:
        curve = report["results"].get(name, {}).get("curve", [])
        if not curve:
            continue
        seconds = [point["seconds"] for point in curve]
        rewards = [point["reward"] for point in curve]
        curves.scatter(seconds, rewards, s=10, alpha=0.35, color=colours[name])
        curves.plot(seconds, _running_mean(rewards, max(1, len(rewards) // 10)), color=colours[name],
                    label=f"{name} ({len(curve)} steps)")
    settings = report["settings"]
    curves.axvline(settings["seconds"], color="black", linestyle="--", linewidth=1, label="time budget")
    curves.set_xlabel("seconds of training")
    curves.set_ylabel("mean training reward of the step (sentiment)")
    curves.set_title("training reward against wall time")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    evaluated = report["evaluation"].get("results", {})
    names = [name for name in ROWS if name in evaluated]
    for x, name in enumerate(names):
        reward = evaluated[name]["reward"]
        if reward["mean"] is None or math.isnan(reward["mean"]):
            continue
        below, above = reward["mean"] - reward["ci_low"], reward["ci_high"] - reward["mean"]
        final.errorbar([x], [reward["mean"]], yerr=[[below], [above]], fmt="o", capsize=6, color=colours[name])
    final.set_xticks(range(len(names)), names)
    final.set_xlim(-0.5, len(names) - 0.5)
    final.set_ylabel("mean reward (95% CI)")
    final.set_title(f"held-out prompts ({report['evaluation'].get('num_prompts', '?')}, eval split)")
    final.grid(alpha=0.3, axis="y")
    figure.suptitle(f"learning race: {settings['seconds']:g} s each, {settings['model']}, "
                    f"{settings['prompts_per_step']} prompts x {settings['num_generations']} samples, "
                    f"{settings['max_new_tokens']} new tokens, lr {settings['learning_rate']:g}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
