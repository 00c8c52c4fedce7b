"""The soak harness's own logic, without starting anything: which runs complete a cycle, how a
failed task's error line is read from its log, what drift is allowed, and process-group cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from d365sync.sandbox.soak import (
    Check,
    SoakReport,
    _allowed,
    _reason,
    cycle,
    parse_duration,
    stop_group,
    task_error,
    verdict,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
ORDER = ["customers", "products", "inventory", "orders"]
UPSTREAM = {"customers": set(), "products": set(), "inventory": {"products"}, "orders": {"customers"}}


def _run(state: str, start: int | None, end: int | None = None, run_id: str = "") -> dict[str, Any]:
    def at(minute: int | None) -> str | None:
        return None if minute is None else (T0 + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z")

    return {
        "dag_run_id": run_id or f"{state}-{start}",
        "state": state,
        "start_date": at(start),
        "end_date": at(end),
    }


def test_durations() -> None:
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("1.5h") == 5400
    assert parse_duration("45") == 45
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("soon")


def test_a_cycle_needs_finished_runs_that_started_after_the_time() -> None:
    since = dict.fromkeys(["customers", "products"], T0 + timedelta(minutes=10))
    runs = {
        "customers": [
            _run("success", 5, 12),  # started before the fix, finished after: never counts
            _run("running", 11),  # started after, but not finished
            _run("queued", None),
        ],
        "products": [_run("failed", 11, 13)],  # failed is finished: the cycle is complete for it
    }
    found = cycle(runs, since, ORDER, UPSTREAM, chain=False)
    assert set(found) == {"products"}
    runs["customers"].append(_run("success", 14, 15))
    runs["customers"].append(_run("success", 12, 13))
    assert cycle(runs, since, ORDER, UPSTREAM, chain=False)["customers"]["start_date"].startswith(
        "2026-11-30T12:12"
    ), "the first finished run after the time"


def test_a_chained_cycle_waits_for_children_to_start_after_their_parents_ended() -> None:
    since = dict.fromkeys(ORDER, T0)
    runs = {
        "customers": [_run("success", 1, 5)],
        "products": [_run("success", 1, 3)],
        "inventory": [_run("success", 2, 4)],  # started before products ended
        "orders": [_run("success", 6, 8)],
    }
    found = cycle(runs, since, ORDER, UPSTREAM, chain=True)
    assert set(found) == {"customers", "products", "orders"}
    runs["inventory"].append(_run("success", 4, 6))
    assert set(cycle(runs, since, ORDER, UPSTREAM, chain=True)) == set(ORDER)
    # a child run started after its parent committed (commit_state) but before the run ended counts
    runs["orders"] = [_run("success", 4, 7)]
    assert "orders" not in cycle(runs, since, ORDER, UPSTREAM, chain=True)
    committed = {"customers": T0 + timedelta(minutes=3)}
    found = cycle(runs, since, ORDER, UPSTREAM, chain=True, committed=lambda e, _run: committed.get(e))
    assert "orders" in found
    # without its parent's run, a child never completes a chained cycle
    runs["customers"] = [_run("running", 1)]
    assert "orders" not in cycle(runs, since, ORDER, UPSTREAM, chain=True)
    assert "orders" in cycle(runs, since, ORDER, UPSTREAM, chain=False)


def test_a_run_is_judged_only_if_it_started_before_the_cutoff() -> None:
    cutoff = T0 + timedelta(minutes=10)
    assert verdict(_run("failed", 12, 13), cutoff) == "failed"  # finished runs are always judged
    assert verdict(_run("running", 9), cutoff) == "stuck"
    assert verdict(_run("running", 11), cutoff) == "in flight"
    assert verdict(_run("queued", None), cutoff) == "in flight"


def _log(tmp_path: Path, lines: list[Any]) -> Path:
    path = tmp_path / "dag_id=sync_x" / "run_id=r:1+0" / "task_id=validate" / "attempt=2.log"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    return tmp_path


def test_the_error_line_of_a_failed_task_comes_from_its_log(tmp_path: Path) -> None:
    detail = [
        {"exc_type": "RunValidationFailed", "exc_value": "customers/dynamics: 1 of 2 rows invalid"},
        {"exc_type": "ValueError", "exc_value": "the cause", "is_cause": True},
    ]
    logs = _log(
        tmp_path,
        [
            {"level": "info", "event": "starting"},
            {"level": "error", "event": "Task failed with exception", "error_detail": detail},
        ],
    )
    line = task_error(logs, "sync_x", "r:1+0", "validate", 2)
    assert line == "RunValidationFailed: customers/dynamics: 1 of 2 rows invalid"
    assert task_error(logs, "sync_x", "r:1+0", "validate", 1).startswith("(no log at")


def test_without_an_exception_the_last_error_event_or_text_line_is_shown(tmp_path: Path) -> None:
    logs = _log(tmp_path, [{"level": "error", "event": "Process exited abnormally"}, "not json"])
    assert task_error(logs, "sync_x", "r:1+0", "validate", 2) == "Process exited abnormally"


def test_drift_allowed_only_on_pending_keys_and_one_sided_records_by_design() -> None:
    spec = SimpleNamespace(creates=SimpleNamespace(to_erp=False, to_dynamics=True))
    assert _allowed(spec, {"kind": "differs"}, pending=True)
    assert _allowed(spec, {"kind": "differs"}, pending=False) is None
    assert _allowed(spec, {"kind": "only_dynamics"}, pending=False)
    assert _allowed(spec, {"kind": "only_erp"}, pending=False) is None
    assert _allowed(spec, {"kind": "differs"}, pending=False, at_baseline=True)


def test_dead_letter_reasons_group_without_record_values() -> None:
    assert _reason("validation: 'x@@y' does not match; row 12") == "validation: … does not match; row #"


def test_the_report_fails_without_checks_or_with_one_failed() -> None:
    report = SoakReport(options={"duration": 60}, workdir="/tmp/x")
    assert not report.ok
    report.checks = [Check("runs_green", "runs", True), Check("waits", "waits", False, ["late"])]
    assert not report.ok and "[FAIL] waits: waits" in report.render() and "RESULT: FAIL" in report.render()
    report.checks[1].ok = True
    assert report.ok and json.loads(report.to_json())["checks"][0]["id"] == "runs_green"


def test_stop_group_ends_the_process_and_what_it_forked() -> None:
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True, stdout=subprocess.DEVNULL
    )
    time.sleep(0.3)
    stop_group(proc, grace=5)
    assert proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
