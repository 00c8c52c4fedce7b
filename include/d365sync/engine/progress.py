"""Progress of a long stage: rows done of the total, rate and ETA, logged and stored at an interval.

Why: an initial load of 100,000 customers runs for minutes in one task, and its log used to say
nothing between "started" and "done". Extract and load count their rows through a
:class:`Progress`; every ``every`` seconds (30 by default, so a short incremental run logs
nothing but its end) it logs one line and hands the same figures to ``report`` (the state store's
:meth:`~d365sync.engine.state.StateStore.note_progress`, which the entity page shows). An unknown
total (an extract: neither system says how many changed rows are coming) gives done and rate only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("d365sync.progress")
Report = Callable[[Mapping[str, Any]], None]


class Progress:
    """Counts one stage's rows; see the module docstring."""

    def __init__(
        self,
        stage: str,
        total: int | None = None,
        *,
        report: Report | None = None,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage, self.total, self.report, self.every, self.clock = stage, total, report, every, clock
        self.done = 0
        self.started = self.last = clock()

    def add(self, rows: int) -> None:
        """``rows`` more done; logs and reports when ``every`` seconds have passed since the last."""
        self.done += rows
        if self.clock() - self.last >= self.every:
            self._emit()

    def finish(self) -> None:
        """The stage's last line (logged only when it ran long enough to have logged before)."""
        if self.last > self.started:
            self._emit(final=True)

    def figures(self) -> dict[str, Any]:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        left = None if self.total is None else max(self.total - self.done, 0)
        eta = None if left is None or rate <= 0 else left / rate
        done, total = self.done, self.total
        return {"stage": self.stage, "done": done, "total": total, "rate": round(rate, 1), "eta_s": eta}

    def line(self) -> str:
        return describe(self.figures())

    def _emit(self, final: bool = False) -> None:
        self.last = self.clock()
        log.info("%s%s", self.line(), " (done)" if final else "")
        if self.report is not None:
            try:
                self.report({**self.figures(), "final": final})
            except Exception as exc:  # progress is advice: a failed write must not fail the stage
                log.warning("progress of %s not stored: %s", self.stage, exc)


def describe(f: Mapping[str, Any]) -> str:
    """``load_dynamics: 45,000/87,000 (52%) rows, 1,500 rows/s, ETA 28 s`` from :meth:`Progress.figures`."""
    part = f"{f['done']:,}" if f.get("total") is None else f"{f['done']:,}/{f['total']:,}"
    if f.get("total"):
        part += f" ({f['done'] / f['total']:.0%})"
    eta = "" if f.get("eta_s") is None else f", ETA {_duration(f['eta_s'])}"
    return f"{f['stage']}: {part} rows, {f['rate']:,.0f} rows/s{eta}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
