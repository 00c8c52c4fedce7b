"""A conflict made by real syncs, decided in the browser, written to both systems by the next run.

Issue 6: "After the next entity run, the decision is visible in both systems." The fixture builds
a real sync environment (Dataverse sandbox, SQLite ERP and state store, as ``tests/dags`` does),
syncs customers, orders and invoices through ``dag.test()``, then edits one invoice's total on
both sides (a financial field: manual review) and runs ``sync_invoices`` again, which opens the
review item. ``airflow standalone`` (DAGs paused) serves the operations UI over that state store;
the operator ``alice`` enters a value in the review queue, and the next ``sync_invoices`` run
(``dag.test()`` in its own Airflow home, as the DAG tests do) writes it to Dynamics and the ERP.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from d365sync.engine.state import StateStore
from tests.browser.conftest import AirflowServer, Browser, require_chromium, standalone
from tests.browser.test_operations_ui import decide, flash, login, open_from_nav
from tests.dags.conftest import AirflowEnv, airflow_env, assert_success  # noqa: F401 (fixture)
from tests.dags.sync_env import SyncEnv, connections_env, init_erp, sqlite_backend, tidy_erp

pytestmark = pytest.mark.browser

ERP_ROWS = 60
DECIDED = "3.33"


@dataclass
class Roundtrip:
    env: SyncEnv
    server: AirflowServer
    invoice: str
    review_id: int


def _dynamics_total(env: SyncEnv, number: str) -> float:
    return float(env.dv("GET", f"invoices(invoicenumber='{number}')?$select=totalamount")["totalamount"])


def _erp_total(env: SyncEnv, number: str) -> float:
    return float(env.erp_scalar('SELECT "GROSS_AMOUNT" FROM "INV_HEADER" WHERE "INV_NO" = ?', number))


def _make_conflict(env: SyncEnv) -> tuple[str, int]:
    """Initial sync, then the invoice total changed on both sides: the next run queues a review."""
    assert_success(env.run("sync_customers", "sync_orders", "sync_invoices"))
    numbers = sorted(i["invoicenumber"] for i in env.dv_rows("invoices", "invoicenumber", top=500))
    number = next(
        n for n in numbers if env.erp_scalar('SELECT COUNT(*) FROM "INV_HEADER" WHERE "INV_NO" = ?', n)
    )
    env.dv("PATCH", f"invoices(invoicenumber='{number}')", {"totalamount": 1.11})
    env.erp_update("INV_HEADER", "INV_NO", number, GROSS_AMOUNT=2.22)
    assert_success(env.run("sync_invoices"))
    with env.store() as store:
        (review,) = [r for r in store.reviews("invoices") if r.record_key.strip() == number]
    return number, review.id


@pytest.fixture(scope="module")
def roundtrip(
    airflow_env: AirflowEnv,  # noqa: F811
    dataverse_sandbox_factory: Any,
    tmp_path_factory: pytest.TempPathFactory,
    artifacts: Path,
) -> Iterator[Roundtrip]:
    require_chromium()
    backend = sqlite_backend(tmp_path_factory.mktemp("roundtrip-systems"))
    init_erp(backend, ERP_ROWS)
    tidy_erp(backend)
    sandbox = dataverse_sandbox_factory(seed=10)
    staging = tmp_path_factory.mktemp("roundtrip-staging")
    airflow = airflow_env.with_env(
        **connections_env(sandbox, backend), D365SYNC_STAGING_ROOT=f"file://{staging}"
    )
    env = SyncEnv(airflow, sandbox, backend)
    number, review_id = _make_conflict(env)
    home = tmp_path_factory.mktemp("airflow-standalone-roundtrip")
    store = StateStore.open(backend.state_url)
    try:
        with standalone(home, (store, backend.state_url), artifacts, name="-roundtrip") as server:
            yield Roundtrip(env, server, number, review_id)
    finally:
        store.close()
        sandbox.stop()
        shutil.rmtree(staging, ignore_errors=True)


def test_decision_in_the_ui_is_in_both_systems_after_the_next_entity_run(
    roundtrip: Roundtrip, browser: Browser
) -> None:
    env, server, driver = roundtrip.env, roundtrip.server, browser.driver
    number, review_id = roundtrip.invoice, roundtrip.review_id
    assert (_dynamics_total(env, number), _erp_total(env, number)) == (1.11, 2.22), "the conflict stands"

    login(driver, server, "alice")
    open_from_nav(driver, "Review queue")
    browser.shot("01-real-conflict")
    decide(driver, review_id, "value", "total confirmed by finance", value=DECIDED)
    flash(driver, f"Review {review_id} decided (value).")
    browser.shot("02-decided")

    (run,) = env.run("sync_invoices")
    assert_success([run])
    assert _dynamics_total(env, number) == float(DECIDED)
    with env.store() as store:
        assert review_id not in {r.id for r in store.reviews("invoices")}
        assert review_id not in {r.id for r in store.reviews("invoices", status="decided")}
        dead = [(d.stage, d.error) for d in store.dead_letters("invoices") if d.record_key.strip() == number]
    assert dead == []
    assert _erp_total(env, number) == float(DECIDED)
