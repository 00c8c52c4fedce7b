"""A Celery worker dies in the middle of a customers load; Airflow retries on the other worker.

The compose topology on loopback (:mod:`tests.deploy.topology`) with two workers and an ERP of
4,000 customers, initial sync into a sandbox of 40 accounts. Scenario tunables on top of the
compose settings: a 25 s task-instance heartbeat timeout checked every 2 s (default 300 s / 10 s),
2 s retry delay, 500-row staging chunks, and 1 s of sandbox latency per Web API request while the
first try loads, so ``load_dynamics`` writes chunk after chunk for several seconds.

Once ``load_dynamics`` is running and the sandbox has received writes, the worker whose process
tree holds the task (task instance ``pid``) is SIGKILLed by process group. The scheduler then
finds the task without heartbeat, fails the try, and the retry runs on the surviving worker.
Asserted: the run succeeds, ``load_dynamics`` ran its last try (try_number > 1) on the survivor,
accountnumber is unique in the sandbox and CUST_NO in the ERP, and a follow-up run writes nothing
(no write request reaches the sandbox; the ERP table is byte-for-byte the same). Runs the entity's
events start meanwhile (ERP polling) share the DAG's one active run slot and must not write either.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from cryptography.fernet import Fernet

from tests.deploy.topology import (
    Api,
    Stack,
    account_numbers,
    dag_runs,
    executed_line,
    topology,
    trigger,
    unpause,
    wait_for,
    wait_ready,
    wait_run,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

DAG_ID = "sync_customers"
KILLED_TASK = "load_dynamics"
RUN_TIMEOUT = 240.0
LATENCY_MS = 1000
DOTENV = {
    "AIRFLOW__CORE__PARALLELISM": "4",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
    "_AIRFLOW_WWW_USER_PASSWORD": "ci-admin-pw-7f3a9c",
    "D365SYNC_PII_KEYS": Fernet.generate_key().decode(),
    "DEMO_ROWS": "4000",
}
# Scenario tunables, not compose settings: fast detection of the lost task and a short retry delay.
OVERRIDES = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "25",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
    "D365SYNC_TASK_RETRIES": "2",
    "D365SYNC_RETRY_DELAY_SECONDS": "2",
    "D365SYNC_MAX_RETRY_DELAY_SECONDS": "5",
    "D365SYNC_CHUNK_SIZE": "500",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with topology(
        tmp_path_factory.mktemp("celery-kill"), DOTENV, name="kill", overrides=OVERRIDES
    ) as running:
        yield running


def sandbox_writes(stack: Stack) -> int:
    """Web API operations that are not reads ($batch parts and bulk targets counted one by one)."""
    routes: dict[str, int] = stack.sandbox.counters()["operation_routes"]
    return sum(n for route, n in routes.items() if not route.startswith("GET"))


def erp_customers(stack: Stack) -> tuple[int, int, str]:
    """(rows, distinct CUST_NO, md5 of every row in key order)."""
    import pyodbc

    conn = pyodbc.connect(stack.erp_odbc)
    try:
        row = conn.execute(
            'SELECT COUNT(*), COUNT(DISTINCT "CUST_NO"), '
            'md5(string_agg(CAST(c.* AS text), \'|\' ORDER BY "CUST_NO")) FROM "CUST_MASTER" c'
        ).fetchone()
    finally:
        conn.close()
    return int(row[0]), int(row[1]), str(row[2])


def worker_of(stack: Stack, pid: int) -> str | None:
    """The worker whose process tree holds ``pid``."""
    leaders = {proc.pid: name for name, proc in stack.procs.items() if name.startswith("airflow-worker-")}
    try:
        chain = [psutil.Process(pid), *psutil.Process(pid).parents()]
    except psutil.NoSuchProcess:
        return None
    for process in chain:
        if process.pid in leaders:
            return leaders[process.pid]
    return None


def ti_of(tis: list[dict[str, Any]], task_id: str) -> dict[str, Any]:
    return next(t for t in tis if t["task_id"] == task_id)


def test_killing_a_worker_mid_load_converges_without_duplicates(stack: Stack) -> None:
    started = time.monotonic()
    api = Api(stack)
    wait_ready(stack, api, DOTENV["_AIRFLOW_WWW_USER_PASSWORD"], (DAG_ID,))
    assert sorted(stack.workers) == ["airflow-worker-1", "airflow-worker-2"]

    stack.sandbox.set_knobs(latency_ms=LATENCY_MS)
    stack.sandbox.reset_counters()
    # Unpausing makes the scheduler create the run of the latest interval (catchup=False): that
    # run is the initial sync, on the staged chain. (A manual run queued next to it would find
    # nothing left to do.) The entity's events add asset-triggered runs once the DAG processor has
    # registered the ERP-poll trigger: they queue behind it (one active run) and are not this one.
    unpause(api, DAG_ID)

    def scheduled() -> list[dict[str, Any]]:
        return [r for r in dag_runs(api, DAG_ID) if r["run_type"] == "scheduled"]

    run_id = str(wait_for(f"{DAG_ID} scheduled run", scheduled, 90, stack)[0]["dag_run_id"])
    deadline = time.monotonic() + RUN_TIMEOUT

    def loading() -> tuple[str, dict[str, Any]] | None:
        ti = ti_of(api.task_instances(DAG_ID, run_id), KILLED_TASK)
        if ti["state"] != "running" or not ti["pid"] or sandbox_writes(stack) == 0:
            return None
        worker = worker_of(stack, int(ti["pid"]))
        return (worker, ti) if worker else None

    victim, first = wait_for(f"{KILLED_TASK} running with writes", loading, 180, stack, interval=0.5)
    stack.kill(victim)
    stack.sandbox.set_knobs(latency_ms=0)
    writes_at_kill = sandbox_writes(stack)
    [survivor] = stack.workers

    state, tis = wait_run(api, DAG_ID, run_id, deadline, interval=2.0)
    summary = {t["task_id"]: (t["state"], t["try_number"]) for t in tis}
    assert state == "success", f"{run_id}: {state} {summary}\n{stack.logs_tail()}"
    retried = ti_of(tis, KILLED_TASK)
    assert retried["try_number"] > first["try_number"], summary
    assert executed_line(DAG_ID, run_id, KILLED_TASK) in stack.log(survivor), stack.log(survivor)[-3000:]
    tries = api.json("GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{KILLED_TASK}/tries")
    states = [t["state"] for t in sorted(tries["task_instances"], key=lambda t: t["try_number"])]
    assert states[0] == "failed" and states[-1] == "success", states
    # the retry had work left: it wrote what the killed try had not
    assert sandbox_writes(stack) > writes_at_kill, (writes_at_kill, stack.sandbox.counters())

    numbers = account_numbers(stack)
    assert len(set(numbers)) == len(numbers), "duplicate accountnumbers in the sandbox"
    rows, distinct, erp_digest = erp_customers(stack)
    assert rows == distinct, "duplicate CUST_NO rows in the ERP"

    # converged: a follow-up run finds nothing to write on either side
    stack.sandbox.reset_counters()
    follow_up = trigger(api, DAG_ID)
    state, tis = wait_run(api, DAG_ID, follow_up, time.monotonic() + 150, interval=2.0)
    assert state == "success", {t["task_id"]: t["state"] for t in tis}
    assert sandbox_writes(stack) == 0, stack.sandbox.counters()
    assert sorted(account_numbers(stack)) == sorted(numbers)
    assert erp_customers(stack) == (rows, distinct, erp_digest)
    print(
        f"worker kill: {victim} killed after {writes_at_kill} account writes, {KILLED_TASK} try "
        f"{retried['try_number']} succeeded on {survivor}; {len(numbers)} accounts, {rows} ERP customers; "
        f"{time.monotonic() - started:.0f}s after start-up"
    )
