"""Issue 19 item 6: a full disk while logging, and a torn last row."""

from __future__ import annotations

import errno
import json

import pytest

from rlhf.errors import CheckpointError
from rlhf.tracking import JSONLTracker, split_rows, write_rows


def test_disk_full_while_logging_leaves_no_torn_row_and_is_one_line(tmp_path, monkeypatch):
    """Before: a traceback, half a row in metrics.jsonl, and the next resume crashed on it."""
    tracker = JSONLTracker("run", tmp_path)
    tracker.log({"reward_mean": 1.0}, step=1)
    real_open = type(tracker.path).open

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def tell(self):
            return self.handle.tell()

        def truncate(self, size):
            return self.handle.truncate(size)

        def write(self, data):
            self.handle.write(data[:7])  # a part gets written, then the disk is full
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.handle.flush()

    monkeypatch.setattr(type(tracker.path), "open", lambda self, mode="r", *a, **k: FullDisk(real_open(self, mode, *a, **k))
                        if self.name == "metrics.jsonl" and "a" in mode else real_open(self, mode, *a, **k))
    with pytest.raises(CheckpointError, match="could not write metrics.jsonl \\(No space left on device\\); "
                                              "checkpoints written so far are intact"):
        tracker.log({"reward_mean": 2.0}, step=2)
    monkeypatch.undo()
    assert [json.loads(line)["step"] for line in tracker.path.read_text().splitlines()] == [1]


def test_a_torn_last_row_is_dropped_on_resume(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')  # killed mid-write
    write_rows(metrics, split_rows(metrics, 2).kept)  # what a resume at step 2 does (rlhf.lineage.apply_start)
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert not (tmp_path / ".tmp-metrics.jsonl").exists()
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # damage inside the file is not a torn row
    with pytest.raises(CheckpointError, match="row 2 is not JSON"):
        split_rows(metrics, 2)


def test_rows_a_resume_keeps_are_written_back_byte_for_byte_and_odd_rows_are_refused(tmp_path):
    """A kept row's non-UTF-8 byte came back as U+FFFD; a row that is JSON but not an object, or
    whose step is not a number, and a metrics.jsonl that is a folder ended the resume in a
    traceback (found by a stranger's review)."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1, "note": "caf\xc3\xa9"}\n{"step": 2}\n')
    write_rows(metrics, split_rows(metrics, 2).kept)
    assert metrics.read_bytes() == b'{"step": 1, "note": "caf\xc3\xa9"}\n{"step": 2}\n'
    metrics.write_bytes(b'{"step": 1, "note": "caf\xe9"}\n{"step": 2}\n')  # Latin-1 written by hand
    with pytest.raises(CheckpointError, match="row 1 is not JSON"):
        split_rows(metrics, 2)
    for row in ("[1, 2]", '{"step": "2"}', "7"):
        metrics.write_text(f'{{"step": 1}}\n{row}\n{{"step": 2}}\n')
        with pytest.raises(CheckpointError, match="row 2 is not a JSON object with a numeric step"):
            split_rows(metrics, 2)
    metrics.unlink()
    metrics.mkdir()
    with pytest.raises(CheckpointError, match="metrics.jsonl is not a file; move it away"):
        split_rows(metrics, 2)


def test_the_model_card_passes_over_a_hand_edited_metrics_row(tmp_path):
    """evaluate.py's card update read a row whose step was a string and ended in a TypeError."""
    from rlhf.card import read_run_for_card

    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 3}')
    (run / "config.yaml").write_text("run_name: demo\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.1}\n{"step": "two"}\n[3]\n'
                                       '{"step": 3, "reward_mean": 0.3}\n{"step": 4, "reward_mean": 0.4}\n')
    settings, metrics, steps = read_run_for_card(checkpoint)
    assert settings == {"run_name": "demo"} and metrics["reward_mean"] == 0.3 and steps == 3
