"""One run per output_dir: an OS lock held for the run's life.

``flock`` locks belong to the open file, so the kernel drops them when the process ends in any
way, kill -9 included: a crashed run never leaves a stale lock behind. Only the main process
locks (the others write nothing there).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import TracebackType

from rlhf.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected against a second one
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".run.lock"


class OutputDirLock:
    """Context manager; a second run on the same dir gets a ConfigError naming the holder."""

    def __init__(self, output_dir: Path, enabled: bool = True):
        self.path = output_dir / LOCK_FILE
        self.enabled = enabled and fcntl is not None
        self._fd: int | None = None

    def __enter__(self) -> OutputDirLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"output_dir {self.path.parent} is in use by a running run ({holder}); wait for it "
                              "to end or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
