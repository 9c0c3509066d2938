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
