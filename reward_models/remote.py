"""Rewards computed by another process or machine over HTTP (JSON in, JSON out).

Request:  POST {"prompts": [...], "completions": [...], "completion_ids": [...], <other dataset columns>: [...]}
Response: {"rewards": [float | null, ...]}   (one per completion; null = not applicable)
``scripts/serve_reward.py`` serves any reward spec this way.

The client is strict about what it accepts: redirects are refused (a 3xx is an error naming the status and
Location, never re-sent as a GET), the answer is capped at ``max_response_bytes``, and ``timeout`` is one total
wall-clock deadline per attempt (connect + headers + body), not a per-read socket timeout. Connection-level
failures (refused, reset, timed out) and HTTP 5xx are retried with exponential backoff; 4xx, 3xx, an oversized
answer and a malformed answer are not.
"""

from __future__ import annotations

import http.client
import json
import os
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from rlhf.errors import RewardError, RewardUnavailable

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_CHUNK = 64 * 1024


class _AttemptError(Exception):
    """One failed attempt: ``message`` for the error line, ``retry`` whether another attempt can help."""

    def __init__(self, message: str, retry: bool, about_the_request: bool = False):
        super().__init__(message)
        self.message = message
        self.retry = retry
        # The server refused this request (4xx): some sample in it may be the cause. Anything else
        # (connection, deadline, 5xx, size, redirect) fails every request alike.
        self.about_the_request = about_the_request


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib hook
        location = headers.get("Location") or newurl
        raise _AttemptError(f"HTTP {code} redirect to {location} refused (redirects are not followed; "
                            "point the reward URL at the final address)", retry=False)


class _Deadline:
    """One attempt's total deadline: records the sockets it opens and shuts them down when time is up, so a
    server that drips bytes (headers or body) cannot hold the attempt past ``timeout``."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.end = time.monotonic() + timeout
        self.sockets: list[socket.socket] = []
        self.fired = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0 or self.fired:
            raise self.expired()
        return left

    def expired(self) -> _AttemptError:
        return _AttemptError(f"no complete answer within timeout={self.timeout:g} s", retry=True)

    def connection_class(self, cls: type) -> type:
        deadline = self

        class Connection(cls):  # type: ignore[misc, valid-type]
            def connect(self):
                super().connect()
                deadline.watch(self.sock)

        return Connection

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.fired:
                self._shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self.sockets:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def settimeout(self) -> None:
        """Per-read socket timeout = what is left of the deadline."""
        left = self.remaining()
        for sock in self.sockets:
            try:
                sock.settimeout(left)
            except OSError:
                pass

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


class _UnderDeadline:
    """Mixed into urllib's HTTP and HTTPS handlers: their connections obey the attempt's deadline."""

    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self._deadline.connection_class(http_class), req, **kwargs)


class _HTTPHandler(_UnderDeadline, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_UnderDeadline, urllib.request.HTTPSHandler):
    pass


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    text = str(reason) or type(reason).__name__
    return text.splitlines()[0] if text.strip() else type(reason).__name__


class RemoteReward:
    """Calls a reward endpoint with a total per-attempt deadline, a response-size cap, no redirects, and
    bounded retries with exponential backoff."""

    def __init__(self, url: str, timeout: float = 30.0, max_retries: int = 3, backoff: float = 0.5,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES, token: str | None = None):
        def number(name: str, value: Any, minimum: float, strict: bool, integer: bool = False) -> Any:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok and integer:
                ok = float(value).is_integer()
            if not ok or (value <= minimum if strict else value < minimum):
                kind = "an integer" if integer else "a number"
                bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
                raise RewardError(f"remote reward {url}: {name} must be {kind} {bound}, got {value!r}")
            return int(value) if integer else float(value)

        self.url = url
        self.timeout = number("timeout", timeout, 0, strict=True)
        self.max_retries = number("max_retries", max_retries, 0, strict=False, integer=True)
        self.backoff = number("backoff", backoff, 0, strict=False)
        self.max_response_bytes = number("max_response_bytes", max_response_bytes, 0, strict=True, integer=True)
        self.__name__ = url
        # The server's shared secret (serve_reward.py --token): reward_kwargs token, else the environment.
        self.token = token if token is not None else os.environ.get("RLHF_REWARD_TOKEN") or None

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[Any]:
        # Per-sample columns only: trainer extras (trainer_state, log_metric, ...) stay here.
        body = json.dumps({"prompts": list(prompts), "completions": list(completions),
                           **{k: list(v) for k, v in columns.items() if isinstance(v, (list, tuple))}},
                          default=str).encode()
        last_error = _AttemptError("", retry=True)
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                payload = self._attempt(body)
            except _AttemptError as exc:
                last_error = exc
                if not exc.retry:
                    break
                continue
            return self._parse(payload)
        # RewardUnavailable: reward_error zero/skip_batch then fail the batch at once instead of
        # re-sending it sample by sample to a server that cannot answer any of them.
        error = RewardError if last_error.about_the_request else RewardUnavailable
        raise error(f"remote reward {self.url} failed after {attempt + 1} tries: {last_error.message}")

    def _attempt(self, body: bytes) -> bytes:
        with _Deadline(self.timeout) as deadline:
            opener = urllib.request.build_opener(_RefuseRedirects, _HTTPHandler(deadline), _HTTPSHandler(deadline))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      **({"Authorization": f"Bearer {self.token}"} if self.token else {})})
            try:
                with opener.open(request, timeout=deadline.remaining()) as response:
                    return self._read(response, deadline)
            except _AttemptError:
                raise
            except urllib.error.HTTPError as exc:
                if 300 <= exc.code < 400:  # a 3xx urllib has no redirect handler for (300, 304, ...)
                    location = exc.headers.get("Location", "none") if exc.headers else "none"
                    raise _AttemptError(f"HTTP {exc.code} redirect to {location} refused (redirects are not "
                                        "followed; point the reward URL at the final address)", retry=False) from None
                detail = self._error_detail(exc, deadline)
                # 4xx: the request itself is wrong, retrying cannot help; 5xx: the server may recover
                raise _AttemptError(f"HTTP {exc.code}: {detail}", retry=exc.code >= 500,
                                    about_the_request=exc.code < 500) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                if deadline.fired or isinstance(getattr(exc, "reason", exc), TimeoutError):
                    raise deadline.expired() from None
                raise _AttemptError(f"connection error: {_reason(exc)}", retry=True) from None

    def _read(self, response: Any, deadline: _Deadline) -> bytes:
        limit = self.max_response_bytes
        too_large = _AttemptError(f"answer larger than max_response_bytes={limit} (raise max_response_bytes "
                                  "in reward_kwargs if this is expected)", retry=False)
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            deadline.settimeout()
            chunk = response.read1(min(_CHUNK, limit + 1 - size))
            if deadline.fired:  # the watchdog cut the socket; what was read is incomplete
                raise deadline.expired()
            if not chunk:
                missing = getattr(response, "length", None)  # http.client's read1 does not raise on a short body
                if missing:
                    raise _AttemptError(f"connection error: answer cut short (IncompleteRead: {size} bytes read, "
                                        f"{missing} more expected)", retry=True)
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise too_large

    @staticmethod
    def _error_detail(exc: urllib.error.HTTPError, deadline: _Deadline) -> str:
        try:
            deadline.settimeout()
            raw = exc.read(200) if exc.fp is not None else b""
        except (_AttemptError, http.client.HTTPException, OSError):
            raw = b""
        text = raw.decode(errors="replace").strip()
        return " ".join(text.split())[:200] or (exc.reason if isinstance(exc.reason, str) else "no detail")

    def _parse(self, payload: bytes) -> list[float]:
        try:
            data = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RewardError(f"remote reward {self.url} returned malformed JSON: {payload[:80]!r}") from None
        if not isinstance(data, dict) or not isinstance(data.get("rewards"), list):
            raise RewardError(f"remote reward {self.url} must answer {{\"rewards\": [...]}}, got {str(data)[:80]}")
        return data["rewards"]
