"""The docker-compose topology without Docker: the same settings, as separate processes on loopback.

From ``docker-compose.yaml`` (x-airflow-common environment and the services' commands, hosts
swapped for 127.0.0.1 by :mod:`tests.deploy.compose`): the airflow-init script against a fresh
PostgreSQL metadata database, an ERP schema seeded through ODBC and a PostgreSQL state store;
then api-server, scheduler, dag-processor, triggerer and two ``airflow celery worker`` processes
on the local Redis (a db number of their own). ``sync_customers`` and then ``sync_orders`` are
triggered through the REST API (SimpleAuthManager JWT) and must succeed: a manual run takes the
staged chain (``route``, then every task of the chain executed by one of the Celery workers; the
fast lane ``sync_events`` skipped, never sent to a worker).

Both entities ship with ``events`` (webhook + ERP polling), so the same stack also runs them event
driven: the triggerer's ERP-poll trigger starts ``asset_triggered`` runs (their fast lane runs on
a Celery worker too), and the webhook airflow-init registered makes the sandbox notify the
api-server's receiver of the sync's own Dataverse writes, which the inbox stores ``ignored``.
Every run of the two DAGs that finished must have succeeded. Every process is started in its own
session and ended by process group in the fixture's teardown.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tests.dags.conftest import lane_of
from tests.deploy.topology import (
    Api,
    Stack,
    dag_runs,
    executed_line,
    run_dag,
    state_store,
    topology,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

DAG_IDS = ("sync_customers", "sync_orders")
# both manual runs, after the stack is up (a wait, not a timing check: each may queue behind the
# scheduled run of the latest interval and event-started runs, one active run per DAG)
RUN_TIMEOUT = 600.0
EVENT_TIMEOUT = 240.0  # then an event-started customers run finished, and our writes came back
# The test's ".env": small and quiet, as a user would tune the compose file for a laptop.
DOTENV = {
    "AIRFLOW__CORE__PARALLELISM": "4",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    # paused at creation: only the two DAGs under test get unpaused (no runs of the others)
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
    "_AIRFLOW_WWW_USER_PASSWORD": "ci-admin-pw-7f3a9c",
    "D365SYNC_PII_KEYS": Fernet.generate_key().decode(),
    "DEMO_ROWS": "300",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with topology(tmp_path_factory.mktemp("celery-topology"), DOTENV) as running:
        yield running


def test_customers_then_orders_run_on_celery_workers(stack: Stack) -> None:
    started = time.monotonic()
    api = Api(stack)
    wait_ready(stack, api, DOTENV["_AIRFLOW_WWW_USER_PASSWORD"], DAG_IDS)

    deadline = time.monotonic() + RUN_TIMEOUT
    runs = {dag_id: run_dag(api, dag_id, deadline) for dag_id in DAG_IDS}

    for dag_id, (run_id, tis) in runs.items():
        assert tis, f"{dag_id}: no task instances"
        states = {ti["task_id"]: ti["state"] for ti in tis}
        # a manual run: route, then the staged chain, every task of it successful; sync_events skipped
        assert lane_of(states) == "staged", f"{dag_id} {run_id}: {states}"
        _executed_on_celery(stack, dag_id, run_id, tis)
    print(f"celery topology: both manual runs succeeded in {time.monotonic() - started:.0f}s after start-up")

    # event driven: the ERP-poll trigger fired (its first poll finds LAST_UPD past what is committed)
    def event_run() -> dict[str, Any] | None:
        finished = [r for r in dag_runs(api, "sync_customers") if r["state"] in ("success", "failed")]
        return next((r for r in finished if r["run_type"] == "asset_triggered"), None)

    event = wait_for("a finished event-started sync_customers run", event_run, EVENT_TIMEOUT, stack)
    tis = api.task_instances("sync_customers", event["dag_run_id"])
    assert event["state"] == "success", {t["task_id"]: t["state"] for t in tis}
    lane_of({t["task_id"]: t["state"] for t in tis})  # route, one lane successful, the other skipped
    _executed_on_celery(stack, "sync_customers", event["dag_run_id"], tis)
    # the webhook airflow-init registered: the sandbox told the receiver of our own account writes
    with state_store(stack) as store:
        wait_for(
            "notifications of the sync's own Dataverse writes, stored ignored",
            lambda: store.inbox_events("customers", status="ignored", limit=1),
            EVENT_TIMEOUT,
            stack,
        )
    # whatever else ran meanwhile (scheduled, event-started) succeeded, with a valid lane
    for dag_id in DAG_IDS:
        for run in dag_runs(api, dag_id):
            if run["state"] in ("success", "failed"):
                tis = api.task_instances(dag_id, run["dag_run_id"])
                states = {t["task_id"]: t["state"] for t in tis}
                assert run["state"] == "success", (
                    f"{dag_id} {run['dag_run_id']} ({run['run_type']}): {states}"
                )
                lane_of(states)
    print(f"celery topology: event runs checked {time.monotonic() - started:.0f}s after start-up")


def _executed_on_celery(stack: Stack, dag_id: str, run_id: str, tis: list[dict[str, Any]]) -> None:
    """Every task instance that ran was executed by a Celery worker on this host; the skipped
    ones (the lane route did not take) were never sent to a worker."""
    worker_logs = stack.log("airflow-worker-1") + stack.log("airflow-worker-2")
    host = socket.gethostname()
    for ti in tis:
        where = f"{dag_id} {run_id} {ti['task_id']}"
        line = executed_line(dag_id, run_id, ti["task_id"])  # the Celery worker-side line for it
        if ti["state"] == "skipped":
            assert line not in worker_logs, f"{where}: skipped, yet sent to a worker"
            continue
        assert ti["state"] == "success", f"{where}: {ti['state']}"
        assert ti["queue"] == "default", f"{where}: queue {ti['queue']}"
        assert ti["hostname"] == host, f"{where}: hostname {ti['hostname']}"
        assert ti["pid"], f"{where}: no pid"
        assert line in worker_logs, f"{where} not executed by a Celery worker\n{worker_logs[-3000:]}"
    assert "Executing workload in Celery" in worker_logs
