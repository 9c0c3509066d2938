"""PNG plots with matplotlib (Agg backend, no display needed): evaluation reports and training
curves from metrics.jsonl."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rlhf.errors import DataError  # noqa: E402


def short_labels(labels: list[str]) -> list[str]:
    """Shortest trailing path parts that still tell the checkpoints apart, e.g.
    /tmp/runs/ppo/final -> ppo/final (plots have little room for full paths)."""
    for depth in range(1, max(len(Path(label).parts) for label in labels) + 1):
        short = ["/".join(Path(label).parts[-depth:]) for label in labels]
        generic = any(Path(label).name == "final" or Path(label).name.startswith("step-") for label in labels)
        if len(set(short)) == len(labels) and (depth > 1 or not generic):
            return short
    return list(labels)


def checkpoint_names(labels: list[str], runs: dict[str, str]) -> dict[str, str]:
    """How plots name each checkpoint: ``runs[label]`` where given (an adapter by its run, see
    rlhf.card.run_label), else the short_labels form; where two names would be equal, the
    short_labels form follows in brackets."""
    short = dict(zip(labels, short_labels(labels)))
    names = {label: runs.get(label, short[label]) for label in labels}
    counts = {name: list(names.values()).count(name) for name in names.values()}
    return {label: name if counts[name] == 1 or name == short[label] else f"{name} [{short[label]}]"
            for label, name in names.items()}


def plot_reward_distribution(records: dict[str, list[dict[str, Any]]], path: Path,
                             names: dict[str, str] | None = None) -> None:
    """Box plot of the combined reward per sample, one box per checkpoint, mean as a triangle.
    ``names``: label -> what the plot calls it (default: short_labels)."""
    labels = list(records)
    names = [(names or {}).get(label, short) for label, short in zip(labels, short_labels(labels))]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.8 * len(labels)), 4.8))
    ax.boxplot([[r["reward"] for r in records[label]] for label in labels], showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), names, rotation=20 if max(map(len, names)) > 14 else 0,
                  ha="right" if max(map(len, names)) > 14 else "center")
    ax.set_ylabel("combined reward per response")
    ax.set_xlabel("checkpoint")
    ax.set_title("Reward distribution\n(box: quartiles, orange line: median, triangle: mean)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reward_vs_kl(records: dict[str, list[dict[str, Any]]], path: Path, names: dict[str, str] | None = None) -> None:
    """Each response as a point (KL to the base, reward); each checkpoint's mean as a large marker."""
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    shorts = short_labels(list(records))
    for index, ((label, rows), short) in enumerate(zip(records.items(), shorts)):
        name = (names or {}).get(label, short)
        color = f"C{index % 10}"
        kls, rewards = [r["kl"] for r in rows], [r["reward"] for r in rows]
        ax.scatter(kls, rewards, s=14, alpha=0.35, color=color)
        ax.scatter([sum(kls) / len(kls)], [sum(rewards) / len(rewards)], s=140, marker="D", color=color,
                   edgecolor="black", label=f"{name} (mean)")
    ax.set_xlabel("KL to the base model (nats per response, k1 on the sampled tokens)")
    ax.set_ylabel("combined reward per response")
    ax.set_title("Reward vs KL to the base (small dots: responses)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Training curves: file name -> (title, y label, [(metric key, line style, legend suffix)]). Keys
# are those of canonical_rows: RL runs log reward_mean, kl, ...; DPO and reward-model runs (a
# Trainer's log via rlhf.tracking.write_trainer_log) log loss, accuracy and margin. Their held-out
# numbers are measured before and after training only: points (style in MARKERS), no line.
TRAINING_PLOTS: dict[str, tuple[str, str, list[tuple[str, str, str]]]] = {
    "reward.png": ("Reward", "mean reward per response",
                   [("reward_mean", "-", "train"), ("eval/reward_mean", "--", "eval")]),
    "kl.png": ("KL to the reference", "KL (nats per response)", [("kl", "-", "train"), ("eval/kl", "--", "eval")]),
    "loss.png": ("Losses", "loss", [("policy_loss", "-", "policy"), ("value_loss", "--", "value"),
                                    ("loss", "-", "train"), ("eval/loss", "s", "held-out")]),
    "length.png": ("Response length", "tokens per response", [("response_length_mean", "-", "")]),
    "accuracy.png": ("Preference accuracy (DPO, reward model)", "share of pairs with chosen scored above rejected",
                     [("accuracy", "-", "train batches"), ("eval/accuracy", "s", "held-out"),
                      ("train_pairwise_accuracy", "^", "all train pairs")]),
    "margin.png": ("DPO implicit reward margin", "mean margin, chosen - rejected",
                   [("margin", "-", "train batches"), ("eval/margin", "s", "held-out")]),
}
# TRL's spellings of the same metrics (the DPO trainer's log keys) -> ours.
ALIASES = {"rewards/accuracies": "accuracy", "rewards/margins": "margin", "eval_pairwise_accuracy": "eval/accuracy"}


def canonical_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl rows under the keys TRAINING_PLOTS draws. A function's training reward is
    ``reward/<name>`` in older runs and TRL's ``rewards/<name>/mean`` in newer ones: both become
    ``reward/<name>`` (one curve across a resume that spans the rename). A DPO run's last row
    holds held-out ``eval_<x>_before`` (the reference policy, step 0) and ``eval_<x>_after``:
    they become ``eval/<x>`` at step 0 and at that row's step."""
    canonical = []
    for row in rows:
        before: dict[str, Any] = {}
        out: dict[str, Any] = {}
        for key, value in row.items():
            function = re.fullmatch(r"rewards/(.+)/mean", key)
            if function:
                key = f"reward/{function.group(1)}"
            elif re.fullmatch(r"eval_\w+_before", key):
                before[f"eval/{key[5:-7]}"] = value
                continue
            elif re.fullmatch(r"eval_\w+_after", key):
                key = f"eval/{key[5:-6]}"
            out.setdefault(ALIASES.get(key, key), value)
        if before:
            canonical.append({"step": 0, **before})
        canonical.append(out)
    return canonical


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"no metrics.jsonl in {run_dir}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is not a JSON object of metrics")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} is empty")
    return rows


STYLES = ("-", "--", ":", "-.")
MARKERS = ("s", "^")  # styles of points without a line: measured once or twice, not a trajectory


def plot_training_curves(run_dirs: list[Path], output_dir: Path) -> list[Path]:
    """One PNG per quantity (reward, KL, loss, length; accuracy and margin of DPO and reward-model
    runs) with one line per run, x = step, and one curve per reward function."""
    runs = {Path(d).name if Path(d).name not in ("", ".") else str(d): read_metrics(Path(d)) for d in run_dirs}
    if len(runs) < len(run_dirs):  # two runs with the same dir name: label them by full path
        runs = {str(d): read_metrics(Path(d)) for d in run_dirs}
    runs = {name: canonical_rows(rows) for name, rows in runs.items()}
    # A Trainer's log (DPO, reward model) counts optimizer steps and has an epoch column.
    trainer_runs = sum(any("epoch" in row for row in rows) for rows in runs.values())
    xlabel = "RL step" if not trainer_runs else "optimizer step" if trainer_runs == len(runs) else "step"
    written = []
    # One curve per reward function (reward/<name>) besides the fixed plots.
    functions = sorted({key for rows in runs.values() for row in rows for key in row if key.startswith("reward/")})
    per_function = [(key, STYLES[i % len(STYLES)], key.split("/", 1)[1]) for i, key in enumerate(functions)]
    plots = {**TRAINING_PLOTS, "reward_functions.png": ("Reward per function", "mean reward", per_function)}
    for filename, (title, ylabel, series) in plots.items():
        fig, ax = plt.subplots(figsize=(7.0, 4.5))
        drawn = 0
        for index, (name, rows) in enumerate(runs.items()):
            for key, style, suffix in series:
                points = [(r["step"], r[key]) for r in rows
                          if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]
                if not points:
                    continue
                marks = {"markersize": 7} if style in MARKERS else {"marker": "o"} if len(points) == 1 else \
                    {"marker": "."} if len(points) < 30 else {}
                ax.plot(*zip(*points), style, color=f"C{index % 10}", label=f"{name} {suffix}".strip(), **marks)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        output_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(output_dir / filename, dpi=120)
        plt.close(fig)
        written.append(output_dir / filename)
    if not written:
        keys = sorted({key for rows in runs.values() for row in rows for key in row} - {"step", "run_id"})
        raise DataError(f"nothing to plot in {', '.join(map(str, run_dirs))}: no finite values of reward_mean, kl, "
                        f"losses, lengths, preference accuracy or margin, or reward/<name> (columns there: "
                        f"{', '.join(keys[:12]) or 'none'})")
    return written
