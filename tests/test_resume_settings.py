"""Issue 19 item 7: a resume either applies a changed setting or refuses it, never claims one
and does the other."""

from __future__ import annotations

from conftest import tiny_args


def test_a_changed_learning_rate_on_resume_is_refused(tiny_model_dir, tmp_path, run_here):
    """Before: 'resuming with changed settings: learning_rate ...' and the restored optimizer kept
    the old rate."""
    out = tmp_path / "run"
    first = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--save_steps", "1"))
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "3", "--resume_from_checkpoint", "latest",
                                    "--learning_rate", "0.01"))
    assert resumed.returncode == 2
    line = resumed.stderr.strip().splitlines()[-1]
    assert "was trained with learning_rate=" in line and "this run has 0.01" in line and "start a new run" in line
    same = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "3", "--resume_from_checkpoint", "latest"))
    assert same.returncode == 0, same.stderr[-2000:]


def test_a_signal_during_the_final_save_finishes_it(tiny_model_dir, tmp_path):
    """Item 3. Before: SIGTERM during final/ killed the process (rc -15), final/ was never
    published and with save_steps 0 nothing of the run was left."""
    import signal

    from test_reliability import run

    out = tmp_path / "run"
    result = run(*tiny_args(tiny_model_dir, out), fault=("signal-during-final", "SIGTERM"))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"SIGTERM received while saving the final adapter; the run is complete: {out / 'final'}")
    assert (out / "final" / "adapter_model.safetensors").is_file() and not (out / ".tmp-final").exists()


def test_a_second_run_on_a_locked_output_dir_exits_2_naming_the_holder(tmp_path):
    """Item 2. Before: two runs 0.5 s apart interleaved their metrics rows."""
    import os
    import subprocess
    import sys

    import pytest

    from rlhf.errors import ConfigError
    from rlhf.runlock import OutputDirLock

    with OutputDirLock(tmp_path / "run"):
        with pytest.raises(ConfigError, match=f"in use by a running run \\(pid {os.getpid()} on"):
            OutputDirLock(tmp_path / "run").__enter__()
    with OutputDirLock(tmp_path / "run"):  # released when the run ends
        pass
    # a killed holder leaves no stale lock: the kernel drops it with the process
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from rlhf.runlock import OutputDirLock; "
                               f"lock = OutputDirLock(Path({str(tmp_path / 'other')!r})).__enter__(); "
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        OutputDirLock(tmp_path / "other").__enter__()
    holder.kill()
    holder.wait()
    with OutputDirLock(tmp_path / "other"):
        pass


def test_a_run_holds_the_lock_while_training(tiny_model_dir, tmp_path, run_here, monkeypatch):
    from rlhf.runlock import OutputDirLock
    from rlhf.trainer import RLTrainer

    out = tmp_path / "run"
    seen = []
    original = RLTrainer.train_step

    def step_and_probe(self):
        try:
            OutputDirLock(out).__enter__()
            seen.append("free")
        except Exception as exc:
            seen.append(str(exc))
        return original(self)

    monkeypatch.setattr(RLTrainer, "train_step", step_and_probe)
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "in use by a running run" in seen[0]


def test_latest_on_a_finished_run_without_checkpoints_is_refused(tiny_model_dir, tmp_path, run_here):
    """Item 5. Before: the finished run's metrics were wiped and it was trained again from step 0."""
    out = tmp_path / "run"
    assert run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "1")).returncode == 0
    before = (out / "metrics.jsonl").read_text()
    again = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "1",
                                                "--resume_from_checkpoint", "latest"))
    assert again.returncode == 2
    assert "holds a finished run (final/) without checkpoints" in again.stderr.strip().splitlines()[-1]
    assert (out / "metrics.jsonl").read_text() == before and (out / "final").is_dir()


def test_latest_on_an_empty_output_dir_starts_from_step_0(tiny_model_dir, tmp_path, run_here):
    """Item 5, the other way. Before: an output_dir left empty (killed while loading) was refused."""
    out = tmp_path / "run"
    out.mkdir()
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "1",
                                                 "--resume_from_checkpoint", "latest"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "starting from step 0" in result.stdout


def test_a_missing_or_damaged_rng_state_is_refused(tiny_model_dir, tmp_path, run_here):
    """Item 4. Before: Accelerate logged and skipped the RNG state; the resume returned 0 and
    sampled other responses than the uninterrupted run."""
    out = tmp_path / "run"
    assert run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--save_steps", "1")).returncode == 0
    state = out / "checkpoints" / "step-2" / "accelerate" / "random_states_0.pkl"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the archive
    state.write_bytes(bytes(data))
    damaged = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "3",
                                                  "--resume_from_checkpoint", "latest"))
    assert damaged.returncode == 2
    assert "optimizer/RNG state unreadable (random_states_0.pkl" in damaged.stderr.strip().splitlines()[-1]
    state.unlink()
    missing = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "3",
                                                  "--resume_from_checkpoint", "latest"))
    assert missing.returncode == 2 and "random_states_0.pkl, this process's RNG state, is missing" in missing.stderr
    # a complete archive that is not an RNG state (another file of the checkpoint copied over it):
    # Accelerate skipped it with a log line, and the resume was not the uninterrupted run's
    import shutil

    shutil.copyfile(state.parent / "optimizer.bin", state)
    swapped = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "3",
                                                  "--resume_from_checkpoint", "latest"))
    assert swapped.returncode == 2, swapped.stderr[-1500:]
    assert "random_states_0.pkl is not an RNG state" in swapped.stderr.strip().splitlines()[-1]
