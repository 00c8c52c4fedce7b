"""The soak test (issue 10), in CI: a real scheduler syncs every entity every minute while users edit.

One soak per module (:func:`d365sync.sandbox.soak.run_soak`, the same runner as ``make soak``):
Dataverse sandbox, SQLite ERP over ODBC and state store, Airflow api-server + scheduler +
dag-processor (LocalExecutor, parallelism 4) with every entity DAG on ``* * * * *``, and the
simulator editing both systems for two minutes, one bad value of each kind included. Small seed
(40 ERP customers, 20 Dataverse accounts): the time goes to Airflow's task processes, not to data.

Each test is one item of the acceptance criteria, read from the runner's report; a failure shows
the check's details, and the whole report (runs, failed tasks with their error lines, dead
letters, drift) goes to ``var/test-artifacts/soak/`` (``D365SYNC_SOAK_ARTIFACTS`` overrides) with
the systems' logs left in the pytest temp directory it names.

Runtime: a cycle of all five entity DAGs is 45 task processes; on a free 2-core machine a cycle
takes 1-2 minutes, on a shared one much longer, so the waits are bounded by ``PHASE_TIMEOUT``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from d365sync.sandbox.soak import SoakOptions, SoakReport, run_soak

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("D365SYNC_SOAK_ARTIFACTS") or REPO / "var" / "test-artifacts" / "soak")
DURATION = 120.0  # seconds of user activity: two scheduled cycles at the least
PHASE_TIMEOUT = 1500.0

pytestmark = [pytest.mark.soak, pytest.mark.timeout(4 * PHASE_TIMEOUT + DURATION + 900)]


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> SoakReport:
    options = SoakOptions(
        duration=DURATION,
        workdir=tmp_path_factory.mktemp("soak"),
        erp_rows=40,
        dataverse_accounts=20,
        rate_per_minute=8.0,
        bad_per_kind=1,
        phase_timeout=PHASE_TIMEOUT,
    )
    report = run_soak(options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report.txt").write_text(report.render() + "\n")
    (ARTIFACTS / "report.json").write_text(report.to_json())
    return report


def _check(report: SoakReport, check_id: str) -> None:
    checks = [c for c in report.checks if c.id in (check_id, "harness")]
    assert checks, f"no {check_id!r} check in the report\n{report.render()}"
    failed = [c for c in checks if not c.ok]
    if failed:
        details = "\n".join(f"{c.name}:\n  " + "\n  ".join(c.details) for c in failed)
        pytest.fail(f"{details}\n\n(full report: {ARTIFACTS / 'report.txt'})", pytrace=False)


def test_the_scheduler_completed_every_cycle_in_time(soak: SoakReport) -> None:
    _check(soak, "waits")


def test_every_dag_run_is_green(soak: SoakReport) -> None:
    _check(soak, "runs_green")


def test_each_bad_record_sits_in_the_dead_letter_queue_with_a_reason(soak: SoakReport) -> None:
    _check(soak, "bad_dead_lettered")


def test_fixing_it_at_the_source_syncs_it_on_the_next_run(soak: SoakReport) -> None:
    _check(soak, "fix_syncs")


def test_nothing_is_left_pending_after_the_fix(soak: SoakReport) -> None:
    _check(soak, "nothing_pending")


def test_both_systems_agree_except_for_the_dead_lettered_keys(soak: SoakReport) -> None:
    _check(soak, "systems_agree")


def test_every_user_edit_was_accepted(soak: SoakReport) -> None:
    _check(soak, "edits_accepted")
