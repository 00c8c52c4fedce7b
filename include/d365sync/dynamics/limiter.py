"""Adaptive (AIMD) concurrency limiter.

Dataverse answers too much parallelism with 429s and ever longer Retry-After values, so the
client halves its in-flight limit on each throttle and only creeps back up (+1 slot per N
successes), bounded by the configured maximum. Service protection is per user, so a 429's
Retry-After pauses every thread of the client, not just the one that was throttled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class AdaptiveLimiter:
    """A semaphore whose size moves: multiplicative decrease, additive increase."""

    def __init__(
        self,
        max_limit: int,
        recovery: int = 20,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_limit < 1 or recovery < 1:
            raise ValueError("max_limit and recovery must be >= 1")
        self.max_limit = max_limit
        self.recovery = recovery
        self._sleep = sleep
        self._clock = clock
        self._resume_at = 0.0
        self._limit = max_limit
        self._in_flight = 0
        self._successes = 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        return self._limit

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Wait out any throttle pause, then hold one of the allowed slots for a request."""
        delay = self._resume_at - self._clock()
        if delay > 0:
            self._sleep(delay)
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight < self._limit)
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def on_throttle(self, pause: float = 0.0) -> None:
        """Halve the limit and hold every new request back for ``pause`` seconds."""
        with self._cond:
            self._limit = max(1, self._limit // 2)
            self._successes = 0
            self._resume_at = max(self._resume_at, self._clock() + pause)

    def on_success(self) -> None:
        with self._cond:
            self._successes += 1
            if self._successes >= self.recovery and self._limit < self.max_limit:
                self._limit += 1
                self._successes = 0
                self._cond.notify_all()
