"""Issue 19 items 11 and 14: reward_timeout honours reward_error, a signal abandons a hanging
reward call, and failing samples are found without one call per sample."""

from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import FIXTURES, tiny_args
from reward_models import CombinedReward
from reward_models.guard import RewardTimeout
from rlhf.errors import RewardError
from rlhf.signals import ScoringInterrupted

SLOW = """
import asyncio, time

def slow(prompts, completions, **kwargs):
    time.sleep(3)
    return [1.0] * len(completions)

async def slow_async(prompts, completions, **kwargs):
    await asyncio.sleep(3)
    return [1.0] * len(completions)

async def raises_its_own_timeout(prompts, completions, **kwargs):
    raise TimeoutError("my own")

def quick(prompts, completions, **kwargs):
    return [0.5] * len(completions)
"""


@pytest.fixture
def slow_rewards(tmp_path):
    module = tmp_path / "slow_rewards.py"
    module.write_text(SLOW)
    return module


@pytest.mark.parametrize("function", ["slow", "slow_async"])
def test_a_call_past_reward_timeout_stops_with_one_line(slow_rewards, function):
    """Before: no reward_timeout; a hanging function held the run forever."""
    reward = CombinedReward([f"{slow_rewards}:{function}", f"{slow_rewards}:quick"], timeout=0.2)
    started = time.monotonic()
    with pytest.raises(RewardTimeout, match=f"reward '.*{function}' did not return within reward_timeout=0.2 s"):
        reward(["p"] * 4, ["a", "b", "c", "d"])
    assert time.monotonic() - started < 2.5  # the 3 s call was not waited for


def test_a_function_raising_timeouterror_itself_is_not_called_a_timeout(slow_rewards):
    with pytest.raises(RewardError, match="raised TimeoutError: my own") as caught:
        CombinedReward([f"{slow_rewards}:raises_its_own_timeout"], timeout=5)(["p"], ["a"])
    assert not isinstance(caught.value, RewardTimeout)


@pytest.mark.parametrize("mode", ["zero", "skip_batch"])
def test_a_timeout_fails_the_batch_once_without_a_per_sample_search(tmp_path, mode):
    calls = []

    def hangs(prompts, completions, **kwargs):
        calls.append(len(completions))
        time.sleep(1.5)
        return [1.0] * len(completions)

    reward = CombinedReward([hangs, "length"], on_error=mode, timeout=0.2)
    started = time.monotonic()
    output = reward(["p"] * 8, ["some text"] * 8)
    assert output.failed == [True] * 8 and output.components["hangs"] == [0.0] * 8
    assert calls == [8]  # before a search it would have been 1 + 8 calls of up to the timeout each
    assert time.monotonic() - started < 1.4


@pytest.mark.parametrize("timeout", [None, 60.0])  # on this thread, and in a worker thread
def test_a_signal_abandons_the_running_call_in_every_mode(slow_rewards, timeout):
    """Before: the first Ctrl-C waited for the reward function, which might never return."""
    import os
    import signal

    from rlhf.signals import StopOnSignal

    for mode in ("raise", "zero"):
        reward = CombinedReward([f"{slow_rewards}:slow"], on_error=mode, timeout=timeout)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with StopOnSignal() as stop, pytest.raises(ScoringInterrupted):
            with stop.abandonable():
                reward(["p"] * 2, ["a", "b"])
        assert stop.received == signal.SIGINT
        assert time.monotonic() - started < 2.5


def test_without_a_timeout_rewards_run_on_the_main_thread():
    """signal.alarm, which math checkers use for their own timeouts, works only there."""
    seen = []
    CombinedReward([lambda prompts, completions, **kw: seen.append(threading.current_thread()) or [1.0]])(["p"], ["a"])
    assert seen == [threading.main_thread()]


def picky_counter():
    calls = []

    def picky(prompts, completions, **kwargs):
        calls.append(len(completions))
        if "bad" in completions:
            raise ValueError("bad sample")
        return [1.0] * len(completions)

    return picky, calls


def test_the_failing_sample_is_found_by_bisection():
    """Before: after the batch failed, every sample was re-scored alone (1 + 16 calls)."""
    completions = ["fine"] * 16
    completions[11] = "bad"
    picky, calls = picky_counter()
    with pytest.raises(RewardError, match=r"raised ValueError: bad sample at .* on sample 11 \(completion 'bad'\)"):
        CombinedReward([picky])(["p"] * 16, completions)
    assert len(calls) <= 1 + 2 * 4, calls

    picky, calls = picky_counter()
    output = CombinedReward([picky], on_error="zero")(["p"] * 16, completions)
    assert output.failed == [i == 11 for i in range(16)]
    assert output.components["picky"] == [0.0 if i == 11 else 1.0 for i in range(16)]
    assert len(calls) <= 1 + 2 * 4, calls


def test_an_unreachable_remote_reward_fails_the_batch_with_one_request(monkeypatch):
    """Before: 8 samples against a dead server were re-sent one by one (9 requests, each with its
    retries: 31.6 s)."""
    from conftest import free_port
    from reward_models.remote import RemoteReward

    port = free_port()
    attempts = []
    original = RemoteReward._attempt

    def counted(self, body):
        attempts.append(json.loads(body)["completions"])
        return original(self, body)

    monkeypatch.setattr(RemoteReward, "_attempt", counted)
    reward = CombinedReward([f"http://127.0.0.1:{port}/score"], on_error="zero",
                            kwargs={"127.0.0.1:" + str(port): {"max_retries": 1, "backoff": 0.01, "timeout": 2}})
    output = reward(["p"] * 8, [f"c{i}" for i in range(8)])
    assert output.failed == [True] * 8
    assert len(attempts) == 2 and all(len(batch) == 8 for batch in attempts)  # one request, one retry


def test_reward_timeout_skips_the_batch_in_a_run(tiny_model_dir, tmp_path, run_here):
    out = tmp_path / "run"
    env = {"RLHF_TEST_HANG_AT_STEP": "2", "RLHF_TEST_HANG_SECONDS": "3"}
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "3", "--reward_funcs",
                                                  f"{FIXTURES / 'hanging_rewards.py'}:char_diversity",
                                                  "--reward_timeout", "0.5", "--reward_error", "skip_batch"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("skipped_batches") for row in rows] == [None, 1, None]
    assert [row["reward_errors"] for row in rows] == [0, 4, 0]


def test_a_function_failing_on_everything_blames_no_sample():
    def always(prompts, completions, **kwargs):
        raise ValueError("broken")

    with pytest.raises(RewardError, match="on every part of the batch") as caught:
        CombinedReward([always])(["p"] * 8, ["c"] * 8)
    assert "on sample" not in str(caught.value)
