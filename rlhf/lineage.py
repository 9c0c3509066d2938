"""Which checkpoints belong to the run in ``output_dir``, and to the branch it is on.

A run gets an id when it starts from step 0. Each start of the trainer (the first, and every
resume) opens a *segment*; the run's *path* is the list of its segments with the step each began
at. ``output_dir/run.json`` holds the run id and the path of the branch being trained; every
checkpoint (``trainer_state.json``) and ``final/lineage.json`` hold the path at the time they
were written, and every metrics row holds the run id.

A checkpoint is on the current branch when its run id is the run's and its last segment is on
the run's path at a step that segment covered. Resuming from ``step-K`` while later checkpoints
exist (resuming from an older step) starts a new segment at K: the later ones are an abandoned
branch and ``latest`` never picks them, even if they are still on disk after a crash. Whatever
is not on the branch (checkpoints, ``final/``, the metrics rows after K) is moved to
``output_dir/abandoned/``, never deleted; ``--overwrite_output_dir`` deletes the old run.

``run.json`` is written (atomically) before anything of a new segment, so a kill at any moment
leaves a state the next start reads correctly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.errors import CheckpointError
from rlhf.tracking import RowSplit

RUN_RECORD = "run.json"
FINAL_LINEAGE = "lineage.json"  # in final/: which run, branch and step the adapter is
ABANDONED_DIR = "abandoned"
# Outputs that belong to a run (an overwrite deletes them, a branch change moves them aside).
# (wandb/ is not among them: an offline W&B run not yet synced would be lost.)
RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "samples.jsonl", "tensorboard", ABANDONED_DIR)
# The run of a checkpoint written before run ids existed: it counts as on a branch up to the step
# where that branch's first recorded segment began.
UNKNOWN = None


def new_id() -> str:
    return uuid.uuid4().hex[:12]  # os.urandom: leaves the seeded random streams untouched


@dataclass
class Lineage:
    """``run_id`` and ``path``: ``[[segment_id, first_step], ...]``, oldest segment first."""

    run_id: str | None
    path: list[list[Any]] = field(default_factory=list)

    @property
    def segment(self) -> str | None:
        return self.path[-1][0] if self.path else UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "path": self.path}

    @classmethod
    def from_dict(cls, data: Any, source: Path) -> Lineage:
        try:
            run_id, path = data.get("run_id"), data.get("path", [])
            if not (run_id is None or isinstance(run_id, str)) or not isinstance(path, list) or not all(
                    isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], int) and not isinstance(entry[1], bool) for entry in path):
                raise TypeError
        except (AttributeError, TypeError):
            raise CheckpointError(f"{source} is invalid: lineage must be {{'run_id': str, 'path': "
                                  f"[[segment, step], ...]}}; restore the file or start a new output_dir") from None
        return cls(run_id, [list(entry) for entry in path])

    def started(self, segment: str, at_step: int) -> Lineage:
        """This lineage continued by a new segment from ``at_step``."""
        return Lineage(self.run_id, [*self.path, [segment, at_step]])

    def covers(self, other: Lineage, step: int) -> bool:
        """Whether something written on ``other`` at ``step`` is on this branch."""
        if other.run_id is UNKNOWN:  # written before run ids: before this lineage's first recorded segment
            return not self.path or step <= self.path[0][1]
        if other.run_id != self.run_id:
            return False
        for index, (segment, first_step) in enumerate(self.path):
            if segment == other.segment:
                last_step = self.path[index + 1][1] if index + 1 < len(self.path) else None
                return first_step <= step and (last_step is None or step <= last_step)
        return False


def read_record(output_dir: Path) -> Lineage | None:
    file = output_dir / RUN_RECORD
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is unreadable ({exc}); restore it or start a new output_dir") from None
    return Lineage.from_dict(data, file)


def write_record(output_dir: Path, lineage: Lineage) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / f".tmp-{RUN_RECORD}"
    with staging.open("w") as handle:
        json.dump({**lineage.to_dict(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, output_dir / RUN_RECORD)


def of_trainer_state(state: dict[str, Any], source: Path) -> Lineage:
    """The lineage a checkpoint was written on (UNKNOWN run for checkpoints older than run ids)."""
    return Lineage.from_dict(state["lineage"], source) if "lineage" in state else Lineage(UNKNOWN)


def of_final(final_dir: Path) -> tuple[Lineage, int]:
    """(lineage, step) of a final/ dir; one written before run ids counts as step 0 of an UNKNOWN run."""
    file = final_dir / FINAL_LINEAGE
    if not file.is_file():
        return Lineage(UNKNOWN), 0
    try:
        data = json.loads(file.read_text())
        return Lineage.from_dict(data, file), int(data["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{file} is unreadable; restore it or move {final_dir} away") from None


def final_lineage_file(lineage: Lineage, step: int) -> str:
    return json.dumps({**lineage.to_dict(), "step": step}, indent=2)


def set_aside(output_dir: Path, paths: list[Path], metrics_rows: dict[str, list[str]], reason: str) -> Path | None:
    """Move ``paths`` (checkpoints, final/) and the given metrics/samples rows into a new
    ``abandoned/<time>-<reason>/`` dir, keeping their names relative to output_dir."""
    if not paths and not any(metrics_rows.values()):
        return None
    target = output_dir / ABANDONED_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{reason}-{new_id()[:6]}"
    target.mkdir(parents=True)
    for name, rows in metrics_rows.items():
        if rows:
            with (target / name).open("w") as handle:  # on disk before the originals are cut
                handle.write("".join(row + "\n" for row in rows))
                handle.flush()
                os.fsync(handle.fileno())
    for path in paths:
        destination = target / path.relative_to(output_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        path.rename(destination)
    return target


def delete_run_outputs(output_dir: Path) -> None:
    """What ``--overwrite_output_dir`` removes: every output of the old run (config.yaml is rewritten)."""
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- starting a run


@dataclass
class Start:
    """What a start of the trainer does, decided before anything is written (``plan_start``)."""

    lineage: Lineage  # the branch this start trains (run.json once applied)
    checkpoint: Path | None = None  # None: a new run from step 0
    step: int = 0
    restart: bool = False  # resume latest found nothing to load: a new run
    off_branch: list[Path] = field(default_factory=list)  # checkpoints and final/ to set aside
    metrics: dict[str, RowSplit] = field(default_factory=dict)  # metrics/samples rows kept and dropped


def _on(branch: Lineage, checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is on ``branch``. One whose state cannot be read counts as on it, so
    that choosing it reports the damage (load_checkpoint) instead of silently taking an older one;
    it is moved aside only where the resumed branch would save over it (``_off_branch``)."""
    written_on = _written_on(checkpoint)
    return written_on is None or branch.covers(written_on, _step_of(checkpoint))


def _written_on(checkpoint: Path) -> Lineage | None:
    """The lineage the checkpoint was written on; None where its state cannot be read."""
    from rlhf.checkpoint import TRAINER_STATE

    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        return of_trainer_state(state, checkpoint / TRAINER_STATE) if isinstance(state, dict) else None
    except (OSError, ValueError, CheckpointError):
        return None


def _step_of(path: Path) -> int:
    from rlhf.checkpoint import CHECKPOINT_PATTERN

    return int(CHECKPOINT_PATTERN.match(path.name).group(1))


def plan_start(output_dir: Path, resume: str | None) -> Start:
    """Read-only (every process calls it before anything is written): the checkpoint to resume,
    the lineage of the branch that continues from it, and what is not on that branch. Every
    refusal (CheckpointError) happens here, so a refused start changes nothing."""
    from rlhf import checkpoint as ckpt

    segment = new_id()
    if not resume:  # a new run (an overwrite deletes the old one whatever state its files are in)
        return Start(Lineage(new_id(), [[segment, 0]]))
    record = read_record(output_dir)
    checkpoints = ckpt.list_checkpoints(output_dir / "checkpoints")
    if resume == "latest":
        on_branch = [path for path in checkpoints if record is None or _on(record, path)]
        if not on_branch:
            return _restart(output_dir, record, checkpoints, segment)
        checkpoint = on_branch[-1]
    else:
        checkpoint = ckpt.resolve_checkpoint(resume, output_dir)
    state = ckpt.read_trainer_state(checkpoint)
    lineage = of_trainer_state(state, checkpoint / ckpt.TRAINER_STATE)
    if record is not None and lineage.run_id not in (UNKNOWN, record.run_id):
        raise CheckpointError(f"checkpoint {checkpoint} belongs to run {lineage.run_id}, but {output_dir} holds run "
                              f"{record.run_id}; resume it into its own output_dir (or a new one), or pass "
                              "--overwrite_output_dir true without --resume_from_checkpoint to start over")
    if record is not None and not record.covers(lineage, state["step"]):
        raise CheckpointError(f"checkpoint {checkpoint} is on a branch of this run that was left (run.json follows "
                              f"another one); resume it into a new output_dir, or resume {output_dir} with latest")
    if lineage.run_id is UNKNOWN:  # written before run ids: adopt it into this output_dir's run
        lineage = Lineage(record.run_id if record is not None else new_id(), [])
    branch = lineage.started(segment, state["step"])
    return Start(branch, checkpoint, state["step"],
                 off_branch=_off_branch(output_dir, branch, checkpoints, state["step"]),
                 metrics=_split_rows(output_dir, state["step"]))


def _restart(output_dir: Path, record: Lineage | None, checkpoints: list[Path], segment: str) -> Start:
    """Resume latest with no checkpoint of the recorded branch: start over only when there is
    nothing else either (killed before its first checkpoint, or while loading)."""
    if checkpoints:
        raise CheckpointError(
            f"{output_dir / 'checkpoints'} holds checkpoints, but none of the run and branch run.json records "
            f"(run {record.run_id if record else '?'}): run.json was edited, or an overwrite was interrupted; "
            "resume one explicitly with --resume_from_checkpoint DIR, or pass --overwrite_output_dir true "
            "(without --resume_from_checkpoint) to start over")
    final = output_dir / "final"
    if final.is_dir() and (record is None or record.covers(*of_final(final))):
        raise CheckpointError(
            f"output_dir {output_dir} holds a finished run (final/) without checkpoints, so there is nothing "
            "to resume; pass --overwrite_output_dir true to train it again, or choose another output_dir")
    fresh = Lineage(new_id(), [[segment, 0]])
    return Start(fresh, restart=True, off_branch=[final] if final.is_dir() else [],
                 metrics=_split_rows(output_dir, 0))


def _off_branch(output_dir: Path, branch: Lineage, checkpoints: list[Path], resumed_step: int) -> list[Path]:
    def goes_aside(path: Path) -> bool:  # not _on the branch, its state read once
        written_on = _written_on(path)
        if written_on is None:  # damaged: aside only after the resumed step, where the branch would save over it
            return _step_of(path) > resumed_step
        return not branch.covers(written_on, _step_of(path))

    off = [path for path in checkpoints if goes_aside(path)]
    final = output_dir / "final"
    if final.is_dir() and not branch.covers(*of_final(final)):
        off.append(final)
    return off


def _split_rows(output_dir: Path, last_step: int) -> dict[str, RowSplit]:
    from rlhf.tracking import split_rows

    return {name: split_rows(output_dir / name, last_step) for name in ("metrics.jsonl", "samples.jsonl")}


def apply_start(output_dir: Path, start: Start, overwrite: bool, say: Any = print) -> None:
    """Main process, after the checkpoint loaded: record the branch, then clear what is not on it.

    A new run with ``overwrite`` deletes the old run's outputs. Otherwise, in this order (a kill
    between any two leaves a state the next start completes): run.json; the off-branch
    checkpoints, final/ and the rows after the resumed step moved to ``abandoned/`` (rows written
    and synced first); metrics/samples cut to the resumed step."""
    from rlhf.tracking import write_rows

    write_record(output_dir, start.lineage)  # first: from now on nothing off the branch is resumed
    if start.checkpoint is None and not start.restart:
        if overwrite:
            delete_run_outputs(output_dir)
        return
    if start.off_branch:
        moved = set_aside(output_dir, start.off_branch, {name: split.dropped for name, split in start.metrics.items()},
                          f"after-step-{start.step}")
        what = ", ".join(str(path.relative_to(output_dir)) for path in start.off_branch)
        say(f"{what} (not on the branch resumed from step {start.step}) moved to {moved}")
    # else only rows the resumed steps log again are cut (a crash after the last checkpoint)
    for name, split in start.metrics.items():
        if split.exists:
            write_rows(output_dir / name, split.kept)
