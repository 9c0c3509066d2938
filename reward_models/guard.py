"""Reward calls with a deadline (``reward_timeout``) that a signal can interrupt.

Python cannot stop a running function from outside, so a guarded call runs in a daemon thread
while the caller waits for it: past the deadline the caller gets ``RewardTimeout``, and on a
signal (``should_stop``) ``ScoringInterrupted``; the abandoned call may keep running in the
background (a daemon thread does not keep the process alive). Unguarded calls (no timeout, no
stop check) run directly, as before.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from rlhf.errors import RewardUnavailable
from rlhf.signals import ScoringInterrupted

# How often a waiting caller looks at the stop flag; a finished call returns at once.
POLL_SECONDS = 0.05


class RewardTimeout(RewardUnavailable):
    """A reward call did not return within reward_timeout."""


def run_guarded(work: Callable[[], Any], label: str, timeout: float | None,
                should_stop: Callable[[], bool] | None) -> Any:
    """``work()``'s result or exception; RewardTimeout after ``timeout`` seconds, or
    ScoringInterrupted as soon as ``should_stop()`` is true while it runs."""
    if timeout is None and should_stop is None:
        return work()
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # SystemExit too: the caller decides what it means
            outcome["error"] = exc

    worker = threading.Thread(target=call, name=f"reward {label}", daemon=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    worker.start()
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        worker.join(POLL_SECONDS if left is None else max(0.0, min(POLL_SECONDS, left)))
        if not worker.is_alive():
            break
        if should_stop is not None and should_stop():
            raise ScoringInterrupted(label)
        if deadline is not None and time.monotonic() >= deadline:
            raise RewardTimeout(f"reward {label!r} did not return within reward_timeout={timeout:g} s (it may "
                                "still be running in the background); make it faster or raise reward_timeout")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
