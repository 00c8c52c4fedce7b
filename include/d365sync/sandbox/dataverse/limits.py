"""Service-protection limits, test knobs and counters.

The limiter models Dataverse's per-user sliding window (each ``$batch`` operation counts) and
its concurrency cap (reference §6).  Knobs inject faults for client tests: added latency, a
share of 5xx answers and forced 429 bursts.  Counters let tests and benchmarks assert how many
calls a client really made.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.config import Limits
from d365sync.sandbox.dataverse.errors import DataverseError


def _throttled(code: str, message: str, retry_after: int) -> DataverseError:
    return DataverseError(429, code, message, {"Retry-After": str(max(1, retry_after))})


class ServiceProtection:
    """Sliding-window request counting and a concurrency cap per application user."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._window: dict[str, deque[tuple[float, int]]] = {}
        self._inflight: Counter[str] = Counter()

    def _prune(self, events: deque[tuple[float, int]], now: float) -> int:
        horizon = now - self.limits.window_seconds
        while events and events[0][0] <= horizon:
            events.popleft()
        return sum(n for _, n in events)

    def charge(self, user_id: str, operations: int) -> int:
        """Count ``operations`` against the window or raise 429; returns the remaining budget."""
        now = time.monotonic()
        with self._lock:
            events = self._window.setdefault(user_id, deque())
            used = self._prune(events, now)
            limit = self.limits.requests
            if used and used + operations > limit:
                raise _throttled(
                    errors.REQUEST_LIMIT,
                    f"Number of requests exceeded the limit of {limit} over time window of "
                    f"{int(self.limits.window_seconds)} seconds.",
                    self._retry_after(events, used, operations, now),
                )
            events.append((now, operations))
            return max(0, limit - used - operations)

    def _retry_after(self, events: deque[tuple[float, int]], used: int, wanted: int, now: float) -> int:
        """Seconds until enough old requests leave the window for ``wanted`` more."""
        for stamp, count in events:
            used -= count
            if used + wanted <= self.limits.requests:
                return math.ceil(stamp + self.limits.window_seconds - now)
        return math.ceil(self.limits.window_seconds)

    @contextmanager
    def concurrent(self, user_id: str) -> Iterator[None]:
        """Hold one of the user's concurrency slots for the duration of a request."""
        with self._lock:
            if self._inflight[user_id] >= self.limits.concurrency:
                raise _throttled(
                    errors.CONCURRENCY_LIMIT,
                    f"Number of concurrent requests exceeded the limit of {self.limits.concurrency}.",
                    1,
                )
            self._inflight[user_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight[user_id] -= 1

    def reset(self) -> None:
        with self._lock:
            self._window.clear()


@dataclass
class Knobs:
    """Fault injection, off by default.  Settable at runtime via ``POST /_sandbox/knobs``."""

    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    throttle_next: int = 0
    throttle_retry_after: int = 2
    random_seed: int = 1234
    _random: random.Random = field(default_factory=lambda: random.Random(1234))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, values: dict[str, Any]) -> None:
        with self._lock:
            for name in ("latency_ms", "error_rate"):
                if name in values:
                    setattr(self, name, float(values[name]))
            for name in ("error_status", "throttle_next", "throttle_retry_after"):
                if name in values:
                    setattr(self, name, int(values[name]))
            if "random_seed" in values:
                self.random_seed = int(values["random_seed"])
                self._random = random.Random(self.random_seed)

    def take_forced_throttle(self) -> DataverseError | None:
        """Consume one forced 429 if a burst is pending."""
        with self._lock:
            if self.throttle_next <= 0:
                return None
            self.throttle_next -= 1
        return _throttled(
            errors.REQUEST_LIMIT,
            "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
            self.throttle_retry_after,
        )

    def take_injected_error(self) -> DataverseError | None:
        """Roll the dice for an injected 5xx."""
        with self._lock:
            if self.error_rate <= 0 or self._random.random() >= self.error_rate:
                return None
        return DataverseError(
            self.error_status,
            errors.SERVICE_UNAVAILABLE,
            "The service is temporarily unavailable (injected).",
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "error_rate": self.error_rate,
            "error_status": self.error_status,
            "throttle_next": self.throttle_next,
            "throttle_retry_after": self.throttle_retry_after,
            "random_seed": self.random_seed,
        }


class Counters:
    """What clients did: HTTP requests, operations (batch/bulk items one by one), statuses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.operations = 0
            self.throttled = 0
            self.auth_failures = 0
            self.statuses: Counter[str] = Counter()
            self.routes: Counter[str] = Counter()
            self.operation_routes: Counter[str] = Counter()
            self.operation_statuses: Counter[str] = Counter()
            self.token_requests = 0
            self.token_failures = 0

    def http(self, route: str, status: int) -> None:
        with self._lock:
            self.requests += 1
            self.routes[route] += 1
            self.statuses[str(status)] += 1
            if status == 429:
                self.throttled += 1
            if status == 401:
                self.auth_failures += 1

    def operation(self, route: str, status: int, count: int = 1) -> None:
        with self._lock:
            self.operations += count
            self.operation_routes[route] += count
            self.operation_statuses[str(status)] += count

    def token(self, ok: bool) -> None:
        with self._lock:
            self.token_requests += 1
            if not ok:
                self.token_failures += 1

    def snapshot(self, tokens_issued: int) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "operations": self.operations,
                "throttled": self.throttled,
                "auth_failures": self.auth_failures,
                "statuses": dict(self.statuses),
                "routes": dict(self.routes),
                "operation_routes": dict(self.operation_routes),
                "operation_statuses": dict(self.operation_statuses),
                "token_requests": self.token_requests,
                "token_failures": self.token_failures,
                "tokens_issued": self.token_requests - self.token_failures,
                "tokens_issued_total": tokens_issued,
            }
