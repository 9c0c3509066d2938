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
