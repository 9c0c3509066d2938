"""metrics.jsonl as an Accelerate tracker, next to TensorBoard and W&B."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker, on_main_process

# The keys every row of metrics.jsonl carries (DESIGN.md output contract); NaN where meaningless.
METRIC_KEYS = (
    "step", "reward_mean", "reward_std", "kl", "entropy", "policy_loss", "value_loss", "clip_frac", "approx_kl",
    "adv_mean", "response_length_mean", "eos_rate", "learning_rate", "kl_coef", "samples_per_second",
    "tokens_per_second", "step_time_s", "rollout_time_s", "update_time_s",
)


DEFAULT_PROJECT = "rlhf"
COMPLETIONS_TABLE = "completions"  # the wandb.Table's key and the TensorBoard text tag (TRL's name)


def tracker_names(project_name: str | None, run_name: str | None, output_dir: Path) -> tuple[str, str]:
    """(project, run name): the config's, else W&B's environment variables, else rlhf and the
    output_dir's name. Accelerate passes its project to wandb.init explicitly, which would hide
    $WANDB_PROJECT, so the environment is read here."""
    project = project_name or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    run = run_name or os.environ.get("WANDB_NAME") or Path(output_dir).resolve().name
    return project, run


def check_wandb_login(report_to: list[str]) -> None:
    """Refuse --report_to wandb up front when W&B could only fail at its start (no login, no
    offline mode): wandb.init raises a traceback there, after the run's files are written."""
    if "wandb" not in report_to or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    settings = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb")) / "settings"
    if settings.is_file():  # `wandb login --host`, `wandb offline`: wandb's own settings decide
        return
    import netrc
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:  # an explicit path, as wandb reads it: no ownership/permission check
        credentials = netrc.netrc(os.environ.get("NETRC") or str(Path.home() / ".netrc"))
        if any(credentials.authenticators(host) for host in {url.netloc, url.hostname} if host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    host = url.netloc or "api.wandb.ai"
    from rlhf.errors import ConfigError

    raise ConfigError(f"report_to wandb: no W&B login for {host} (WANDB_API_KEY, ~/.netrc); run `wandb login`, "
                      "or set WANDB_MODE=offline to keep the run in output_dir/wandb")


def make_trackers(report_to: list[str], project: str, run: str, output_dir: Path) -> list[GeneralTracker]:
    """metrics.jsonl always; TensorBoard events in output_dir/tensorboard/<run>; a W&B run named
    ``run`` in ``project`` whose files live in output_dir/wandb ($WANDB_ENTITY picks the entity:
    wandb.init reads it when no entity is given)."""
    trackers: list[GeneralTracker] = [JSONLTracker(run, output_dir)]
    if "tensorboard" in report_to:
        trackers.append(TensorBoardTracker(run, Path(output_dir) / "tensorboard"))
    if "wandb" in report_to:
        trackers.append(WandBTracker(project, name=run, dir=str(output_dir)))
    return trackers


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
    from rlhf.errors import CheckpointError

    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a file; move it away to resume")
    if not path.is_file():
        return RowSplit(False)
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    split = RowSplit(True)
    for number, line in enumerate(lines):
        try:
            text = line.decode()  # strictly: the kept rows are written back as they were
            row = json.loads(text)
        except ValueError:  # not UTF-8, or not JSON
            if number == len(lines) - 1:
                continue  # the torn last row of a killed write
            raise CheckpointError(f"{path}: row {number + 1} is not JSON (edited by hand?); repair or remove it "
                                  "to resume") from None
        step = row.get("step", 0) if isinstance(row, dict) else None
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            raise CheckpointError(f"{path}: row {number + 1} is not a JSON object with a numeric step (edited by "
                                  "hand?); repair or remove it to resume")
        (split.kept if step <= last_step else split.dropped).append(text)
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
    lengths = reducer.gather(rollout.mask.sum(-1).float())
    terminated = lengths[reducer.gather(rollout.eos_found.float()) > 0]  # gloo gathers no bools
    return {
        "response_length_mean": float(tokens / sequences),
        "eos_rate": reducer.mean(rollout.eos_found.float().mean()),
        # TRL's names for the same quantities, and the spread of lengths
        "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": 1.0 - float(terminated.numel()) / lengths.numel(),
        # NaN when no response ended (TRL logs 0 there, which reads as "ended at once")
        "completions/mean_terminated_length": float(terminated.mean()) if terminated.numel() else math.nan,
        "completions/min_terminated_length": float(terminated.min()) if terminated.numel() else math.nan,
        "completions/max_terminated_length": float(terminated.max()) if terminated.numel() else math.nan,
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


def completion_rows(rollout: Any, scores: Any, reward_columns: dict[str, list[Any]],
                    advantages: Any | None) -> list[dict[str, Any]]:
    """One row per sample of the step, TRL's log_completions columns: prompt, completion, each
    reward function's value (None: not applicable), the weighted reward, the advantage (the mean
    over the response's tokens: one number per sample, as in TRL, also under GAE)."""
    lengths = rollout.mask.sum(-1).clamp(min=1)
    sample_advantages = ((advantages * rollout.mask).sum(-1) / lengths).tolist() if advantages is not None else None
    rows = []
    for i in range(len(rollout)):
        row: dict[str, Any] = {"prompt": prompt_text(rollout.prompts[i]), "completion": prompt_text(rollout.completions[i])}
        for name, values in reward_columns.items():
            value = values[i]
            row[name] = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        row["reward"] = None if math.isnan(scores[i]) else float(scores[i])
        row["advantage"] = sample_advantages[i] if sample_advantages is not None else None
        rows.append(row)
    return rows


def prompt_text(prompt: Any) -> str:
    """A prompt or a completion as one string: chat messages as 'role: content' lines, an
    assistant's tool calls as 'name(arguments)' after its text (a multi-turn episode reads turn by turn)."""
    if not isinstance(prompt, list):
        return str(prompt)
    lines = []
    for message in prompt:
        if not isinstance(message, dict):
            lines.append(str(message))
            continue
        text = f"{message.get('role', '?')}: {message.get('content') or ''}"
        for call in message.get("tool_calls") or []:
            function = call.get("function", call) if isinstance(call, dict) else {}
            text += f" [call {function.get('name', '?')}({json.dumps(function.get('arguments', {}), default=str)})]"
        lines.append(text)
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table (TensorBoard renders text summaries as Markdown)."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.4g}"
        text = str("" if value is None else value).replace("\\", "\\\\")  # first, or "\\|" would end the cell
        return text.replace("|", "\\|").replace("\n", "<br>")

    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def log_completions(trackers: list[GeneralTracker], rows: list[dict[str, Any]], step: int) -> None:
    """The step's completion table to W&B (a wandb.Table) and TensorBoard (a text summary), on the
    main process (Accelerate's trackers exist there only)."""
    if not rows:
        return
    columns = ["step", *rows[0]]
    for tracker in trackers:
        if tracker.name == "wandb":
            tracker.log_table(COMPLETIONS_TABLE, columns=columns, data=[[step, *row.values()] for row in rows], step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_text(COMPLETIONS_TABLE, markdown_table(rows), global_step=step)
            tracker.writer.flush()


def flat_config(config: Any) -> dict[str, Any]:
    """The config as scalars and strings (TensorBoard's hparams accept nothing else)."""
    def scalar(value: Any) -> Any:
        if isinstance(value, list):
            return ", ".join(map(str, value))
        if isinstance(value, dict):
            return json.dumps(value)
        return "none" if value is None else value

    return {key: scalar(value) for key, value in config.to_dict().items()}
