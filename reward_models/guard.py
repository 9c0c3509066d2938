"""Reward calls with a deadline (``reward_timeout``).

Python cannot stop a running function from outside, so with a timeout a call runs in a daemon
thread while the caller waits for it: past the deadline the caller gets ``RewardTimeout`` and the
abandoned call may keep running in the background. Without a timeout the call runs on the
caller's thread, as before (functions that use ``signal.alarm`` for their own timeouts, as math
checkers do, need the main thread). A signal reaches the waiting main thread either way
(rlhf.signals.StopOnSignal.abandonable).

An abandoned call that is still running when the process ends could be torn down inside native
code (abort, exit code 134); the entry points check ``abandoned_calls_running`` and leave with
os._exit then (rlhf.cli.exit_on_user_error).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from rlhf.errors import RewardUnavailable

class RewardTimeout(RewardUnavailable):
    """A reward call did not return within reward_timeout."""


# One "finished" event per call given up on. Not Thread.is_alive(): a join interrupted by a signal
# handler's exception can leave a running thread reported as stopped (CPython 3.11).
_abandoned: list[threading.Event] = []


def abandoned_calls_running() -> bool:
    """Whether a call given up on (timed out or interrupted) still runs in the background."""
    return not all(finished.is_set() for finished in _abandoned)


def wait_for_abandoned_calls(seconds: float) -> bool:
    """Give abandoned calls up to ``seconds`` to end; whether all did."""
    deadline = time.monotonic() + seconds
    for finished in _abandoned:
        finished.wait(max(0.0, deadline - time.monotonic()))
    return not abandoned_calls_running()


def run_guarded(work: Callable[[], Any], label: str, timeout: float | None, limit: str | None = None) -> Any:
    """``work()``'s result or exception; RewardTimeout after ``timeout`` seconds (None: run it here).
    ``limit`` says in the error which setting ran out (default: reward_timeout=<timeout>)."""
    if timeout is None:
        return work()
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def call() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # SystemExit too: the caller decides what it means
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=call, name=f"reward {label}", daemon=True).start()
    try:
        # A signal handler that raises (rlhf.signals.StopOnSignal.abandonable) interrupts this wait.
        if not finished.wait(timeout):
            raise RewardTimeout(f"reward {label!r} did not return within {limit or f'reward_timeout={timeout:g} s'} "
                                "(it may still be running in the background); make it faster or raise reward_timeout")
    except BaseException:  # the timeout, or a signal (ScoringInterrupted): the call is given up on
        _abandoned.append(finished)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
