"""Service-protection limits, test knobs and counters.

The limiter models Dataverse's three service protection limits per user (reference §6): the
request count over a sliding window (each ``$batch`` operation counts), the combined execution
time over a sliding window (the server time each request consumed, measured), and the
concurrency cap.  Knobs inject faults for client tests — added latency, a share of 5xx answers,
forced 429 bursts — and simulate server cost: ``record_cost_ms`` per record written and
``request_cost_ms`` per API request, spent outside any lock so parallel requests overlap as on a
real tenant.  Webhook knobs delay deliveries, fail the next N of them and set the retry policy.
Counters let tests and benchmarks assert how many calls a client really made, how much server
time they took and how many ran at once, and how many webhook deliveries succeeded or failed.
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


class _Window:
    """Amounts stamped in time, with their running total (pruning is amortised O(1))."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def used(self, now: float, seconds: float) -> float:
        """The total of the last ``seconds``, dropping what fell out of the window."""
        horizon = now - seconds
        while self.events and self.events[0][0] <= horizon:
            self.total -= self.events.popleft()[1]
        if not self.events:
            self.total = 0.0  # no float drift left behind
        return self.total

    def add(self, now: float, amount: float) -> None:
        self.events.append((now, amount))
        self.total += amount

    def retry_after(self, used: float, room: float, now: float, seconds: float) -> int:
        """Seconds until enough of the oldest amounts leave the window to bring ``used`` down to
        ``room``."""
        for stamp, amount in self.events:
            used -= amount
            if used <= room:
                return math.ceil(stamp + seconds - now)
        return math.ceil(seconds)


class ServiceProtection:
    """Per application user: sliding-window request counting, sliding-window execution time and
    a concurrency cap."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._requests: dict[str, _Window] = {}
        self._inflight: Counter[str] = Counter()
        self._spent: dict[str, _Window] = {}

    def charge(self, user_id: str, operations: int) -> int:
        """Count ``operations`` against the window or raise 429; returns the remaining budget."""
        now = time.monotonic()
        window = self.limits.window_seconds
        with self._lock:
            events = self._requests.setdefault(user_id, _Window())
            used = int(events.used(now, window))
            limit = self.limits.requests
            if used and used + operations > limit:
                raise _throttled(
                    errors.REQUEST_LIMIT,
                    f"Number of requests exceeded the limit of {limit} over time window of "
                    f"{int(window)} seconds.",
                    events.retry_after(used, limit - operations, now, window),
                )
            events.add(now, operations)
            return max(0, limit - used - operations)

    def check_execution_time(self, user_id: str) -> float:
        """Raise 429 once the user's server time in the window exceeds the budget; else return
        the milliseconds left.  Like Dataverse, a request is only refused after the budget is
        exceeded: the one that crosses it runs to completion."""
        now = time.monotonic()
        window, budget = self.limits.execution_window_seconds, self.limits.execution_time_ms
        with self._lock:
            spent = self._spent.setdefault(user_id, _Window())
            used = spent.used(now, window)
            if used > budget:
                raise _throttled(
                    errors.EXECUTION_TIME_LIMIT,
                    f"Combined execution time of incoming requests exceeded limit of {budget:,} "
                    f"milliseconds over time window of {int(window)} seconds. Decrease number of "
                    "concurrent requests or reduce the duration of requests and try again later.",
                    spent.retry_after(used, budget, now, window),
                )
            return budget - used

    def spend(self, user_id: str, milliseconds: float) -> None:
        """Add a finished request's server time to the user's execution-time window."""
        with self._lock:
            self._spent.setdefault(user_id, _Window()).add(time.monotonic(), milliseconds)

    def execution_time_used(self) -> dict[str, float]:
        """Milliseconds of server time in each user's current window."""
        now = time.monotonic()
        window = self.limits.execution_window_seconds
        with self._lock:
            return {user: round(spent.used(now, window), 1) for user, spent in self._spent.items()}

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
            self._requests.clear()
            self._spent.clear()


@dataclass
class Knobs:
    """Fault injection, off by default.  Settable at runtime via ``POST /_sandbox/knobs``."""

    latency_ms: float = 0.0
    record_cost_ms: float = 0.0
    request_cost_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    throttle_next: int = 0
    throttle_retry_after: int = 2
    random_seed: int = 1234
    webhook_delay_ms: float = 0.0
    """Extra wait before a notification's first delivery attempt."""
    webhook_fail_next: int = 0
    """Fail the next N delivery attempts without sending them."""
    webhook_fail_status: int = 503
    """What those failures look like: an HTTP status, or 0 for a connection error."""
    webhook_max_attempts: int = 10
    """Attempts per notification before it is marked failed."""
    webhook_backoff_ms: float = 1000.0
    """Wait after the first failed attempt; it doubles with each further one (capped)."""
    _random: random.Random = field(default_factory=lambda: random.Random(1234))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    _FLOATS = (
        "latency_ms",
        "record_cost_ms",
        "request_cost_ms",
        "error_rate",
        "webhook_delay_ms",
        "webhook_backoff_ms",
    )
    _INTS = (
        "error_status",
        "throttle_next",
        "throttle_retry_after",
        "webhook_fail_next",
        "webhook_fail_status",
        "webhook_max_attempts",
    )

    def update(self, values: dict[str, Any]) -> None:
        with self._lock:
            for name in self._FLOATS:
                if name in values:
                    setattr(self, name, float(values[name]))
            for name in self._INTS:
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

    def take_webhook_failure(self) -> int | None:
        """Consume one forced webhook failure: the status to simulate (0: connection error)."""
        with self._lock:
            if self.webhook_fail_next <= 0:
                return None
            self.webhook_fail_next -= 1
            return self.webhook_fail_status

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
            "record_cost_ms": self.record_cost_ms,
            "request_cost_ms": self.request_cost_ms,
            "error_rate": self.error_rate,
            "error_status": self.error_status,
            "throttle_next": self.throttle_next,
            "throttle_retry_after": self.throttle_retry_after,
            "random_seed": self.random_seed,
            "webhook_delay_ms": self.webhook_delay_ms,
            "webhook_fail_next": self.webhook_fail_next,
            "webhook_fail_status": self.webhook_fail_status,
            "webhook_max_attempts": self.webhook_max_attempts,
            "webhook_backoff_ms": self.webhook_backoff_ms,
        }


class Counters:
    """What clients did: HTTP requests, operations (batch/bulk items one by one), statuses,
    server time, and how many requests the server worked on at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.cost_in_flight = 0
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
            self.throttled_codes: Counter[str] = Counter()
            self.execution_ms = 0.0
            self.max_in_flight = self.in_flight
            self.max_parallel_cost = self.cost_in_flight
            self.webhook_delivered = 0
            self.webhook_failed_attempts = 0
            self.webhook_abandoned = 0

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

    def refused(self, code: str) -> None:
        """A 429 answer, by error code (request count, execution time, concurrency)."""
        with self._lock:
            self.throttled_codes[code] += 1

    @contextmanager
    def executing(self) -> Iterator[None]:
        """One API request inside the dispatcher."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def server_time(self, milliseconds: float) -> None:
        """A finished API request's measured server time."""
        with self._lock:
            self.execution_ms += milliseconds

    @contextmanager
    def costing(self) -> Iterator[None]:
        """One request spending simulated server time (the cost knobs)."""
        with self._lock:
            self.cost_in_flight += 1
            self.max_parallel_cost = max(self.max_parallel_cost, self.cost_in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.cost_in_flight -= 1

    def webhook(self, *, delivered: bool, abandoned: bool = False) -> None:
        """One webhook delivery attempt: delivered, or failed (and perhaps the last one allowed)."""
        with self._lock:
            if delivered:
                self.webhook_delivered += 1
            else:
                self.webhook_failed_attempts += 1
                self.webhook_abandoned += int(abandoned)

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
                "throttled_codes": dict(self.throttled_codes),
                "execution_ms": round(self.execution_ms, 1),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "max_parallel_cost": self.max_parallel_cost,
                "webhook_delivered": self.webhook_delivered,
                "webhook_failed_attempts": self.webhook_failed_attempts,
                "webhook_abandoned": self.webhook_abandoned,
            }
