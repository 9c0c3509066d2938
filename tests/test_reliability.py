"""A killed run continues exactly where it stopped; checkpoints are atomic; signals, non-finite
losses and failing rewards are handled; nothing written earlier is lost.

A run that is killed or signalled is a real process (subprocess); every other run (the reference,
the resumes, the injected disk-full/NaN/reward faults) runs the script in this process, with one
torch thread as the subprocesses have (OMP_NUM_THREADS=1), so all of them compute the same bytes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, run_in_process, tiny_args
from fixtures import faults

# Wall-clock and throughput columns differ between any two runs, and so does the run's id (rlhf.lineage);
# everything else must not.
def is_timing(key: str) -> bool:
    return key.endswith("_time_s") or key in ("samples_per_second", "tokens_per_second", "run_id")
STEPS = 5


def environment() -> dict[str, str]:
    # The same thread count in every run: float reductions then run in the same order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def train_command(*args: str, script: str = "train_ppo.py", fault: tuple[str, str] | None = None) -> list[str]:
    if fault:
        return [sys.executable, str(FIXTURES / "faults.py"), *fault, str(ROOT / "scripts" / script), *args]
    return [sys.executable, str(ROOT / "scripts" / script), *args]


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(*args, **kwargs), capture_output=True, text=True, env=environment(),
                          timeout=600, cwd=ROOT)


@pytest.fixture
def train_here(run_here, monkeypatch):
    """``run`` in this process: the same script, thread count and fault (undone after the run)."""

    def train(*args: str, script: str = "train_ppo.py", fault: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
        with monkeypatch.context() as patches:
            if fault:
                faults.install(*fault, patch=patches.setattr)
            return run_here(script, *args, env={"OMP_NUM_THREADS": "1"}, threads=1)

    return train


# Six prompts and four per step: the 5-step runs cross three epoch boundaries of the sampler.
PROMPTS = ["Say hi.", "Name a colour.", "Why is the sky blue?", "Count to three.", "Write a haiku.", "Ok?"]


def run_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    dataset = out.parent / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tiny_args(model_dir, out, "--max_steps", str(STEPS), "--save_steps", "1", "--save_total_limit", "2",
                     "--num_samples_to_log", "2", "--dataset", str(dataset), *extra)


def comparable_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not is_timing(k)} for row in rows]


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_in_process("train_ppo.py", *run_args(tiny_model_dir, out), env={"OMP_NUM_THREADS": "1"}, threads=1)
    assert result.returncode == 0, "see the captured stderr of this setup"
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    assert comparable_rows(out) == comparable_rows(reference)
    # one run, however often it was resumed
    assert len({json.loads(line)["run_id"] for line in (out / "metrics.jsonl").read_text().splitlines()}) == 1
    assert [r["step"] for r in comparable_rows(out)] == list(range(1, STEPS + 1))  # no doubled or missing rows
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert (out / "final" / name).read_bytes() == (reference / "final" / name).read_bytes(), name
    assert (out / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()


def test_sigkill_at_a_random_step_then_resume_is_exact(reference, tiny_model_dir, tmp_path, train_here):
    kill_after = random.Random().randint(1, STEPS - 2)
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(*run_args(tiny_model_dir, out)), env=environment(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # wherever it is now: mid-step, mid-save or between
    assert process.wait() == -signal.SIGKILL, f"the run ended before the kill after step {kill_after}"

    resumed = train_here(*run_args(tiny_model_dir, out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # killed before the first checkpoint was complete, the run starts over (and must still match)
    assert "resumed from" in resumed.stdout or "starting from step 0" in resumed.stdout, kill_after
    assert_same_run(out, reference)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(reference, tiny_model_dir, tmp_path, train_here):
    out = tmp_path / "run"
    killed = run(*run_args(tiny_model_dir, out), fault=("kill-during-save", "3"))
    assert killed.returncode == -signal.SIGKILL
    checkpoints = out / "checkpoints"
    assert (checkpoints / ".tmp-step-3" / "adapter_model.safetensors").is_file()  # the half-written one
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step-1", "step-2"]

    # the optimizer/scheduler/RNG files are read with torch.load(weights_only=True) only
    resumed = train_here(*run_args(tiny_model_dir, out, "--resume_from_checkpoint", "latest"),
                         fault=("strict-torch-load", "-"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step-2'}" in resumed.stdout + resumed.stderr
    assert not any(p.name.startswith(".") for p in checkpoints.iterdir())  # leftovers cleaned up
    assert_same_run(out, reference)


def test_sigkill_while_writing_final_then_resume_is_exact(reference, tiny_model_dir, tmp_path, train_here):
    out = tmp_path / "run"
    killed = run(*run_args(tiny_model_dir, out), fault=("kill-during-final", "-"))
    assert killed.returncode == -signal.SIGKILL
    assert (out / ".tmp-final" / "adapter_model.safetensors").is_file() and not (out / "final").exists()
    resumed = train_here(*run_args(tiny_model_dir, out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{STEPS}'} at step {STEPS}" in resumed.stdout
    assert not (out / ".tmp-final").exists()
    assert_same_run(out, reference)


def hanging_run(model_dir: Path, out: Path, hang_at: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """A run whose reward function hangs at step ``hang_at``; returns once it hangs there."""
    marker = out.parent / "hanging"
    marker.unlink(missing_ok=True)
    args = run_args(model_dir, out, "--reward_funcs", f"{FIXTURES / 'hanging_rewards.py'}:char_diversity", *extra)
    env = {**environment(), "RLHF_TEST_HANG_AT_STEP": str(hang_at), "RLHF_TEST_HANG_MARKER": str(marker),
           **(env or {})}
    process = subprocess.Popen(train_command(*args), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.is_file(), "the run never reached the hanging reward"
    return process


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_a_signal_while_a_reward_hangs_then_resume_is_exact(reference, tiny_model_dir, tmp_path, train_here, signum):
    """Before: SIGINT during a hanging reward function was noted and then nothing happened (the
    step never ended); only a second signal stopped the run, with no checkpoint of the last step."""
    hang_at = random.Random().randint(1, STEPS)
    out = tmp_path / "run"
    process = hanging_run(tiny_model_dir, out, hang_at)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130, stderr[-3000:]
        checkpoint = out / "checkpoints" / f"step-{hang_at - 1}"
        assert stderr.strip().splitlines()[-1] == (
            f"stopped by SIGINT after step {hang_at - 1} (step {hang_at} was abandoned while its reward functions "
            f"ran; a resume runs it again); checkpoint {checkpoint}; continue with --resume_from_checkpoint latest "
            "(same output_dir)")
        assert (checkpoint / "trainer_state.json").is_file()
    resumed = train_here(*run_args(tiny_model_dir, out, "--resume_from_checkpoint", "latest", "--reward_funcs",
                                   f"{FIXTURES / 'hanging_rewards.py'}:char_diversity"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, reference)


def test_a_timed_reward_that_keeps_drawing_random_numbers_still_resumes_exactly(reference, tiny_model_dir,
                                                                                 tmp_path, train_here):
    """Review of 042786c: with reward_timeout the call runs in a thread that goes on after the signal;
    its torch.rand calls moved the saved RNG state (the resume differed) and the process ended with
    134 (aborted in native code at shutdown) instead of 130."""
    out = tmp_path / "run"
    process = hanging_run(tiny_model_dir, out, 3, "--reward_timeout", "300", env={"RLHF_TEST_HANG_BUSY": "1"})
    time.sleep(0.5)  # let it draw
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    resumed = train_here(*run_args(tiny_model_dir, out, "--resume_from_checkpoint", "latest", "--reward_funcs",
                                   f"{FIXTURES / 'hanging_rewards.py'}:char_diversity", "--reward_timeout", "300"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, reference)


def test_a_run_that_gave_up_on_a_busy_reward_call_exits_0(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, out, "--reward_funcs", f"{FIXTURES / 'hanging_rewards.py'}:char_diversity",
                     "--reward_timeout", "0.5", "--reward_error", "zero")
    env = {**environment(), "RLHF_TEST_HANG_AT_STEP": "2", "RLHF_TEST_HANG_BUSY": "1", "RLHF_TEST_HANG_SECONDS": "60"}
    result = subprocess.run(train_command(*args), capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_a_signal_while_evaluation_hangs_keeps_the_step(tiny_model_dir, tmp_path, train_here):
    """Review of 042786c: the hang in step 1's evaluation (after its update) was handled as a hang
    in scoring: step-1 was saved with the weights after step 1 but the data order before it, its
    metrics row was lost, and the resumed run differed from the uninterrupted one."""
    evaluating = ("--eval_steps", "1", "--eval_num_prompts", "2", "--eval_dataset", str(tmp_path / "prompts.jsonl"))
    reference = tmp_path / "reference"
    done = train_here(*run_args(tiny_model_dir, reference, "--reward_funcs",
                                f"{FIXTURES / 'hanging_rewards.py'}:char_diversity", *evaluating))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    process = hanging_run(tiny_model_dir, out, 2, *evaluating)  # global_step 1: the evaluation after step 1
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "abandoning the evaluation (the step itself is complete)" in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"stopped by SIGINT after step 1; checkpoint {out / 'checkpoints' / 'step-1'}")
    resumed = train_here(*run_args(tiny_model_dir, out, "--resume_from_checkpoint", "latest", "--reward_funcs",
                                   f"{FIXTURES / 'hanging_rewards.py'}:char_diversity", *evaluating))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows, expected = comparable_rows(out), comparable_rows(reference)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert "eval/reward_mean" not in rows[0]  # the abandoned evaluation; the step's own numbers are kept
    assert rows[0] == {k: v for k, v in expected[0].items() if not k.startswith("eval/")}
    assert rows[1:] == expected[1:]
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert (out / "final" / name).read_bytes() == (reference / "final" / name).read_bytes(), name


def test_disk_full_while_saving_exits_2_and_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, train_here):
    out = tmp_path / "run"
    result = train_here(*run_args(tiny_model_dir, out), fault=("disk-full-during-save", "2"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert last_line(result) == (f"error: could not write checkpoint {out / 'checkpoints' / 'step-2'}: "
                                 "No space left on device; the earlier checkpoints are intact")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert (out / "checkpoints" / "step-1" / "trainer_state.json").is_file()


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tiny_model_dir, tmp_path, signum, exit_code, train_here):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, out, "--max_steps", "50", "--save_steps", "0")
    process = subprocess.Popen(train_command(*args), env=environment(), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == exit_code, stderr[-3000:]
    step = len(metrics.read_text().splitlines())
    name = signal.Signals(signum).name
    # Where in the next step the signal lands decides one clause: during its reward functions that
    # step is abandoned, and the line says so; anywhere else it is finished first.
    abandoned = f" (step {step + 1} was abandoned while its reward functions ran; a resume runs it again)"
    assert stderr.strip().splitlines()[-1] in {
        f"stopped by {name} after step {step}{during}; checkpoint {out / 'checkpoints' / f'step-{step}'}; "
        "continue with --resume_from_checkpoint latest (same output_dir)" for during in ("", abandoned)}
    assert "Traceback" not in stderr
    resumed = train_here(*tiny_args(tiny_model_dir, out, "--max_steps", str(step + 1), "--resume_from_checkpoint",
                                    "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming with changed settings: max_steps 50 -> {step + 1}" in resumed.stdout
    assert [row["step"] for row in comparable_rows(out)] == list(range(1, step + 2))


def test_a_non_finite_loss_skips_the_step_and_training_goes_on(tiny_model_dir, tmp_path, train_here):
    out = tmp_path / "run"
    result = train_here(*tiny_args(tiny_model_dir, out, "--max_steps", "3"), fault=("nan-loss", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 optimizer step(s) with a non-finite loss, gradient or updated weights" in result.stderr
    rows = comparable_rows(out)
    assert [row["skipped_steps"] for row in rows] == [0, 1, 0]
    from safetensors.torch import load_file

    assert all(bool(t.isfinite().all()) for t in load_file(str(out / "final" / "adapter_model.safetensors")).values())


def test_a_step_that_makes_weights_non_finite_is_taken_back(tiny_model_dir, tmp_path, train_here):
    """Issue 19 item 8. Before: an optimizer step that left a weight at inf (finite loss and
    gradient) was kept: the next steps' losses were NaN and final/ held the non-finite weight."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = train_here(*tiny_args(tiny_model_dir, out, "--max_steps", "3", "--save_steps", "1",
                                   "--save_total_limit", "3"), fault=("inf-weights", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["skipped_steps"] for row in comparable_rows(out)] == [1, 0, 0]
    assert all(bool(t.isfinite().all()) for t in load_file(str(out / "final" / "adapter_model.safetensors")).values())
    step_1 = load_file(str(out / "checkpoints" / "step-1" / "adapter_model.safetensors"))
    assert all(bool((t == 0).all()) for name, t in step_1.items() if "lora_B" in name)  # as initialised
    # the optimizer state was put back too: after the taken-back step 1, Adam had seen no step
    checkpoint = out / "checkpoints"
    for name in ("step-2", "step-3"):
        optimizer = torch.load(checkpoint / name / "accelerate" / "optimizer.bin", weights_only=True)
        assert {int(s["step"]) for s in optimizer["state"].values()} == {int(name[-1]) - 1}, name


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_all_finite_answers_as_isfinite_does_element_by_element(dtype):
    """The step guard's check: a NaN or an infinity anywhere in any tensor is seen, and finite
    elements whose sum overflows (the fast path's sum) are still finite."""
    import torch

    from rlhf.update import all_finite

    dtype = getattr(torch, dtype)
    largest = torch.finfo(dtype).max
    finite = [torch.randn(16, 24).to(dtype), torch.randn(40, 16).to(dtype), torch.zeros(0, 3, dtype=dtype)]
    assert all_finite(finite) and all_finite([])
    assert all_finite([*finite, torch.full((2, 3), largest, dtype=dtype)])  # sums to inf, every element finite
    assert all_finite([torch.tensor([largest, -largest, largest], dtype=dtype)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in range(len(finite) - 1):
            tensors = [t.clone() for t in finite]
            tensors[where][3, 5] = bad
            assert not all_finite(tensors), (bad, where)
    assert not all_finite([torch.tensor([float("inf"), -float("inf")], dtype=dtype)])  # a sum of NaN
    if dtype in (torch.float32, torch.float64):  # an imaginary part a real sum would drop
        assert not all_finite([torch.zeros(3, dtype=dtype), torch.tensor([0, complex(0, float("nan"))])])
        assert all_finite([torch.tensor([1 + 2j, 3 - 4j])])


def test_too_many_non_finite_steps_stop_with_a_checkpoint(tiny_model_dir, tmp_path, train_here):
    out = tmp_path / "run"
    result = train_here(*tiny_args(tiny_model_dir, out, "--max_steps", "10", "--max_consecutive_skips", "2",
                                   "--save_steps", "0"), fault=("nan-loss", "all"))
    assert result.returncode == 2
    assert last_line(result) == (
        f"error: 2 optimizer steps in a row had a non-finite loss, gradient or updated weights (up to step 2); skipped updates "
        f"leave the weights as they were, saved in {out / 'checkpoints' / 'step-2'}; lower learning_rate, "
        "set max_grad_norm, or check the reward values")
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert not (out / "final").exists()


REWARD_FAILING_ON_SHORT = """
def picky(prompts, completions, **kwargs):
    if any(len(c) < 4 for c in completions):
        raise ValueError("too short")
    return [1.0 for _ in completions]

def sometimes_nan(prompts, completions, **kwargs):  # NaN is a failure (None = "not applicable")
    return [float("nan") if i == 0 else 0.5 for i, _ in enumerate(completions)]
"""


@pytest.mark.parametrize("mode", ["zero", "skip_batch"])
def test_reward_error_modes(tiny_model_dir, tmp_path, mode, train_here):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARD_FAILING_ON_SHORT)
    out = tmp_path / "run"
    result = train_here(*tiny_args(tiny_model_dir, out, "--reward_funcs", f"{rewards}:sometimes_nan",
                                   "--reward_error", mode))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = comparable_rows(out)
    assert [row["reward_errors"] for row in rows] == [1, 1]  # one failed sample per step (4 sequences)
    if mode == "zero":
        assert all(row["reward_mean"] == pytest.approx(0.5 * 3 / 4) for row in rows)
        assert all(row["policy_loss"] is not None for row in rows)
    else:
        assert all(row.get("skipped_batches") == 1 and row["policy_loss"] is None for row in rows)


def test_reward_error_zero_finds_the_failing_samples_of_a_raising_function(tmp_path):
    from reward_models import CombinedReward

    module = tmp_path / "picky_rewards.py"
    module.write_text(REWARD_FAILING_ON_SHORT)
    picky = CombinedReward([f"{module}:picky", f"{module}:sometimes_nan"], on_error="zero")
    output = picky(["p"] * 3, ["long enough", "no", "also long"])
    assert output.failed == [True, True, False]  # sample 0: NaN from sometimes_nan; 1: picky raised
    assert output.components == {"picky": [1.0, 0.0, 1.0], "sometimes_nan": [0.0, 0.5, 0.5]}
    assert output.total == [1.0, 0.5, 1.5]
    with pytest.raises(Exception, match="picky"):  # the default still stops with the culprit
        CombinedReward([f"{module}:picky"])(["p"] * 2, ["long enough", "no"])
