"""Numbers and files of an evaluation report (rlhf.evaluate): bootstrap confidence intervals,
win rates, diversity, report.json / report.md / samples.jsonl / plots.

All statistics resample *prompts* (the samples of one prompt stay together), so the intervals
describe what another draw of prompts from the same distribution would give.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from reward_models.builtins import completion_text

CI_LEVEL = 0.95
# What write_outputs puts in an evaluation's output_dir (evaluate.py refuses a dir holding any of them)
OUTPUT_FILES = ("report.json", "report.md", "samples.jsonl", "reward_distribution.png", "reward_vs_kl.png")


def json_safe(value: Any) -> Any:
    """NaN (a reward that did not apply, a statistic without data) as null: bare NaN is not JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def bootstrap_ci(values: list[float] | np.ndarray, seed: int = 0, resamples: int = 2000,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per prompt).

    Draws ``resamples`` samples of len(values) with replacement from numpy's default_rng(seed);
    returns the (1-level)/2 and (1+level)/2 quantiles of their means. One value -> (v, v).
    """
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (math.nan, math.nan)
    if data.size == 1:
        return (float(data[0]), float(data[0]))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - level) / 2
    return (float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail)))


def per_prompt(records: list[dict[str, Any]], value: Any) -> np.ndarray:
    """Mean of value(record) over each prompt's samples, ordered by prompt index. NaN values (a
    reward that did not apply to the sample) are left out, and so are prompts without any."""
    groups: dict[int, list[float]] = defaultdict(list)
    for record in records:
        number = float(value(record))
        if not math.isnan(number):
            groups[record["prompt_index"]].append(number)
    return np.array([np.mean(groups[p]) for p in sorted(groups)])


def win_scores(records_a: list[dict[str, Any]], records_b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (prompt, sample): 1 if a's combined reward beats b's on the same prompt and seed,
    0.5 for a tie, 0 otherwise (records carry prompt_index, sample_index, reward)."""
    other = {(r["prompt_index"], r["sample_index"]): r["reward"] for r in records_b}
    scores = []
    for record in records_a:
        theirs = other[(record["prompt_index"], record["sample_index"])]
        if math.isnan(record["reward"]) or math.isnan(theirs):  # unscorable on either side: no contest
            continue
        score = 1.0 if record["reward"] > theirs else 0.5 if record["reward"] == theirs else 0.0
        scores.append({"prompt_index": record["prompt_index"], "score": score})
    return scores


def win_rate(records_a: list[dict[str, Any]], records_b: list[dict[str, Any]], seed: int = 0,
             resamples: int = 2000) -> dict[str, float]:
    """Share of paired samples where a beats b (ties count half), with a bootstrap CI over prompts."""
    values = per_prompt(win_scores(records_a, records_b), lambda r: r["score"])
    low, high = bootstrap_ci(values, seed, resamples)
    return {"rate": float(values.mean()) if values.size else math.nan, "ci_low": low, "ci_high": high}


# What a record of a multi-turn episode adds (rlhf.evaluate.sample_and_score with episodes), and
# what a checkpoint's summary then adds (episode_stats).
EPISODE_FIELDS = ("turns", "tool_calls", "tool_failures", "truncated", "turn_reward")
EPISODE_STATS = ("tool_success_rate", "tool_calls_per_episode", "turns_per_episode", "truncated_share",
                 "turn_reward_mean")


def episode_stats(records: list[dict[str, Any]]) -> dict[str, float]:
    """Tool use of a checkpoint's episodes: the share of tool calls that succeeded (NaN when none
    was made), tool calls and turns per episode, the share truncated by max_new_tokens, and the
    mean turn reward (a part of ``reward``)."""
    count = max(len(records), 1)
    calls = sum(r["tool_calls"] for r in records)
    return {
        "tool_success_rate": 1.0 - sum(r["tool_failures"] for r in records) / calls if calls else math.nan,
        "tool_calls_per_episode": calls / count,
        "turns_per_episode": sum(r["turns"] for r in records) / count,
        "truncated_share": sum(r["truncated"] for r in records) / count,
        "turn_reward_mean": sum(r["turn_reward"] for r in records) / count,
    }


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over whitespace tokens of all texts (Li et al. 2016)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _mean_ci(values: np.ndarray, seed: int, resamples: int) -> dict[str, float]:
    low, high = bootstrap_ci(values, seed, resamples)
    return {"mean": float(values.mean()) if values.size else math.nan, "ci_low": low, "ci_high": high}


def summarise(records: list[dict[str, Any]], seed: int = 0, resamples: int = 2000) -> dict[str, Any]:
    """Every per-checkpoint number of the report from its records (see sample_and_score)."""
    tokens = sum(r["tokens"] for r in records)
    names = list(records[0]["rewards"]) if records else []
    texts = [completion_text(r["response"]) for r in records]  # an episode: its assistant turns
    summary = {
        "reward": _mean_ci(per_prompt(records, lambda r: r["reward"]), seed, resamples),
        "rewards": {name: _mean_ci(per_prompt(records, lambda r, n=name: r["rewards"][n]), seed, resamples)
                    for name in names},
        "kl_per_sequence": _mean_ci(per_prompt(records, lambda r: r["kl"]), seed, resamples),
        "kl_per_token": sum(r["kl"] for r in records) / max(tokens, 1),
        "response_length": sum(r["tokens"] for r in records) / len(records),
        "eos_rate": sum(r["eos"] for r in records) / len(records),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "base_perplexity": math.exp(sum(r["base_nll"] for r in records) / tokens) if tokens else math.nan,
        "num_samples": len(records),
    }
    if records and "turns" in records[0]:  # episodes: their tool use (one-turn reports stay as they were)
        summary.update(episode_stats(records))
    return summary


def build_report(records: dict[str, list[dict[str, Any]]], baseline: str | None, seed: int, resamples: int,
                 settings: dict[str, Any]) -> dict[str, Any]:
    labels = list(records)
    checkpoints = {label: summarise(records[label], seed, resamples) for label in labels}
    if baseline is not None:
        for label in labels:
            if label != baseline:
                checkpoints[label]["win_rate_vs_base"] = win_rate(records[label], records[baseline], seed, resamples)
    pairwise = {a: {b: win_rate(records[a], records[b], seed, resamples) for b in labels if b != a} for a in labels}
    return {"settings": settings, "versions": package_versions(), "checkpoints": checkpoints, "pairwise_win_rate": pairwise}


def package_versions() -> dict[str, str]:
    versions = {}
    for package in ("rlhf", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "vaderSentiment"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def evaluation_summary(report: dict[str, Any], label: str, report_dir: Path | None = None) -> dict[str, Any]:
    """What a checkpoint's model card says about its evaluation (rlhf.card.record_evaluation):
    its reward (combined and per function) and KL with their 95% intervals, length, EOS rate,
    how it was measured (prompt set, count, rewards, sampling), when, and, with include_base, the
    base row's reward and the checkpoint's win rate against it. JSON-ready (NaN as null)."""
    settings, numbers = report["settings"], report["checkpoints"][label]
    base = report["checkpoints"].get("base") if settings.get("include_base") else None
    summary = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": label,
        **{key: settings.get(key) for key in ("dataset", "dataset_split", "num_prompts", "num_samples",
                                              "max_new_tokens", "temperature", "top_p", "seed")},
        "reward_funcs": [str(f) for f in settings["reward_funcs"]],
        "reward_weights": settings.get("reward_weights"),
        "ci_level": CI_LEVEL,
        "reward": numbers["reward"], "rewards": numbers["rewards"],
        "kl_per_sequence": numbers["kl_per_sequence"], "kl_per_token": numbers["kl_per_token"],
        "kl_reference": settings.get("kl_reference", {}).get(label, "base model"),
        "response_length": numbers["response_length"], "eos_rate": numbers["eos_rate"],
        "base_row": settings.get("base_row", "base model") if base is not None else None,
        "base_reward": base["reward"] if base is not None else None,
        "win_rate_vs_base": numbers.get("win_rate_vs_base"),
        "report": str(report_dir.resolve() / "report.md") if report_dir is not None else None,
        **{key: numbers[key] for key in EPISODE_STATS if key in numbers},
    }
    return json_safe(summary)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def _columns(report: dict[str, Any]) -> list[tuple[str, Any, int]]:
    """(header, getter, direction) per column: +1 higher is better, -1 lower, 0 not ranked."""
    first = next(iter(report["checkpoints"].values()))
    columns: list[tuple[str, Any, int]] = [("reward ↑ (95% CI)", lambda c: c["reward"], 1)]
    if len(first["rewards"]) > 1:
        columns += [(f"{name} ↑", lambda c, n=name: c["rewards"][n], 1) for name in first["rewards"]]
    columns += [
        ("KL/seq ↓ (nats)", lambda c: c["kl_per_sequence"]["mean"], -1),
        ("KL/token ↓", lambda c: c["kl_per_token"], -1),
        ("length (tokens)", lambda c: c["response_length"], 0),
        ("EOS rate ↑", lambda c: c["eos_rate"], 1),
        ("distinct-1 ↑", lambda c: c["distinct_1"], 1),
        ("distinct-2 ↑", lambda c: c["distinct_2"], 1),
        ("base ppl ↓", lambda c: c["base_perplexity"], -1),
    ]
    if "tool_success_rate" in first:  # episodes were evaluated
        columns += [
            ("tool success ↑", lambda c: "n/a" if math.isnan(c["tool_success_rate"]) else c["tool_success_rate"], 1),
            ("tool calls/episode", lambda c: c["tool_calls_per_episode"], 0),
            ("turns/episode", lambda c: c["turns_per_episode"], 0),
            ("truncated ↓", lambda c: c["truncated_share"], -1),
        ]
    if any("win_rate_vs_base" in c for c in report["checkpoints"].values()):
        columns.append(("win vs base ↑ (95% CI)", lambda c: c.get("win_rate_vs_base"), 1))
    return columns


def _scalar(value: Any) -> float:
    if isinstance(value, str):  # "n/a": no number to rank
        return math.nan
    if isinstance(value, dict):
        return value.get("mean", value.get("rate", math.nan))
    return math.nan if value is None else float(value)


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return f"{_scalar(value):.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"
    return f"{value:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    """One row per checkpoint; the best value of each ranked column in bold. KL columns rank the
    trained checkpoints only (the base's KL to itself is 0 by definition)."""
    checkpoints, settings = report["checkpoints"], report["settings"]
    columns = _columns(report)
    best: dict[str, set[str]] = {}
    for header, get, direction in columns:
        values = {label: _scalar(get(numbers)) for label, numbers in checkpoints.items()
                  if not (header.startswith("KL") and label == "base")}
        values = {label: v for label, v in values.items() if math.isfinite(v)}
        if direction and len(set(values.values())) > 1:  # all equal: nothing to mark
            top = max(direction * v for v in values.values())
            best[header] = {label for label, v in values.items() if direction * v == top}
    references = settings.get("kl_reference", {})
    lines = [
        "# Evaluation report", "",
        f"{settings['num_prompts']} prompts from `{settings['dataset']}` ({settings['dataset_split']}), "
        f"{settings['num_samples']} sample(s) each, max_new_tokens {settings['max_new_tokens']}, temperature "
        f"{settings['temperature']}, seed {settings['seed']}; reward = {' + '.join(map(str, settings['reward_funcs']))}"
        + (f" ({settings['reward_source']})" if settings.get("reward_source", "given") != "given" else "") + "; "
        f"base model `{settings['base_model']}`"
        + (f"; the base row and KL are against the {settings['base_row']}" if settings.get("base_row", "base model")
           != "base model" else "")
        + (f"; KL and base ppl are against each run's init adapter for {', '.join(sorted(k for k, v in references.items() if v != 'base model'))}"
           f" and against the base model for the others" if len(set(references.values())) > 1 else "")
        + _episodes_sentence(settings)
        + ". Best per column in bold; ↑/↓ = higher/lower is better.", "",
        "| checkpoint | " + " | ".join(h for h, _, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, numbers in checkpoints.items():
        cells = []
        for header, get, _ in columns:
            text = _format(get(numbers))
            cells.append(f"**{text}**" if label in best.get(header, ()) else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    labels = list(checkpoints)
    if len(labels) > 1:
        lines += ["", "Pairwise win rate of the row over the column (same prompt and seed, ties count half):", "",
                  "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for a in labels:
            row = [_format(report["pairwise_win_rate"][a][b]) if b != a else "—" for b in labels]
            lines.append(f"| {a} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _episodes_sentence(settings: dict[str, Any]) -> str:
    """The report's words on multi-turn episodes (none for one-turn responses)."""
    episodes = settings.get("episodes")
    template = settings.get("chat_template")
    text = ""
    if template:  # a file or TRL's name; a template given as its text is too long for the line
        short = "{" not in template and len(template) <= 80
        text = f"; chat template `{template}`" if short else "; chat template given as text"
    if not episodes:
        return text
    tools = [f"tools {', '.join(f'`{t}`' for t in episodes['tools'])}"] if episodes["tools"] else []
    if episodes["environment_factory"] is not None:
        tools.append(f"environment `{episodes['environment_factory']}`")
    limit = episodes["max_tool_calling_iterations"]
    return (text + f"; multi-turn episodes with {' and '.join(tools)} ({episodes['source']}), tool calls executed in "
            f"{'every turn' if limit is None else f'at most {limit} turns'}, max_new_tokens per episode; the reward "
            "includes the tools' turn rewards and length counts sampled tokens only")


def write_outputs(output_dir: Path, report: dict[str, Any], records: dict[str, list[dict[str, Any]]],
                  names: dict[str, str] | None = None) -> None:
    """``names``: label -> what the plots call the checkpoint (rlhf.plots.checkpoint_names)."""
    from rlhf.plots import plot_reward_distribution, plot_reward_vs_kl

    json_path, markdown_path, samples_path, distribution_plot, kl_plot = (output_dir / name for name in OUTPUT_FILES)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(json_safe(report), indent=2))
    markdown_path.write_text(render_markdown(report))
    first = next(iter(records.values()))
    with samples_path.open("w") as handle:
        for i, record in enumerate(first):
            keys = ("response", "reward", "rewards", "kl") + (EPISODE_FIELDS if "turns" in record else ())
            row = {"prompt_index": record["prompt_index"], "sample_index": record["sample_index"],
                   "prompt": record["prompt"],
                   "responses": {label: {key: records[label][i][key] for key in keys} for label in records}}
            handle.write(json.dumps(json_safe(row)) + "\n")
    plot_reward_distribution(records, distribution_plot, names)
    plot_reward_vs_kl(records, kl_plot, names)
