"""Thread-safe request counters, so tests and task logs can see what a sync really cost."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class Counters:
    """Running totals for one client; ``operations`` counts each $batch part separately."""

    requests: int = 0
    operations: int = 0
    retries: int = 0
    throttles: int = 0
    wait_seconds: float = 0.0
    token_acquisitions: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **increments: float) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
