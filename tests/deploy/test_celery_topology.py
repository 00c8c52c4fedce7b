"""The docker-compose topology without Docker: the same settings, as separate processes on loopback.

From ``docker-compose.yaml`` (x-airflow-common environment and the services' commands, hosts
swapped for 127.0.0.1 by :mod:`tests.deploy.compose`): the airflow-init script against a fresh
PostgreSQL metadata database, an ERP schema seeded through ODBC and a PostgreSQL state store;
then api-server, scheduler, dag-processor, triggerer and two ``airflow celery worker`` processes
on the local Redis (a db number of their own). ``sync_customers`` and then ``sync_orders`` are
triggered through the REST API (SimpleAuthManager JWT) and must succeed, with every task
instance executed by one of the Celery workers. Every process is started in its own session and
ended by process group in the fixture's teardown.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from cryptography.fernet import Fernet

from tests.deploy.topology import Api, Stack, executed_line, run_dag, topology, wait_ready

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

RUN_TIMEOUT = 360.0  # both DAG runs, after the stack is up
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
    wait_ready(stack, api, DOTENV["_AIRFLOW_WWW_USER_PASSWORD"], ("sync_customers", "sync_orders"))

    deadline = time.monotonic() + RUN_TIMEOUT
    runs = {dag_id: run_dag(api, dag_id, deadline) for dag_id in ("sync_customers", "sync_orders")}

    worker_logs = stack.log("airflow-worker-1") + stack.log("airflow-worker-2")
    host = socket.gethostname()
    for dag_id, (run_id, tis) in runs.items():
        assert tis, f"{dag_id}: no task instances"
        for ti in tis:
            where = f"{dag_id}.{ti['task_id']}"
            assert ti["state"] == "success", where
            assert ti["queue"] == "default", f"{where}: queue {ti['queue']}"
            assert ti["hostname"] == host, f"{where}: hostname {ti['hostname']}"
            assert ti["pid"], f"{where}: no pid"
            # the Celery executor's worker-side line for this very task instance
            assert executed_line(dag_id, run_id, ti["task_id"]) in worker_logs, (
                f"{where} not executed by a Celery worker\n{worker_logs[-3000:]}"
            )
    assert "Executing workload in Celery" in worker_logs
    print(f"celery topology: both runs succeeded in {time.monotonic() - started:.0f}s after start-up")
