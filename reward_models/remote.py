"""Rewards computed by another process or machine over HTTP (JSON in, JSON out).

Request:  POST {"prompts": [...], "completions": [...], "completion_ids": [...], <other dataset columns>: [...]}
Response: {"rewards": [float | null, ...]}   (one per completion; null = not applicable)
``scripts/serve_reward.py`` serves any reward spec this way.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from rlhf.errors import RewardError


class RemoteReward:
    """Calls a reward endpoint with a timeout and bounded retries with exponential backoff."""

    def __init__(self, url: str, timeout: float = 30.0, max_retries: int = 3, backoff: float = 0.5):
        self.url = url
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.__name__ = url

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[Any]:
        # Per-sample columns only: trainer extras (trainer_state, log_metric, ...) stay here.
        body = json.dumps({"prompts": list(prompts), "completions": list(completions),
                           **{k: list(v) for k, v in columns.items() if isinstance(v, (list, tuple))}},
                          default=str).encode()
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:200]
                last_error = f"HTTP {exc.code}: {detail}"
                if exc.code < 500:  # the request itself is wrong; retrying cannot help
                    break
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last_error = str(getattr(exc, "reason", exc))
                continue
            return self._parse(payload)
        raise RewardError(f"remote reward {self.url} failed after {attempt + 1} tries: {last_error}")

    def _parse(self, payload: bytes) -> list[float]:
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            raise RewardError(f"remote reward {self.url} returned malformed JSON: {payload[:80]!r}") from None
        if not isinstance(data, dict) or not isinstance(data.get("rewards"), list):
            raise RewardError(f"remote reward {self.url} must answer {{\"rewards\": [...]}}, got {str(data)[:80]}")
        return data["rewards"]
