"""Adaptive (AIMD) concurrency limiter.

Dataverse answers too much parallelism with 429s and ever longer Retry-After values, so the
client halves its in-flight limit on each throttle and only creeps back up (+1 slot per N
successes), bounded by the configured maximum.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class AdaptiveLimiter:
    """A semaphore whose size moves: multiplicative decrease, additive increase."""

    def __init__(self, max_limit: int, recovery: int = 20) -> None:
        if max_limit < 1 or recovery < 1:
            raise ValueError("max_limit and recovery must be >= 1")
        self.max_limit = max_limit
        self.recovery = recovery
        self._limit = max_limit
        self._in_flight = 0
        self._successes = 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        return self._limit

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the currently allowed slots for the duration of a request."""
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight < self._limit)
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def on_throttle(self) -> None:
        with self._cond:
            self._limit = max(1, self._limit // 2)
            self._successes = 0

    def on_success(self) -> None:
        with self._cond:
            self._successes += 1
            if self._successes >= self.recovery and self._limit < self.max_limit:
                self._limit += 1
                self._successes = 0
                self._cond.notify_all()
