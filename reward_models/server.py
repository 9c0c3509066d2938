"""Serve any reward spec over HTTP so rewards can run in another process or on another machine.

POST {"prompts": [...], "completions": [...], <columns>} -> {"rewards": [...], "components": {...}}

Hardened for use beyond localhost:
- optional shared-secret token (``--token`` or RLHF_REWARD_TOKEN): requests must send
  ``Authorization: Bearer <token>``, compared in constant time (401 otherwise);
- ``max_body_bytes`` (413 above it; a missing, negative or non-numeric Content-Length is 411/400,
  never a read that hangs); a socket timeout per connection (slow or idle clients are dropped);
- a bounded worker pool: at most ``workers`` requests run at once and ``max_queued`` more wait;
  beyond that a connection gets 503 (the client retries with backoff) instead of a thread or a
  queue entry;
- the request's columns are per-sample data only: a scalar in the body (say "max_words": 1000)
  does not reach the functions, and the server's reward_kwargs win over same-named columns;
- every failure is answered with JSON {"error": ...} and a 4xx/5xx status.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import queue
import socket
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from reward_models.loader import CombinedReward
from rlhf.errors import RewardError

TOKEN_ENV = "RLHF_REWARD_TOKEN"


class _PooledHTTPServer(socketserver.ThreadingMixIn, HTTPServer):
    """HTTPServer whose requests run on a fixed pool of threads (ThreadingMixIn would start one
    thread per connection, without bound)."""

    daemon_threads = True
    max_body_bytes = 16 * 1024 * 1024  # how much of a refused request is read (make_server sets it)

    def __init__(self, address: tuple[str, int], handler: type, workers: int, max_queued: int):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")
        self.slots = threading.BoundedSemaphore(workers + max_queued)  # running + waiting connections
        # One thread answers the refused connections (bounded too: beyond it they are just closed).
        self.refusals: queue.Queue = queue.Queue(maxsize=max(16, max_queued))
        threading.Thread(target=self._answer_refused, name="reward-busy", daemon=True).start()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                self.refusals.put_nowait(request)
            except queue.Full:
                self.shutdown_request(request)
            return
        try:
            future = self.pool.submit(self.process_request_thread, request, client_address)
        except RuntimeError:  # the pool is shut down: the server is closing
            self.slots.release()
            self.shutdown_request(request)
            return
        future.add_done_callback(lambda _: self.slots.release())

    def _answer_refused(self) -> None:
        """503 + Retry-After, then read what the client sends until it closes (at most a second and
        max_body_bytes): closing with its request unread would reset the connection, and the
        client would see a broken pipe instead of the answer."""
        body = json.dumps({"error": "server busy: every worker and queue slot is taken; try again"}).encode()
        answer = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        while True:
            request = self.refusals.get()
            try:
                request.settimeout(1.0)
                request.sendall(answer)
                request.shutdown(socket.SHUT_WR)
                deadline, read = time.monotonic() + 1.0, 0
                while time.monotonic() < deadline and read < self.max_body_bytes:
                    chunk = request.recv(65536)
                    if not chunk:
                        break
                    read += len(chunk)
            except OSError:
                pass
            finally:
                request.close()

class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def make_server(reward: CombinedReward, host: str = "127.0.0.1", port: int = 8000, *, token: str | None = None,
                max_body_bytes: int = 16 * 1024 * 1024, timeout: float = 30.0, workers: int = 8,
                max_queued: int = 64) -> HTTPServer:
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None

    class RewardHandler(BaseHTTPRequestHandler):
        def setup(self) -> None:
            self.timeout = timeout  # StreamRequestHandler applies it to the socket: idle clients are dropped
            super().setup()

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            try:
                self._check_token()
                request = self._read_json()
                if not isinstance(request, dict) or not isinstance(request.get("completions"), list):
                    raise _HTTPError(400, 'body must be {"prompts": [...], "completions": [...], ...}')
                completions = request.pop("completions")
                prompts = request.pop("prompts", [""] * len(completions))
                if not isinstance(prompts, list) or len(prompts) != len(completions):
                    raise _HTTPError(400, "prompts must be a list as long as completions")
                columns = {k: v for k, v in request.items() if isinstance(v, list) and len(v) == len(completions)}
                output = reward(prompts, completions, **columns)
            except _HTTPError as exc:
                self._reply(exc.status, {"error": str(exc)})
                return
            except (ValueError, RewardError) as exc:
                self._reply(400, {"error": str(exc)})
                return
            except Exception as exc:  # a bug in a reward function: the client gets a reason, not a dropped line
                self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
                return
            components = {name: [None if math.isnan(v) else v for v in values]  # NaN is not JSON: None
                          for name, values in output.components.items()}
            self._reply(200, {"rewards": output.per_sample(completions), "components": components})

        def do_GET(self) -> None:  # noqa: N802
            self._reply(405, {"error": "POST a JSON body"})

        def _check_token(self) -> None:
            if token is None:
                return
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise _HTTPError(401, "missing or wrong token (Authorization: Bearer ...)")

        def _read_json(self) -> Any:
            length_header = self.headers.get("Content-Length")
            if length_header is None:
                raise _HTTPError(411, "Content-Length required")
            try:
                length = int(length_header)
            except ValueError:
                raise _HTTPError(400, f"bad Content-Length {length_header!r}") from None
            if length < 0:
                raise _HTTPError(400, f"bad Content-Length {length}")
            if length > max_body_bytes:
                raise _HTTPError(413, f"body of {length} bytes is over the server's max_body_bytes {max_body_bytes}")
            body = self.rfile.read(length)
            if len(body) != length:
                raise _HTTPError(400, "body shorter than its Content-Length")
            try:
                return json.loads(body or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _HTTPError(400, f"body is not JSON ({exc})") from None

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass  # the client went away

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: one line per request would flood a training log."""

    server = _PooledHTTPServer((host, port), RewardHandler, workers, max_queued)
    server.max_body_bytes = max_body_bytes
    return server
