"""Progress of a long stage: logged and reported at an interval, with rate and ETA."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from d365sync.engine.progress import Progress, describe


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_logs_and_reports_at_the_interval_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    clock, reports = Clock(), []
    progress = Progress("load_dynamics", 1000, report=reports.append, every=30, clock=clock)
    caplog.set_level(logging.INFO, "d365sync.progress")
    clock.now += 10
    progress.add(100)
    assert reports == [] and caplog.messages == [], "nothing before the interval"
    clock.now += 20
    progress.add(200)  # 300 rows in 30 s: 10 rows/s, 700 left: 70 s
    (line,) = caplog.messages
    assert line == "load_dynamics: 300/1,000 (30%) rows, 10 rows/s, ETA 70 s"
    assert reports == [
        {"stage": "load_dynamics", "done": 300, "total": 1000, "rate": 10.0, "eta_s": 70.0, "final": False}
    ]
    clock.now += 70
    progress.add(700)
    progress.finish()
    assert caplog.messages[-1] == "load_dynamics: 1,000/1,000 (100%) rows, 10 rows/s, ETA 0 s (done)"
    assert reports[-1]["final"] is True


def test_a_short_stage_logs_nothing_and_an_unknown_total_gives_no_eta(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, "d365sync.progress")
    short = Progress("extract_erp", clock=clock)
    short.add(50)
    short.finish()
    assert caplog.messages == []
    clock.now += 40
    short.add(50)
    assert caplog.messages == ["extract_erp: 100 rows, 2 rows/s"]


def test_a_failing_report_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: Any) -> None:
        raise RuntimeError("database is locked")

    clock = Clock()
    progress = Progress("load_erp", 10, report=broken, every=0, clock=clock)
    clock.now += 1
    progress.add(5)
    assert "progress of load_erp not stored: database is locked" in caplog.text


def test_describe_reads_stored_figures() -> None:
    stored = {"stage": "load_erp", "done": 4500, "total": 9000, "rate": 150.0, "eta_s": 1800.0}
    assert describe(stored) == "load_erp: 4,500/9,000 (50%) rows, 150 rows/s, ETA 30 min"
