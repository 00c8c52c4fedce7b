"""Retry policy: WHAT is retriable is decided in :func:`classify`, HOW LONG to wait in
:class:`RetryPolicy`. Keeping the two apart (as singer_sdk and dlt do) means a new status code
is a one-line change and tests can check the waits without sleeping.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import Enum

import requests

from d365sync.dynamics.config import RetrySettings

RETRIABLE_STATUSES = frozenset({500, 502, 503, 504})
Sleep = Callable[[float], None]


class Verdict(Enum):
    OK = "ok"
    THROTTLED = "throttled"  # 429: wait Retry-After, shrink concurrency
    TRANSIENT = "transient"  # 5xx or connection trouble: back off exponentially
    UNAUTHORIZED = "unauthorized"  # 401: refresh the token once
    FATAL = "fatal"  # any other 4xx: report, never retry


def classify(response: requests.Response | None, error: Exception | None = None) -> Verdict:
    """The single place that decides whether a request outcome is worth retrying."""
    if error is not None:
        return (
            Verdict.TRANSIENT
            if isinstance(error, requests.ConnectionError | requests.Timeout)
            else Verdict.FATAL
        )
    assert response is not None
    if response.status_code == 429:
        return Verdict.THROTTLED
    if response.status_code == 401:
        return Verdict.UNAUTHORIZED
    if response.status_code in RETRIABLE_STATUSES:
        return Verdict.TRANSIENT
    return Verdict.OK if response.status_code < 400 else Verdict.FATAL


def retry_after_seconds(value: str | None) -> float | None:
    """Parse Retry-After (delta-seconds or HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclass
class RetryPolicy:
    """Computes waits and enforces the attempt and total-time budgets."""

    settings: RetrySettings
    sleep: Sleep = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: random.Random | None = None

    def wait_for(self, verdict: Verdict, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1``; a throttle's Retry-After wins (capped)."""
        if verdict is Verdict.THROTTLED and retry_after is not None:
            return min(retry_after, self.settings.retry_after_cap)
        return self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.settings.backoff_cap, self.settings.backoff_base * 2 ** (attempt - 1))
        spread = ceiling * self.settings.jitter
        return ceiling - spread + (self.rng or random).uniform(0, spread)

    def may_retry(self, attempt: int, started: float, wait: float) -> bool:
        """False when another attempt would exceed the attempt count or the time budget."""
        if attempt >= self.settings.max_attempts:
            return False
        return self.clock() - started + wait <= self.settings.max_total_seconds
