"""Issue 19 item 1: one run per output_dir, and a resume only ever continues its own branch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_args
from rlhf import lineage
from rlhf.errors import CheckpointError


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps(out: Path) -> list[int]:
    return [row["step"] for row in rows(out)]


def run_ids(out: Path) -> set[str]:
    return {row["run_id"] for row in rows(out)}


def test_overwrite_clears_the_old_run_so_latest_never_resumes_it(tiny_model_dir, tmp_path, run_here):
    """The issue's repro. Before: overwrite deleted only metrics/samples, rotation then deleted the
    new run's step-1 and step-2, and latest resumed the old run's step-4: metrics steps 1, 2, 5, 6."""
    out = tmp_path / "run"
    keep_two = ("--save_steps", "1", "--save_total_limit", "2")
    old = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "4", "--seed", "1", *keep_two))
    assert old.returncode == 0, old.stderr[-2000:]
    old_run = lineage.read_record(out).run_id
    new = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "2", "--seed", "2", *keep_two,
                                               "--overwrite_output_dir", "true"))
    assert new.returncode == 0, new.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    resumed = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "6", "--seed", "2", *keep_two,
                                                   "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in resumed.stdout
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    (new_run,) = run_ids(out)
    assert new_run == lineage.read_record(out).run_id != old_run
    final = json.loads((out / "final" / lineage.FINAL_LINEAGE).read_text())
    assert final["run_id"] == new_run and final["step"] == 6
    state = json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["lineage"]["run_id"] == new_run and len(state["lineage"]["path"]) == 2  # started, resumed at 2
    assert not (out / lineage.ABANDONED_DIR).exists()


def test_resuming_an_older_step_sets_the_later_branch_aside(tiny_model_dir, tmp_path, run_here):
    """Before: resume from step-2 to 4, then latest to 8, resumed the abandoned step-6: metrics
    steps 1-4 then 7-8, and final/ of the abandoned branch stayed until the end."""
    out = tmp_path / "run"
    every_two = ("--save_steps", "2", "--save_total_limit", "5")
    first = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "6", *every_two))
    assert first.returncode == 0, first.stderr[-2000:]
    first_final = (out / "final" / "adapter_model.safetensors").read_bytes()
    branch = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "3", *every_two,
                                                  "--resume_from_checkpoint", str(out / "checkpoints" / "step-2")))
    assert branch.returncode == 0, branch.stderr[-2000:]
    assert "moved to" in branch.stdout and "not on the branch resumed from step 2" in branch.stdout
    (aside,) = (out / lineage.ABANDONED_DIR).iterdir()
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-4", "step-6"]
    assert (aside / "final" / "adapter_model.safetensors").read_bytes() == first_final  # kept, not deleted
    assert [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == [3, 4, 5, 6]
    assert steps(out) == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # save_steps 2: step 3 is final/

    latest = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "5", *every_two,
                                                  "--resume_from_checkpoint", "latest"))
    assert latest.returncode == 0, latest.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in latest.stdout
    assert steps(out) == [1, 2, 3, 4, 5] and len(run_ids(out)) == 1


def test_a_checkpoint_of_another_run_is_refused_and_nothing_changes(tiny_model_dir, tmp_path, run_here):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for out in (ours, theirs):
        result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--save_steps", "1"))
        assert result.returncode == 0, result.stderr[-2000:]
    def contents() -> dict:
        return {p.relative_to(ours): p.read_bytes() for p in ours.rglob("*") if p.is_file() and p.name != ".run.lock"}

    before = contents()
    mixed = run_here("train_ppo.py", *tiny_args(tiny_model_dir, ours, "--max_steps", "3", "--resume_from_checkpoint",
                                                 str(theirs / "checkpoints" / "step-1")))
    assert mixed.returncode == 2
    line = mixed.stderr.strip().splitlines()[-1]
    assert f"belongs to run {lineage.read_record(theirs).run_id}" in line
    assert f"holds run {lineage.read_record(ours).run_id}" in line
    assert contents() == before
    # into a fresh output_dir the checkpoint's run continues there (its id is kept)
    fork = tmp_path / "fork"
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, fork, "--max_steps", "3", "--resume_from_checkpoint",
                                                  str(theirs / "checkpoints" / "step-1")))
    assert result.returncode == 0, result.stderr[-2000:]
    assert steps(fork) == [2, 3] and run_ids(fork) == {lineage.read_record(theirs).run_id}


# ---- the choice of `latest` after a crash at any moment (unit level: fake checkpoints on disk)


def fake_checkpoint(out: Path, step: int, on: lineage.Lineage | None) -> None:
    path = out / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    state = {"step": step, "kl_controller": {"value": 0.0}, "baseline": {"value": 0.0, "initialized": False},
             "sampler": {"epoch": 0, "position": 0}, "python_rng": [3, [0] * 625, None]}
    if on is not None:
        state["lineage"] = on.to_dict()
    (path / "trainer_state.json").write_text(json.dumps(state))


def test_latest_follows_the_recorded_branch_even_with_abandoned_checkpoints_on_disk(tmp_path):
    out = tmp_path / "run"
    first = lineage.Lineage("run-a", [["seg-1", 0]])
    for step in (2, 4, 6):
        fake_checkpoint(out, step, first)
    lineage.write_record(out, first)
    assert lineage.plan_start(out, "latest").checkpoint.name == "step-6"

    branch = lineage.plan_start(out, str(out / "checkpoints" / "step-2"))
    assert branch.lineage.path == [["seg-1", 0], [branch.lineage.segment, 2]] and branch.step == 2
    lineage.write_record(out, branch.lineage)  # killed here: step-4 and step-6 not yet moved aside
    assert lineage.plan_start(out, "latest").checkpoint.name == "step-2"
    fake_checkpoint(out, 3, branch.lineage)
    assert lineage.plan_start(out, "latest").checkpoint.name == "step-3"
    # an overwrite killed after recording the new run (or a hand-edited run.json): never resumed, and
    # not silently started over either
    lineage.write_record(out, lineage.Lineage("run-b", [["seg-9", 0]]))
    with pytest.raises(CheckpointError, match="holds checkpoints, but none of the run and branch run.json records"):
        lineage.plan_start(out, "latest")
    # an explicit checkpoint of the left branch is refused in this output_dir
    lineage.write_record(out, branch.lineage)
    with pytest.raises(CheckpointError, match="is on a branch of this run that was left"):
        lineage.plan_start(out, str(out / "checkpoints" / "step-4"))


def test_a_refused_start_writes_nothing(tmp_path):
    """Review of 042786c: a damaged final/lineage.json was found only after run.json had been
    rewritten; a resume then followed the refused branch."""
    out = tmp_path / "run"
    first = lineage.Lineage("run-a", [["seg-1", 0]])
    for step in (1, 2):
        fake_checkpoint(out, step, first)
    lineage.write_record(out, first)
    (out / "final").mkdir()
    (out / "final" / lineage.FINAL_LINEAGE).write_text("{")
    (out / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    before = (out / lineage.RUN_RECORD).read_text()
    for spec in (str(out / "checkpoints" / "step-1"), "latest"):
        with pytest.raises(CheckpointError):
            lineage.plan_start(out, spec)
    assert (out / lineage.RUN_RECORD).read_text() == before


def test_a_kill_between_moving_aside_and_cutting_the_rows_keeps_them(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = lineage.Lineage("run-a", [["seg-1", 0]])
    for step in (1, 2, 3):
        fake_checkpoint(out, step, first)
    lineage.write_record(out, first)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in (1, 2, 3)))
    start = lineage.plan_start(out, str(out / "checkpoints" / "step-1"))

    import rlhf.tracking

    def killed(*args):
        raise KeyboardInterrupt  # stands for a kill -9 right after the move

    monkeypatch.setattr(rlhf.tracking, "write_rows", killed)
    with pytest.raises(KeyboardInterrupt):
        lineage.apply_start(out, start, overwrite=False, say=lambda line: None)
    (aside,) = (out / lineage.ABANDONED_DIR).iterdir()
    assert [json.loads(row)["step"] for row in (aside / "metrics.jsonl").read_text().splitlines()] == [2, 3]
    monkeypatch.undo()
    again = lineage.plan_start(out, "latest")  # the next start finishes the job
    assert again.checkpoint.name == "step-1" and again.off_branch == []
    lineage.apply_start(out, again, overwrite=False, say=lambda line: None)
    assert [json.loads(row)["step"] for row in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_overwrite_ignores_a_damaged_run_record(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / lineage.RUN_RECORD).write_text("{bad")
    start = lineage.plan_start(out, None)
    lineage.apply_start(out, start, overwrite=True, say=lambda line: None)
    assert lineage.read_record(out).run_id == start.lineage.run_id


def test_checkpoints_from_before_run_ids_still_resume_and_branch(tmp_path):
    """Review of 042786c: checkpoints without run ids counted as on every branch, so a later
    `latest` went back to the old step-3 after a resume from step-1."""
    out = tmp_path / "run"
    for step in (1, 2, 3):
        fake_checkpoint(out, step, None)
    assert lineage.plan_start(out, "latest").checkpoint.name == "step-3"
    start = lineage.plan_start(out, str(out / "checkpoints" / "step-1"))
    assert start.lineage.run_id and start.lineage.path[0][1] == 1
    assert sorted(p.name for p in start.off_branch) == ["step-2", "step-3"]
    lineage.write_record(out, start.lineage)  # killed before the move: latest still follows the branch
    assert lineage.plan_start(out, "latest").checkpoint.name == "step-1"


def test_a_damaged_run_record_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / lineage.RUN_RECORD).write_text('{"run_id": 3}')
    with pytest.raises(CheckpointError, match="run.json is invalid"):
        lineage.plan_start(out, "latest")


def test_a_damaged_checkpoint_after_the_resumed_step_is_set_aside_not_saved_over(tmp_path):
    """Resuming step-1 explicitly where step-2's trainer_state.json was damaged: step-2 counted as on
    the branch (so that `latest` reports the damage) and stayed, and the resumed run's save of
    step 2 replaced it (found by a stranger's review). A damaged checkpoint before the resumed step
    stays where it is."""
    out = tmp_path / "run"
    first = lineage.Lineage("run-a", [["seg-1", 0]])
    for step in (1, 2, 3):
        fake_checkpoint(out, step, first)
    lineage.write_record(out, first)
    (out / "checkpoints" / "step-3" / "trainer_state.json").write_bytes(bytes(range(128, 160)))
    (out / "checkpoints" / "step-1" / "trainer_state.json").write_text("[")
    with pytest.raises(CheckpointError, match="step-3 is corrupted"):
        lineage.plan_start(out, "latest")
    start = lineage.plan_start(out, str(out / "checkpoints" / "step-2"))
    assert [path.name for path in start.off_branch] == ["step-3"]


@pytest.mark.parametrize("damage", ["folder", "missing"])
def test_a_checkpoint_without_a_readable_state_file_is_reported_not_saved_over(tmp_path, damage):
    """step-3's trainer_state.json a folder (or gone): the checkpoint was not listed at all, so
    `latest` silently resumed step-2 and the save of step 3 replaced it (a stranger's review). Now
    `latest` reports it, and an explicit resume of step-2 sets it aside."""
    out = tmp_path / "run"
    first = lineage.Lineage("run-a", [["seg-1", 0]])
    for step in (1, 2, 3):
        fake_checkpoint(out, step, first)
    lineage.write_record(out, first)
    state_file = out / "checkpoints" / "step-3" / "trainer_state.json"
    state_file.unlink()
    if damage == "folder":
        state_file.mkdir()
    with pytest.raises(CheckpointError, match="step-3 is corrupted: trainer_state.json unreadable .*resume from another"):
        lineage.plan_start(out, "latest")
    start = lineage.plan_start(out, str(out / "checkpoints" / "step-2"))
    assert [path.name for path in start.off_branch] == ["step-3"]
