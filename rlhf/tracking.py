"""metrics.jsonl as an Accelerate tracker, next to TensorBoard and W&B."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process

# The keys every row of metrics.jsonl carries (DESIGN.md output contract); NaN where meaningless.
METRIC_KEYS = (
    "step", "reward_mean", "reward_std", "kl", "entropy", "policy_loss", "value_loss", "clip_frac", "approx_kl",
    "adv_mean", "response_length_mean", "eos_rate", "learning_rate", "kl_coef", "samples_per_second",
    "tokens_per_second", "step_time_s", "rollout_time_s", "update_time_s",
)


def _json_number(value: Any) -> Any:
    # JSON has no NaN; null keeps the file readable by every parser.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JSONLTracker(GeneralTracker):
    """Appends one JSON object per logged step to ``metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True

    # No @on_main_process here: it would build Accelerate's process state before the trainer's
    # Accelerator does, without the cpu flag, and under torchrun on CPU every process would then
    # believe it is alone. Only log() writes, and only on the main process.
    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.run_id: str | None = None  # rlhf.lineage: set when the run starts, written in every row

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        """The resolved config lives in config.yaml; nothing to add here."""

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        row = {"step": step, **{k: _json_number(v) for k, v in values.items()}}
        if self.run_id is not None:
            row["run_id"] = self.run_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_line(self.path, json.dumps(row))


def append_line(path: Path, line: str) -> None:
    """Append one row in one write; if the disk is full, cut off what part of it got written
    (no torn row stays behind) and stop with one line."""
    from rlhf.errors import CheckpointError

    data = (line + "\n").encode()
    with path.open("ab") as handle:
        size = handle.tell()
        try:
            handle.write(data)
            handle.flush()
        except OSError as exc:
            try:
                handle.truncate(size)
            except OSError:
                pass  # split_rows drops a torn last row on resume
            raise CheckpointError(f"could not write {path.name} ({exc.strerror or exc}); checkpoints written so "
                                  "far are intact: free space and resume with --resume_from_checkpoint latest") from None


@dataclass
class RowSplit:
    exists: bool
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def split_rows(path: Path, last_step: int) -> RowSplit:  # metrics.jsonl and samples.jsonl
    """The rows up to ``last_step`` (kept) and after it (dropped: a resumed run re-logs them;
    never double a step). A torn last row (a crash or full disk mid-write) is neither; any other
    unreadable row is a CheckpointError."""
    if not path.is_file():
        return RowSplit(False)
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    split = RowSplit(True)
    for number, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                continue  # the torn last row of a killed write
            from rlhf.errors import CheckpointError

            raise CheckpointError(f"{path}: row {number + 1} is not JSON (edited by hand?); repair or remove it "
                                  "to resume") from None
        (split.kept if row.get("step", 0) <= last_step else split.dropped).append(line)
    return split


def write_rows(path: Path, rows: list[str]) -> None:
    """Replace ``path`` with ``rows`` atomically (temp file + rename)."""
    staging = path.with_name(f".tmp-{path.name}")
    staging.write_text("".join(line + "\n" for line in rows))
    os.replace(staging, path)


def write_trainer_log(output_dir: Path, log_history: list[dict[str, Any]], final: dict[str, Any],
                      columns: dict[str, str]) -> None:
    """metrics.jsonl for runs driven by a transformers/TRL Trainer: one row per logged training
    step (``columns`` maps our name -> the Trainer's log key), then one row of final metrics."""
    with (output_dir / "metrics.jsonl").open("w") as handle:
        for entry in log_history:
            if "loss" in entry:
                row = {"step": entry.get("step"), **{name: entry.get(key) for name, key in columns.items()}}
                handle.write(json.dumps(row) + "\n")
        last_step = log_history[-1].get("step") if log_history else 0
        handle.write(json.dumps({"step": last_step, **final}) + "\n")


def throughput(rollout: Any, reducer: Any, step_time: float, rollout_time: float, update_time: float) -> dict[str, float]:
    """Global lengths, EOS rate and speed of one step (every process calls it)."""
    sequences = reducer.sum(float(len(rollout)))
    tokens = reducer.sum(rollout.mask.sum())
    return {
        "response_length_mean": float(tokens / sequences),
        "eos_rate": reducer.mean(rollout.eos_found.float().mean()),
        "samples_per_second": float(sequences) / step_time,
        "tokens_per_second": float(tokens) / step_time,
        "step_time_s": step_time, "rollout_time_s": rollout_time, "update_time_s": update_time,
    }


def metrics_row(metrics: dict[str, float]) -> dict[str, float]:
    """METRIC_KEYS first (NaN where a run has no such metric), then the rest in their order."""
    row = {key: metrics.get(key, math.nan) for key in METRIC_KEYS if key != "step"}
    row.update({k: v for k, v in metrics.items() if k not in row})
    return row


def append_samples(path: Path, step: int, rollout: Any, scores: Any, count: int,
                   extra: dict[str, list[Any]] | None = None) -> None:
    """The first ``count`` prompt/completion/reward rows of a step, one JSON object per line, with
    the columns reward functions logged for the step (TRL's log_extra)."""
    rows = []
    for i in range(min(count, len(rollout))):
        row = {"step": step, "prompt": rollout.prompts[i], "completion": rollout.completions[i],
               # None: every reward function said "not applicable"
               "reward": None if math.isnan(scores[i]) else float(scores[i])}
        row.update({column: values[i] for column, values in (extra or {}).items() if column not in row})
        rows.append(json.dumps(row, default=str))
    if rows:
        append_line(path, "\n".join(rows))


def flat_config(config: Any) -> dict[str, Any]:
    """The config as scalars and strings (TensorBoard's hparams accept nothing else)."""
    def scalar(value: Any) -> Any:
        if isinstance(value, list):
            return ", ".join(map(str, value))
        if isinstance(value, dict):
            return json.dumps(value)
        return "none" if value is None else value

    return {key: scalar(value) for key, value in config.to_dict().items()}
