"""Sync lag on real data: legacy ERP rows whose ``LAST_UPD`` is years old, synced for the first time.

The Dataverse sandbox over HTTP, the SQLite ERP through the ODBC driver (seeded: ``LAST_UPD``
from 2021 on), the SQLite state store, one real customers run, then the health figures. Before
``first_seen_at`` the health page reported the age of the seed date (tens of thousands of hours).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from d365sync.engine import health
from d365sync.engine.migrations import schema as t
from tests.integration.pipeline_env import Env, running_env
from tests.sandbox_fixtures import SandboxFactory

# GX 1.24.1 imports the deprecated sre_constants/sre_parse modules on Python 3.11 (as in
# tests/unit/test_validation.py): only those two import-time messages are ignored.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)


@pytest.fixture
def env(dataverse_sandbox_factory: SandboxFactory, tmp_path: Path) -> Iterator[Env]:
    with running_env(dataverse_sandbox_factory, tmp_path, seed=5, rows=20) as environment:
        yield environment


def test_initial_load_of_years_old_rows_shows_the_run_duration_as_lag(env: Env) -> None:
    legacy = env.erp_rows("SELECT CUST_NO FROM CUST_MASTER ORDER BY CUST_NO")[0][0]
    env.erp.execute([f"UPDATE CUST_MASTER SET LAST_UPD = '2009-03-01 08:00:00' WHERE CUST_NO = '{legacy}'"])

    result = env.run("customers")

    report = env.store.run_report(result.run_id, "customers")
    assert report is not None and report.status == "success" and report.finished_at is not None
    duration = (report.finished_at - report.started_at).total_seconds()
    r = t.record
    query = select(r.c.erp_modified, r.c.first_seen_at, r.c.updated_at).where(
        r.c.entity == "customers", r.c.erp_key == legacy
    )
    with env.store.engine.connect() as conn:
        modified, first_seen, saved = conn.execute(query).one()
    assert modified.year == 2009  # the lag input really is the legacy stamp
    assert first_seen == report.started_at  # first seen by this run

    figures = health.build_health(env.store, now=datetime.now(UTC)).entities["customers"]
    assert figures.lag_max_s is not None and figures.lag_p50_s is not None
    assert figures.lag_max_s <= duration + 1, figures
    assert (saved - report.started_at).total_seconds() <= figures.lag_max_s
    assert figures.lag_max_s < timedelta(hours=1).total_seconds()

    summary = health.summary(health.build_health(env.store))
    assert summary["entities"]["customers"]["lag_max_s"] == figures.lag_max_s
