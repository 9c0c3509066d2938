"""Graceful stop: the first SIGINT/SIGTERM lets the current step finish and a checkpoint be
written; a second one stops at once."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ContextManager
from pathlib import Path
from types import FrameType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


def stop_process(process: Any, grace_seconds: float = 5) -> None:
    """End a child ``multiprocessing`` process because its parent is stopping (Ctrl-C, SIGTERM):
    SIGTERM first (a trainer finishes its step on it), SIGKILL after ``grace_seconds``."""
    process.terminate()
    process.join(timeout=grace_seconds)
    if process.is_alive():
        process.kill()
        process.join()


class TrainingInterrupted(Exception):
    """Raised by the trainer after it saved a checkpoint because of a signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path, finished: bool = False, scoring: bool = False):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if finished:  # the signal came during the final save, which was completed first
            message = f"{name} received while saving the final adapter; the run is complete: {checkpoint}"
        else:
            during = (f" (step {step + 1} was abandoned while its reward functions ran; a resume runs it again)"
                      if scoring else "")
            message = (f"stopped by {name} after step {step}{during}; checkpoint {checkpoint}; "
                       "continue with --resume_from_checkpoint latest (same output_dir)")
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM


class ScoringInterrupted(BaseException):
    """A signal arrived while reward functions ran (they may hang): scoring was abandoned.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` around a reward
    call (reward_error: zero / skip_batch) mistakes it for a failure of the function."""


def run_abandonable(work: Callable[[], Any], abandonable: Callable[[], ContextManager[Any]],
                    agree: Callable[[float], float]) -> tuple[Any, bool]:
    """``work()`` inside ``abandonable()``: (its result, False), or (None, True) when a signal
    abandoned it on any process. ``agree`` is a max over processes (rlhf.distributed.Reducer.max),
    so all of them stop at the same point: one process on its own would wait forever at the next
    collective."""
    try:
        with abandonable():
            result = work()
        interrupted = 0.0
    except ScoringInterrupted:
        result, interrupted = None, 1.0
    if agree(interrupted):
        return None, True
    return result, False


class StopOnSignal:
    """Context manager; ``received`` holds the first signal number caught (None before).

    Inside ``abandonable()`` (the trainer wraps the reward calls in it) the first signal raises
    ScoringInterrupted on the main thread, wherever it is: a hanging reward function is left
    as a Ctrl-C leaves any Python code. Elsewhere it only sets ``received``."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._abandonable: str | None = None  # what a signal abandons now, for the message

    @contextmanager
    def abandonable(self, what: str = "this step's reward functions (a resume runs the step again)") -> Iterator[None]:
        self._abandonable = what
        try:
            yield
        finally:
            self._abandonable = None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._previous = {signum: signal.signal(signum, self._handle) for signum in HANDLED}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # second signal: give up on the clean stop
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            sys.exit(128 + signum)
        self.received = signum
        if self._abandonable:
            what, self._abandonable = self._abandonable, None
            print(f"\n{signal.Signals(signum).name} received: abandoning {what} and saving a checkpoint",
                  file=sys.stderr, flush=True)
            raise ScoringInterrupted(signal.Signals(signum).name)
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
