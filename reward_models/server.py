"""Serve any reward spec over HTTP so rewards can run in another process or on another machine.

POST {"prompts": [...], "completions": [...], <columns>} -> {"rewards": [...], "components": {...}}
Bad requests get HTTP 400 with {"error": "..."}; the client (RemoteReward) does not retry those.
"""

from __future__ import annotations

import json
import math
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reward_models.loader import CombinedReward
from rlhf.errors import RewardError


def make_server(reward: CombinedReward, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    class RewardHandler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            try:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict) or not isinstance(request.get("completions"), list):
                    raise ValueError('body must be {"prompts": [...], "completions": [...], ...}')
                completions = request.pop("completions")
                prompts = request.pop("prompts", [""] * len(completions))
                output = reward(prompts, completions, **request)
            except (ValueError, RewardError) as exc:
                self._reply(400, {"error": str(exc)})
                return
            components = {name: [None if math.isnan(v) else v for v in values]  # NaN is not JSON: None
                          for name, values in output.components.items()}
            self._reply(200, {"rewards": output.per_sample(completions), "components": components})

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: one line per request would flood a training log."""

    # Rewards are plain Python; a lock-free threaded server is fine for CPU-bound scorers that
    # release the GIL (torch, regex) and keeps a slow request from blocking health checks.
    return ThreadingHTTPServer((host, port), RewardHandler)
