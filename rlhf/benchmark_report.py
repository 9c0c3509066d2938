"""Tables and PNG plots of rlhf.benchmark's reports (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from rlhf.benchmark import PHASES, through_link  # noqa: E402
from rlhf.errors import ConfigError  # noqa: E402
from rlhf.roofline import PHASES_WITH_BOUNDS  # noqa: E402

SECONDS = ("step_time_s", *(f"{phase}_s" for phase in PHASES))
COLUMNS = (*SECONDS, "samples_per_second", "tokens_per_second", "peak_rss_mb")
HEADERS = ("step s", *(f"{phase} s" for phase in PHASES), "samples/s", "tokens/s", "peak RSS MB")
RANDOM_NOTE = "random:* models have random weights (the real model's shape): timing only, their samples mean nothing"


def _cells(values: list[str]) -> str:
    return "| " + " | ".join(values) + " |"


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # -0.00004 is 0.000, not -0.000


def render_table(report: dict[str, Any]) -> str:
    if report.get("kind") == "learning":
        from rlhf.learning_race_report import render_race

        return render_race(report)
    return render_growth(report) if report.get("kind") == "growth" else render_sweep(report)


def render_sweep(report: dict[str, Any]) -> str:
    """One table: per response length a row per system, the ours-grpo / trl-grpo ratios and, with
    --roofline, the bound of each phase and the share of it ours-grpo reaches; notes below."""
    lines = [_cells(["new tokens", "system", *HEADERS]), "|---" * (len(HEADERS) + 2) + "|"]
    notes = []
    settings = report["settings"]
    for run in report["runs"]:
        length = str(run["max_new_tokens"])
        for name, result in run["results"].items():
            if name in ("floor", "profile"):
                continue
            if "error" in result:
                lines.append(_cells([length, name, f"error: {result['error']}"]))
                continue
            lines.append(_cells([length, name, *(_number(result[c], 1 if c == "peak_rss_mb" else 3) for c in COLUMNS)]))
        if "ratios_ours_grpo_over_trl_grpo" in run:
            ratios = run["ratios_ours_grpo_over_trl_grpo"]
            lines.append(_cells([length, "ours-grpo / trl-grpo", *(f"x{_number(ratios[c], 2)}" for c in SECONDS),
                                 f"x{_number(ratios['samples_per_second'], 2)}",
                                 f"x{_number(ratios['tokens_per_second'], 2)}", f"x{_number(ratios['peak_rss'], 2)}"]))
        roofline = run.get("roofline", {})
        if "step" in roofline:
            sequences = roofline["step_shape"]["groups"] * roofline["step_shape"]["group_size"]
            bound = {p: roofline[p]["bound_s"] if _has_bound(roofline, p) else None for p in PHASES}
            lines.append(_cells([length, "roofline bound", _number(roofline["step"]["bound_s"]),
                                 *(_number(bound[p]) for p in PHASES),
                                 _number(sequences / roofline["step"]["bound_s"]), "—", "—"]))
            step_measured = run["results"]["ours-grpo"]["step_time_s"]
            shares = [_percent(roofline["step"]["bound_s"] / step_measured),
                      *(_percent(roofline[p]["achieved"]) if p in PHASES_WITH_BOUNDS else "—" for p in PHASES)]
            lines.append(_cells([length, "ours-grpo % of bound", *shares, "—", "—", "—"]))
            notes.append(f"{length} new tokens, roofline at prompt {roofline['step_shape']['prompt_length']} + "
                         f"response {roofline['step_shape']['response_length']} tokens: "
                         + "; ".join(_describe_bound(p, roofline[p]) for p in PHASES_WITH_BOUNDS))
        elif "error" in roofline:
            notes.append(f"{length} new tokens: no roofline ({roofline['error']})")
        on_gpu = {name: result for name, result in run["results"].items() if "peak_gpu_mb" in result}
        if on_gpu:
            notes.append(f"{length} new tokens, peak GPU memory (PyTorch's allocator): " + ", ".join(
                f"{name} {result['peak_gpu_mb']:.0f} MB on {result['gpu']}" for name, result in on_gpu.items()))
        if "floor" in run["results"]:
            floor = run["results"]["floor"]
            notes.append(f"{length} new tokens, floor: " + ", ".join(_floor_item(k, v) for k, v in floor.items()))
        if "error" in run["results"].get("profile", {}):
            notes.append(f"{length} new tokens, profile failed: {run['results']['profile']['error']}")
        if "ours_grpo_step_over_floor" in run:
            notes.append(f"{length} new tokens: ours-grpo step / floor (generate + forward/backward): "
                         f"x{run['ours_grpo_step_over_floor']:.2f}")
    machine = report.get("machine")
    if machine and "error" in machine:
        notes.append(f"roofline: measuring the machine failed: {machine['error']}")
    elif machine:
        details = machine["details"]
        notes.append(f"machine ({details['threads']} threads): memory {machine['bandwidth'] / 1e9:.1f} GB/s (copy "
                     f"{details['copy_gbs']:.1f}, read {details['read_gbs']:.1f}); fp32 GEMM of the model's shapes "
                     f"{machine['decode_flops'] / 1e9:.1f} GFLOP/s at M = {details['decode']['rows']} (decode), "
                     f"{machine['batch_flops'] / 1e9:.1f} GFLOP/s at M = {details['batch']['rows']} (batch, "
                     "forward and input-gradient layouts)")
        if details["load_average_1m"] > details["cores"] - 0.5:
            notes.append(f"the machine was busy while measured (load {details['load_average_1m']:.1f} on "
                         f"{details['cores']} cores): its limits read low and the shares of them high")
    over = sorted({str(run["max_new_tokens"]) for run in report["runs"] for phase in PHASES_WITH_BOUNDS
                   if (run.get("roofline", {}).get(phase, {}).get("achieved") or 0) > 1})
    if over:
        notes.append(f"above 100% of a bound ({', '.join(over)} new tokens): the step outran a limit measured "
                     "too low; measure again on a quiet machine")
    notes.append("responses: " + ("every row runs to the length (no stop token in ours; TRL min_new_tokens)"
                                  if settings["full_length"] else "end at EOS (lengths are caps)"))
    notes.append(WEIGHTS_NOTE[bool(settings.get("bf16"))])
    notes.extend(malloc_note(report))
    notes.extend(decode_kernel_note(report))
    if settings["model"].startswith("random:"):
        notes.append(RANDOM_NOTE)
    return "\n".join([*lines, "", *notes])


WEIGHTS_NOTE = {False: "weights: float32 in every system",
                True: "weights: bfloat16 in every system (ours --bf16, TRL the model loaded so and bf16=True)"}


MALLOC_NOTES = {
    "keep": "freed buffers kept for reuse in every system's process (glibc malloc without mmap or trimming, "
            "RLHF_CPU_MALLOC=keep)",
    "keep+thp": "freed buffers kept for reuse, the heap grown in transparent huge pages, in every system's process "
                "(glibc malloc without mmap or trimming, its heap's free top marked MADV_HUGEPAGE; RLHF_CPU_MALLOC=keep, "
                "RLHF_CPU_HUGE_PAGES=auto)",
    "default": "the C library's default malloc in every system's process (RLHF_CPU_MALLOC=default)",
}


def malloc_note(report: dict[str, Any]) -> list[str]:
    """How the systems' processes allocated (rlhf.cpu_memory.allocator_in_use), where the report says."""
    allocator = report.get("malloc")
    if allocator is None:  # a report written before the allocator was recorded
        return []
    if "," in allocator:  # the processes differed: the comparison is not of the trainers alone
        return [f"memory: the systems' processes allocated differently ({allocator}); compare with care"]
    return ["memory: " + MALLOC_NOTES.get(allocator, f"{allocator} preloaded in every system's process "
                                                     "(RLHF_CPU_MALLOC does not reach it)")]


def decode_kernel_note(report: dict[str, Any]) -> list[str]:
    """Whether our systems' float32 decode products ran through rlhf.decode_linear's kernel, where the report says."""
    kernel = report.get("decode_kernel")
    if kernel is None:  # no system of ours, or a report written before it was recorded
        return []
    built = {"on": "AVX-512", "AVX512": "AVX-512", "AVX2": "AVX2"}  # "on": reports before the AVX2 build
    if kernel in built:
        return [f"ours' float32 decode products: the {built[kernel]} kernel (rlhf.decode_linear, oneDNN's sums)"]
    if kernel == "off":
        return ["ours' decode products: not through the decode kernel (bfloat16, or it does not run here or is off)"]
    return [f"ours' decode kernel differed between processes ({kernel})"]


def _percent(fraction: float | None) -> str:
    if fraction is None:
        return "—"
    shown = f"{100 * fraction:.0f}"
    return "<1%" if shown == "0" and fraction > 0 else f"{shown}%"  # a share measured is not 0%


def _describe_bound(phase: str, bound: dict[str, Any]) -> str:
    if bound["bound_by"] == "nothing":
        return f"{phase}: no separate pass"
    return (f"{phase}: {bound['flops'] / 1e9:.1f} GFLOP ({bound['compute_s']:.3f} s), "
            f"{bound['bytes'] / 1e9:.2f} GB read ({bound['memory_s']:.3f} s), {bound['bound_by']}-bound")


def render_growth(report: dict[str, Any]) -> str:
    headers = ("axis", "value", "model", "new tokens", "group", "params M", *HEADERS)
    lines = [_cells(list(headers)), "|---" * len(headers) + "|"]
    for row in report["rows"]:
        first = [row["axis"], str(row["value"]), row["model"], str(row["max_new_tokens"]), str(row["num_generations"]),
                 f"{row['parameters'] / 1e6:.0f}"]
        if "error" in row:
            lines.append(_cells([*first, f"error: {row['error']}"]))
            continue
        lines.append(_cells([*first, *(_number(row[c], 1 if c == "peak_rss_mb" else 3) for c in COLUMNS)]))
    settings = report["settings"]
    notes = [f"ours-grpo, {settings['prompts_per_step']} prompts per step, one factor varied at a time from "
             f"{settings['max_new_tokens']} new tokens, group {settings['num_generations']}, {settings['model']}"]
    notes.extend(malloc_note(report))
    notes.extend(decode_kernel_note(report))
    if any(row["model"].startswith("random:") for row in report["rows"]):
        notes.append(RANDOM_NOTE)
    return "\n".join([*lines, "", *notes])


def plot_sweep(report: dict[str, Any], path: Path) -> Path:
    """Seconds per step against response length: one panel per phase and one for the whole step,
    a line per system, the roofline bound dashed where measured."""
    panels = [("step", "step_time_s"), *((phase, f"{phase}_s") for phase in PHASES), ("peak RSS (GB)", "peak_rss_mb")]
    figure, grid = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = grid.flatten()
    runs = report["runs"]
    systems = list(dict.fromkeys(name for run in runs for name in run["results"] if name not in ("floor", "profile")))
    for ax, (title, key) in zip(axes, panels):
        scale = 1 / 1024 if key == "peak_rss_mb" else 1
        for system in systems:
            points = [(run["max_new_tokens"], run["results"][system][key] * scale) for run in runs
                      if key in run["results"].get(system, {})]
            if points:
                ax.plot(*zip(*points), marker="o", label=system)
        bounds = [(run["max_new_tokens"], _bound_of(run["roofline"], title)) for run in runs
                  if "step" in run.get("roofline", {}) and (title == "step" or _has_bound(run["roofline"], title))]
        if bounds:
            ax.plot(*zip(*bounds), linestyle="--", color="black", marker="x", label="roofline bound")
        ax.set_title(title)
        ax.set_xticks([run["max_new_tokens"] for run in runs])
        ax.set_xlabel("response length (new tokens)")
        _from_zero(ax)
        ax.grid(alpha=0.3)
    for ax in (grid[0][0], grid[1][0]):
        ax.set_ylabel("seconds per step")
    axes[0].legend(fontsize=8)
    settings = report["settings"]
    figure.suptitle(f"seconds per step and peak RSS against response length: {settings['model']}, "
                    f"{settings['prompts_per_step']} prompts x {settings['num_generations']} samples, "
                    f"LoRA r{settings['lora_r']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _from_zero(ax: Any) -> None:
    """y from 0 to a little above the highest point (the default margin hugs a flat line)."""
    top = max((max(line.get_ydata(), default=0) for line in ax.get_lines()), default=0)
    ax.set_ylim(0, 1.1 * top if top > 0 else 1)


def _floor_item(key: str, value: Any) -> str:
    """One of the floor's numbers as the note shows it: "generate 1.234 s", "peak RSS 3390 MB"."""
    if key == "peak_rss_mb":
        return f"peak RSS {_number(value, 0)} MB"
    if key.endswith("_s"):
        return f"{key.removesuffix('_s').replace('_', ' ')} {_number(value)} s"
    return f"{key.replace('_', ' ')} {_number(value)}"


def _has_bound(roofline: dict[str, Any], phase: str) -> bool:
    """Whether ``phase`` has a bound: a phase the step has (a separate logprob pass: none with one
    update per rollout and no KL term, shown as "—" and not as a bound of 0)."""
    return phase in PHASES_WITH_BOUNDS and roofline[phase]["bound_by"] != "nothing"


def _bound_of(roofline: dict[str, Any], panel: str) -> float:
    return roofline["step"]["bound_s"] if panel == "step" else roofline[panel]["bound_s"]


def plot_growth(report: dict[str, Any], path: Path) -> Path:
    """Step time (and its generation and update phases) and peak RSS against each growth axis."""
    from rlhf.benchmark import GROWTH_AXES

    figure, axes = plt.subplots(2, len(GROWTH_AXES), figsize=(4.5 * len(GROWTH_AXES), 7), squeeze=False)
    for column, axis in enumerate(GROWTH_AXES):
        rows = [row for row in report["rows"] if row["axis"] == axis and "error" not in row]
        if axis == "model":
            rows.sort(key=lambda row: row["parameters"])
        x = [row["parameters"] / 1e6 if axis == "model" else row["value"] for row in rows]
        time_ax, memory_ax = axes[0][column], axes[1][column]
        for key, style in (("step_time_s", "-"), ("generation_s", "--"), ("update_s", ":")):
            label = key.removesuffix("_s").replace("_time", "")
            time_ax.plot(x, [row[key] for row in rows], style, marker="o", label=label)
        memory_ax.plot(x, [row["peak_rss_mb"] / 1024 for row in rows], marker="o", color="tab:red")
        if axis == "model":
            for value, row in zip(x, rows):  # beside each step-time point (at the axis bottom, near sizes overlap)
                last = value == max(x)
                time_ax.annotate(Path(row["model"].removeprefix("random:")).name, (value, row["step_time_s"]),
                                 textcoords="offset points", xytext=(-6 if last else 6, -3),
                                 ha="right" if last else "left", fontsize=7)
        label = {"response length": "response length (new tokens)", "group size": "group size (num_generations)",
                 "model": "model parameters (millions)"}[axis]
        memory_ax.set_xlabel(label)
        time_ax.set_title(axis)
        if axis != "model":
            for ax in (time_ax, memory_ax):
                ax.set_xticks(x)
        for ax in (time_ax, memory_ax):
            _from_zero(ax)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("seconds per step")
    axes[1][0].set_ylabel("peak RSS (GB)")
    axes[0][0].legend(fontsize=8)
    settings = report["settings"]
    random = any(row["model"].startswith("random:") for row in report["rows"])
    figure.suptitle(f"our GRPO: step time and memory, one factor at a time ({settings['max_new_tokens']} new tokens, "
                    f"group {settings['num_generations']}, {settings['model']})"
                    + ("\nrandom:* models: random weights, timing only" if random else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(report: dict[str, Any], out: Path) -> tuple[str, list[Path]]:
    """The JSON at ``out``, the table beside it (.md) and the plot (.png); returns (table, paths).
    Each is written to a new file first and then put in place, so an earlier run's file is either
    kept whole or replaced whole."""
    from rlhf.learning_race_report import plot_race

    out.parent.mkdir(parents=True, exist_ok=True)
    table = render_table(report)
    plot = {"growth": plot_growth, "learning": plot_race}.get(report.get("kind"), plot_sweep)
    paths = [out, out.with_suffix(".md"), out.with_suffix(".png")]
    targets = [through_link(path) for path in paths]
    drafts = [path.with_name(f".{path.stem}.partial{path.suffix}") for path in targets]  # savefig reads the suffix
    try:
        drafts[0].write_text(json.dumps(report, indent=2))
        drafts[1].write_text(table + "\n")
        plot(report, drafts[2])
        _replace_together(drafts, targets)
    except OSError as exc:
        raise ConfigError(f"cannot write the report at {out}: {exc.strerror or exc}"
                          + (f" ({exc.filename})" if exc.filename else "")) from None
    finally:
        for draft in drafts:
            draft.unlink(missing_ok=True)
    return table, paths


def _replace_together(drafts: list[Path], targets: list[Path]) -> None:
    """Put each draft in place of its target, all of them or none: each earlier file is moved
    aside first and moved back where a later one cannot be put in place (or the run is stopped
    meanwhile), so the table, JSON and plot at --out always come from one run."""
    done: list[tuple[Path, Path | None]] = []  # (target, its earlier file moved aside, if there was one)
    try:
        for draft, target in zip(drafts, targets):
            aside = None
            if target.exists():
                aside = target.with_name(f".{target.stem}.previous{target.suffix}")
                target.replace(aside)
            done.append((target, aside))
            draft.replace(target)
    except BaseException:
        for target, aside in reversed(done):
            if aside is not None:
                aside.replace(target)
            else:
                target.unlink(missing_ok=True)
        raise
    for _, aside in done:
        if aside is not None:
            aside.unlink(missing_ok=True)
