"""Every entity DAG through ``dag.test()`` against the Dataverse sandbox server and a real ERP.

SQLite ERP (the SQLite ODBC driver) + SQLite state store. The tests run in order and share the
systems: initial sync → edits on both sides → second run → third run. The same DAGs on PostgreSQL
(metadata DB, state store, ERP over the PostgreSQL ODBC driver) run in tests/deploy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from d365sync.engine.stages.context import aware
from tests.dags.conftest import AirflowEnv, assert_success, triggered_as
from tests.dags.sync_env import (
    Backend,
    SyncEnv,
    connections_env,
    init_erp,
    sqlite_backend,
    tidy_erp,
    writes,
)

ERP_ROWS = 400
SEED_ACCOUNTS = 40


@pytest.fixture(scope="module")
def env(
    airflow_env: AirflowEnv,
    dataverse_sandbox_factory,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SyncEnv]:
    """SQLite ERP and state store. The same DAG runs on PostgreSQL (metadata DB, state store and
    the ERP over the PostgreSQL ODBC driver) are tests/deploy's Celery topology and worker-kill
    tests; the state store on PostgreSQL alone is tests/integration/test_state_postgres.py."""
    backend = sqlite_backend(tmp_path_factory.mktemp("sync-sqlite"))
    init_erp(backend, ERP_ROWS)
    tidy_erp(backend)
    sandbox = dataverse_sandbox_factory(seed=SEED_ACCOUNTS)
    staging = tmp_path_factory.mktemp("staging")
    airflow = airflow_env.with_env(
        **connections_env(sandbox, backend), D365SYNC_STAGING_ROOT=f"file://{staging}"
    )
    yield SyncEnv(airflow, sandbox, backend)
    sandbox.stop()
    shutil.rmtree(staging, ignore_errors=True)


def _plan(env: SyncEnv) -> dict[str, dict[str, int]]:
    """Writes a dry run of every entity would make now: empty when both systems agree."""
    runs = env.run(conf={"dry_run": True})
    assert_success(runs)
    return {r.dag_id: writes(r) for r in runs if writes(r)}


def test_initial_sync_converges(env: SyncEnv) -> None:
    runs = env.run()
    assert [r.dag_id for r in runs][:1] == ["sync_customers"]
    assert_success(runs)
    customers = runs[0].report
    assert customers and customers["counts"]["extracted_erp"] > 0
    assert customers["staging"]["removed"] is True
    assert sum(sum(writes(r).values()) for r in runs) > 0
    pending = _plan(env)
    assert pending == {}


def test_edits_on_both_sides_converge_quarantine_and_queue_review(env: SyncEnv) -> None:
    accounts = env.dv_rows("accounts", "accountnumber,address1_line1,statecode", top=200)
    active = sorted(a["accountnumber"] for a in accounts if a["statecode"] == 0 and a["accountnumber"])
    both = [k for k in active if env.erp_scalar('SELECT COUNT(*) FROM "CUST_MASTER" WHERE "CUST_NO" = ?', k)]
    conflict, invalid, deleted = both[0], both[1], both[2]
    # a conflict: the address edited on both sides (last write wins, Dynamics on a tie)
    env.dv("PATCH", f"accounts(accountnumber='{conflict}')", {"address1_line1": "1 Dynamics Road"})
    env.erp_update("CUST_MASTER", "CUST_NO", conflict, ADDR_LINE1="2 ERP Street")
    # an invalid e-mail typed into the ERP
    env.erp_update("CUST_MASTER", "CUST_NO", invalid, CUST_EMAIL_ID="not-an-email")
    # a delete in Dynamics: the ERP customer is deactivated
    env.dv("DELETE", f"accounts(accountnumber='{deleted}')")
    # a financial field changed on both sides: manual review
    numbers = sorted(i["invoicenumber"] for i in env.dv_rows("invoices", "invoicenumber", top=500))
    number = next(
        n for n in numbers if env.erp_scalar('SELECT COUNT(*) FROM "INV_HEADER" WHERE "INV_NO" = ?', n)
    )
    env.dv("PATCH", f"invoices(invoicenumber='{number}')", {"totalamount": 1.11})
    env.erp_update("INV_HEADER", "INV_NO", number, GROSS_AMOUNT=2.22)

    runs = {r.dag_id: r for r in env.run()}
    assert_success(list(runs.values()))
    customers = runs["sync_customers"].report["counts"]
    assert customers["quarantined"] >= 1
    assert customers["conflicts"] + customers["resolved"] >= 1
    assert writes(runs["sync_customers"]).get("erp_deactivate", 0) >= 1
    with env.store() as store:
        queued = [r for r in store.reviews("invoices") if r.record_key.strip() == number]
    assert queued, runs["sync_invoices"].report
    status = env.erp_scalar('SELECT "STATUS" FROM "CUST_MASTER" WHERE "CUST_NO" = ?', deleted)
    assert status != "A"
    erp_address = env.erp_scalar('SELECT "ADDR_LINE1" FROM "CUST_MASTER" WHERE "CUST_NO" = ?', conflict)
    dv_address = env.dv("GET", f"accounts(accountnumber='{conflict}')?$select=address1_line1")[
        "address1_line1"
    ]
    assert erp_address.strip() == dv_address.strip()
    assert _plan(env) == {}


def test_third_run_writes_nothing(env: SyncEnv) -> None:
    runs = env.run()
    assert_success(runs)
    assert {r.dag_id: writes(r) for r in runs if writes(r)} == {}
    requests = {r.dag_id: r.report["counts"]["dataverse_requests"] for r in runs}
    assert all(n <= 12 for n in requests.values()), requests


def test_staging_root_holds_nothing_after_committed_runs(env: SyncEnv) -> None:
    root = Path(env.airflow.env["D365SYNC_STAGING_ROOT"].removeprefix("file://"))
    leftovers = [p for p in root.rglob("*.parquet")]
    assert leftovers == []


def test_backend_is_what_was_asked(env: SyncEnv) -> None:
    assert isinstance(env.backend, Backend)


def test_reconcile_finds_a_change_that_bypassed_the_cursor_and_the_next_run_repairs_it(env: SyncEnv) -> None:
    accounts = env.dv_rows("accounts", "accountnumber,creditlimit,statecode", top=200)
    keys = sorted(a["accountnumber"] for a in accounts if a["statecode"] == 0 and a["accountnumber"])
    key = next(
        k for k in keys if env.erp_scalar('SELECT "STATUS" FROM "CUST_MASTER" WHERE "CUST_NO" = ?', k) == "A"
    )
    old = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=2)
    with env.erp() as client:  # a direct SQL fix (think: restored from a backup) with an old LAST_UPD
        client.execute(
            ['UPDATE "CUST_MASTER" SET "CREDIT_LIMIT" = 98765.43, "LAST_UPD" = ? WHERE "CUST_NO" = ?'],
            [old, key],
        )
    assert_success(env.run("sync_customers"))
    before = env.dv("GET", f"accounts(accountnumber='{key}')?$select=creditlimit")["creditlimit"]
    assert float(before or 0) != 98765.43, "the cursor must not have seen the direct SQL update"

    conf = {"entities": ["customers"], "queue_repairs": True}
    (rec,) = env.run("reconcile", conf=conf, env=triggered_as("op"))  # a manual run: an operator's
    assert_success([rec])
    staging = Path(env.airflow.env["D365SYNC_STAGING_ROOT"].removeprefix("file://"))
    report_files = sorted(staging.rglob("reconcile/reports/customers-*.json"))
    drift = json.loads(report_files[-1].read_text())
    item = next(d for d in drift["drift"] if d["key"] == key)
    assert {"field": "credit_limit", "changed_on": "erp"} in item["why"]
    assert drift["repairs_queued"] >= 1

    with env.store() as store:
        queued = [d for d in store.dead_letters("customers", status="replay") if d.record_key.strip() == key]
    assert queued and queued[0].stage == "reconcile"
    (run,) = env.run("sync_customers")
    assert_success([run])
    assert writes(run).get("dynamics_update", 0) >= 1, run.report
    limit = env.dv("GET", f"accounts(accountnumber='{key}')?$select=creditlimit")["creditlimit"]
    assert float(limit) == 98765.43
    with env.store() as store:  # the repair is done: not replayed again
        left = [d for d in store.dead_letters("customers", status="replay") if d.record_key.strip() == key]
        mark = store.watermark("customers", "erp")
    assert left == []
    assert mark is not None and aware(mark.value) > aware(old), "the ERP cursor never moves back"
    (again,) = env.run("sync_customers")
    assert_success([again])
    assert writes(again) == {}


def test_review_decision_from_a_manual_dag_run_is_applied_by_the_next_run(env: SyncEnv) -> None:
    with env.store() as store:
        review = store.reviews("invoices")[0]
    (decide,) = env.run(
        "apply_review_decisions",
        conf={"entity": "invoices", "review_ids": [review.id], "decision": "erp"},
        env=triggered_as("op"),
    )
    assert_success([decide])
    (run,) = env.run("sync_invoices")
    assert_success([run])
    with env.store() as store:
        assert review.id not in {r.id for r in store.reviews("invoices")}
        assert review.id not in {r.id for r in store.reviews("invoices", status="decided")}


def test_replay_dead_letters_from_a_manual_dag_run(env: SyncEnv) -> None:
    conf = {"entity": "orders", "keys": ["NO-SUCH-KEY"]}
    (replay,) = env.run("replay_dead_letters", conf=conf, env=triggered_as("op"))
    assert_success([replay])
    assert replay.raw["tasks"] == {"replay_dead_letters": "success"}


def test_a_failed_run_is_recorded_as_failed_in_the_state_store(env: SyncEnv, tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"  # an ERP without tables: extract_erp fails
    empty_erp = {"conn_type": "erp_odbc", "schema": str(empty), "extra": {"driver": "SQLite3"}}
    (run,) = env.run("sync_customers", env={"AIRFLOW_CONN_ERP_DEFAULT": json.dumps(empty_erp)})
    assert run.state == "failed" and run.tasks["extract_erp"] == "failed", run
    with env.store() as store:
        report = store.run_report(run.run_id, "customers")
    assert report is not None and report.status == "failed", (report, run.log[-3000:])
    assert report.error and report.error.startswith("extract_erp failed"), report.error
    assert report.finished_at is not None
