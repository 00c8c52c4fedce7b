"""What counts as a transient ODBC failure, and how long to wait before trying again.

The two questions are kept apart: :func:`is_transient` classifies an exception by SQLSTATE and
driver message; :class:`RetryPolicy` only knows about attempts and delays. Every unit of work
the client retries is one transaction (a chunk or a page), so a retry never half-applies.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyodbc

# SQLSTATE classes/codes that mean "the connection or transaction was lost, try again".
_TRANSIENT_STATES = ("08", "40001", "40P01", "HYT00", "HYT01", "57P01", "57P02", "57P03")
# Drivers often report a dropped connection as a generic HY000; these phrases give it away.
_TRANSIENT_PHRASES = (
    "server closed the connection",
    "terminating connection",
    "lost connection",
    "gone away",
    "connection has been closed",
    "closed connection",
    "communication link",
    "could not send data",
    "could not receive data",
    "no connection to the server",
    "connection reset",
    "connection not open",
    "database is locked",
    "deadlock",
)


def is_transient(exc: BaseException) -> bool:
    """True for disconnects, timeouts, deadlocks and serialization failures."""
    if not isinstance(exc, pyodbc.Error):
        return False
    state = str(exc.args[0]) if exc.args else ""
    message = " ".join(str(a) for a in exc.args).lower()
    if state.startswith(_TRANSIENT_STATES):
        return True
    return any(phrase in message for phrase in _TRANSIENT_PHRASES)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped; ``attempts=1`` disables retrying."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 15.0
    jitter: float = 0.25
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    def delays(self) -> Iterator[float]:
        """Delays before attempt 2, 3, …; one fewer than ``attempts``."""
        for attempt in range(self.attempts - 1):
            delay = min(self.max_delay, self.base_delay * 2**attempt)
            yield delay * (1 + random.uniform(-self.jitter, self.jitter))


NO_RETRY = RetryPolicy(attempts=1)
