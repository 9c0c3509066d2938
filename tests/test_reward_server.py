"""Issue 19 item 13: the reward server against hostile clients, on a real socket (bounded probes)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from reward_models import CombinedReward
from reward_models.remote import RemoteReward
from rlhf.errors import RewardError


def words(prompts, completions, max_words=3, **kwargs):
    return [float(min(len(c.split()), max_words)) for c in completions]


def broken(prompts, completions, **kwargs):
    raise ZeroDivisionError("oops")


@pytest.fixture
def serve():
    from reward_models.server import make_server

    servers = []

    def start(reward, **options):
        server = make_server(reward, "127.0.0.1", 0, **options)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def post(url, body: bytes, headers=None):
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def raw(port, data: bytes, wait=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(4096):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_token_is_required_when_set_and_sent_by_the_client(serve, monkeypatch):
    url, _ = serve(CombinedReward([words]), token="s3cret")
    body = json.dumps({"prompts": ["p"], "completions": ["a b"]}).encode()
    assert post(url, body)[0] == 401
    assert post(url, body, {"Authorization": "Bearer wrong"})[0] == 401
    assert RemoteReward(url, token="s3cret", max_retries=0)(["p"], ["a b"]) == [2.0]
    monkeypatch.setenv("RLHF_REWARD_TOKEN", "s3cret")
    assert RemoteReward(url, max_retries=0)(["p"], ["a b c d"]) == [3.0]
    with pytest.raises(RewardError, match="HTTP 401"):
        RemoteReward(url, token="nope", max_retries=0)(["p"], ["a"])


def test_bad_lengths_and_big_bodies_get_json_errors_at_once(serve):
    """Before: Content-Length -1 hung the handler; a 10 MB body was accepted."""
    url, server = serve(CombinedReward([words]), max_body_bytes=1000)
    port = server.server_port
    start = time.monotonic()
    answer = raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    assert b" 400 " in answer.split(b"\r\n")[0] and b"bad Content-Length" in answer
    assert time.monotonic() - start < 3
    assert b" 411 " in raw(port, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n").split(b"\r\n")[0]
    status, body = post(url, json.dumps({"completions": ["x" * 2000]}).encode())
    assert status == 413 and "max_body_bytes" in body["error"]
    assert post(url, b"not json")[0] == 400


def test_the_body_cannot_override_the_servers_reward_kwargs(serve):
    """Before: "max_words": 1000 in the body replaced the server's setting."""
    url, _ = serve(CombinedReward([words], kwargs={"words": {"max_words": 2}}))
    body = {"prompts": ["p"], "completions": ["a b c d e"], "max_words": 1000}
    assert post(url, json.dumps(body).encode()) == (200, {"rewards": [2.0], "components": {"words": [2.0]}})
    body["max_words"] = [1000]  # a same-named per-sample column: the configured value still wins
    assert post(url, json.dumps(body).encode())[1]["rewards"] == [2.0]


def test_a_failing_reward_is_a_json_answer_and_idle_clients_are_dropped(serve):
    url, server = serve(CombinedReward([broken]), timeout=0.5, workers=2)
    status, body = post(url, json.dumps({"prompts": ["p"], "completions": ["a"]}).encode())
    assert status == 400 and "ZeroDivisionError" in body["error"]
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=5) as idle:
        assert idle.recv(10) == b""  # the server closes a silent connection after its timeout
    assert time.monotonic() - start < 3
    assert server.pool._max_workers == 2


def test_connections_beyond_the_workers_and_queue_get_503_at_once(serve):
    """Before: connections beyond the pool queued without a bound (each one a pending entry)."""
    url, server = serve(CombinedReward([words]), timeout=3, workers=1, max_queued=1)
    port = server.server_port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]  # one runs, one waits
    try:
        time.sleep(0.2)
        start = time.monotonic()
        answer = raw(port, b"", wait=5)
        assert answer.startswith(b"HTTP/1.1 503") and b"server busy" in answer
        assert time.monotonic() - start < 2
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10  # the freed slots serve again
    while time.monotonic() < deadline:
        try:
            status, body = post(url, json.dumps({"prompts": ["p"], "completions": ["a b"]}).encode())
        except (urllib.error.URLError, ConnectionError):
            status = None
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200 and body["rewards"] == [2.0]


def slow_words(prompts, completions, **kwargs):
    time.sleep(0.5)
    return words(prompts, completions)


def test_every_request_beyond_capacity_gets_its_503_even_with_a_large_body(serve):
    """Review: the 503 was written and the socket closed with the request unread, so the kernel
    reset the connection and clients saw a broken pipe instead of the answer."""
    url, _ = serve(CombinedReward([slow_words]), workers=1, max_queued=1)
    body = json.dumps({"prompts": ["p"], "completions": ["a b " * 250_000]}).encode()  # ~1 MB
    statuses = []

    def one():
        try:
            statuses.append(post(url, body)[0])
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            statuses.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses, key=str).count(200) >= 2 and set(statuses) <= {200, 503}, statuses
