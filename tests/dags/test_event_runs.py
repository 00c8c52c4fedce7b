"""Event-driven runs under a real scheduler, triggerer and api-server (issue 13).

``airflow standalone`` (LocalExecutor) with the shipped entity files (copied; ``customers`` polls
faster here), whose ``events`` turn on a Dataverse webhook, registered through the Web API, that
calls the operations app's receiver; the inbox trigger and the ERP-poll trigger run in the
triggerer, and an event-started run takes the one-task fast lane. Only ``sync_customers`` is
unpaused. A person (an application user of their own)
edits Dataverse; the ERP is edited over ODBC. Asserted: each edit reaches the other system
through an ``asset_triggered`` run whose ``sync_events`` task did the work; the sync's own
writes come back as notifications stored ``ignored``; and once quiet, nothing runs and nothing
is written. Latency figures belong to ``benchmarks/``, not here: the waits only bound them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from d365sync.dynamics.webhooks import MESSAGES, register_webhook
from d365sync.sandbox.dataverse.config import PERSON_USER
from d365sync.sandbox.erp import sqlite_airflow_connection
from d365sync.spec import load_entities
from d365sync.webhook_cli import tables_for
from tests.dags.conftest import BIN, airflow_base_env, lane_of
from tests.integration.pipeline_env import ENTITIES, Env, running_env
from tests.sandbox_fixtures import SandboxFactory

pytestmark = [pytest.mark.slow]

DAG_ID = "sync_customers"
KEY = "0123456789abcdef-events-test-key"
EVENTS = "events: {dynamics: webhook, erp: poll, poll_seconds: 2, inbox_poll_seconds: 0.5}\n"
PROPAGATION = 90.0  # an edit reaches the other system well within this (seconds, loaded CI)
USERS = {"alice": "op", "victor": "viewer"}


@dataclass
class Stack:
    env: Env
    server: Any
    entities: Path

    def rest(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.server.token('alice')}"}
        response = httpx.request(
            method, f"{self.server.url}/api/v2/{path}", headers=headers, timeout=30, **kwargs
        )
        assert response.status_code < 300, response.text
        return response.json()

    def runs(self) -> list[dict[str, Any]]:
        return self.rest("GET", f"dags/{DAG_ID}/dagRuns?limit=100&order_by=start_date")["dag_runs"]

    def tasks(self, run_id: str) -> dict[str, str]:
        tis = self.rest("GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {t["task_id"]: t["state"] for t in tis}

    def settled(self) -> bool:
        return all(r["state"] in ("success", "failed") for r in self.runs())


def _until(what: str, probe: Callable[[], Any], stack: Stack, timeout: float = PROPAGATION) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.5)  # polling interval of an observation, not synchronisation
    pytest.fail(f"{what} not within {timeout:.0f} s\n{stack.server.log_tail()}")


def _entities(folder: Path) -> Path:
    """The shipped entity files, ``customers``' events line replaced by the test's faster polls."""
    target = folder / "entities"
    shutil.copytree(ENTITIES, target)
    customers = target / "customers.yaml"
    lines = customers.read_text(encoding="utf-8").splitlines(keepends=True)
    shipped = [i for i, line in enumerate(lines) if line.startswith("events:")]
    assert len(shipped) == 1, "customers.yaml ships with exactly one top-level `events:` line"
    lines[shipped[0]] = EVENTS
    customers.write_text("".join(lines), encoding="utf-8")
    events = load_entities(target)["customers"].events
    assert (events.dynamics, events.erp, events.poll_seconds, events.inbox_poll_seconds) == (
        "webhook",
        "poll",
        2.0,
        0.5,
    )
    return target


@pytest.fixture(scope="module")
def stack(
    dataverse_sandbox_factory: SandboxFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from tests.browser.conftest import standalone

    folder = tmp_path_factory.mktemp("event-runs")

    def factory(**options: Any) -> Any:
        return dataverse_sandbox_factory(extra_users=[PERSON_USER], **options)

    entities = _entities(folder)
    with running_env(factory, folder, seed=5, rows=10) as env:
        extra = {
            "AIRFLOW_CONN_DYNAMICS_DEFAULT": json.dumps(env.sandbox.airflow_connection()),
            "AIRFLOW_CONN_ERP_DEFAULT": json.dumps(sqlite_airflow_connection(folder / "erp.db")),
            "AIRFLOW_CONN_SYNC_STATE_DEFAULT": json.dumps(
                {"conn_type": "sqlite", "host": str(folder / "state.db")}
            ),
            "D365SYNC_ENTITIES_DIR": str(entities),
            "D365SYNC_WEBHOOK_KEY": KEY,
            "D365SYNC_PII_KEYS": Fernet.generate_key().decode(),
            "D365SYNC_STAGING_ROOT": f"file://{folder / 'staging'}",
            "D365SYNC_TASK_RETRIES": "0",
        }
        state = (env.store, f"sqlite:///{folder / 'state.db'}")
        with standalone(folder, state, folder, extra, "-events", USERS) as server:
            running = Stack(env, server, entities)
            spec = load_entities(entities)["customers"]
            url = f"{server.url}/d365sync/events/dataverse"
            register_webhook(
                env.dynamics,
                name="d365sync",
                url=url,
                key=KEY,
                tables=tables_for({"customers": spec}, MESSAGES),
            )
            pool = [str(BIN / "airflow"), "pools", "set", "dynamics_api", "2", "Dataverse Web API"]
            subprocess.run(pool, env=airflow_base_env(folder), check=True, capture_output=True, timeout=120)
            running.rest("PATCH", f"dags/{DAG_ID}", json={"is_paused": False})
            # the first runs: the ERP trigger fires at once (nothing committed yet), the cron may too
            _until(
                "a first successful run",
                lambda: any(r["state"] == "success" for r in running.runs()),
                running,
                240,
            )
            _until("the runs to settle", running.settled, running, 240)
            yield running


def _city_in_erp(env: Env, number: str) -> str | None:
    rows = env.erp_rows("SELECT RTRIM(CITY) FROM CUST_MASTER WHERE CUST_NO = ?", number)
    return rows[0][0] if rows else None


def _city_in_dynamics(env: Env, number: str) -> str | None:
    rows = env.dynamics_rows("accounts", ["address1_city"], f"accountnumber eq '{number}'")
    return rows[0]["address1_city"] if rows else None


def _event_run_that_wrote(stack: Stack, before: set[str]) -> dict[str, Any]:
    new = [r for r in stack.runs() if r["dag_run_id"] not in before]
    assert new and all(r["state"] == "success" for r in new), new
    assert {r["run_type"] for r in new} == {"asset_triggered"}, new
    # every run: route, then one lane successful and the other skipped; the first one the fast lane
    lanes = [lane_of(stack.tasks(r["dag_run_id"])) for r in new]
    assert lanes[0] == "fast", lanes
    return new[0]


def test_a_dataverse_edit_by_a_person_reaches_the_erp_through_the_fast_lane(stack: Stack) -> None:
    env, number = stack.env, "ACC-000002"
    before = {r["dag_run_id"] for r in stack.runs()}
    with env.sandbox.client_as(PERSON_USER) as person:
        person.upsert_many(
            "accounts",
            "accountnumber",
            [{"accountnumber": number, "address1_city": "Webhook City"}],
            logical_name="account",
        )

    started = time.monotonic()
    _until("the ERP row", lambda: _city_in_erp(env, number) == "Webhook City", stack)
    print(f"Dataverse -> ERP: {time.monotonic() - started:.1f} s")  # a figure for people, not a check
    _until("the runs to settle", stack.settled, stack)

    _event_run_that_wrote(stack, before)
    events = env.store.inbox_events("customers")
    mine = [e for e in events if e.message == "Update" and e.status == "done"]
    assert mine and all(e.user_id != "" for e in mine), events


def test_an_erp_edit_reaches_dataverse_and_the_syncs_own_write_is_ignored(stack: Stack) -> None:
    env, number = stack.env, "C000000003"
    before = {r["dag_run_id"] for r in stack.runs()}
    ignored_before = len(env.store.inbox_events("customers", status="ignored"))
    env.erp.execute([f"UPDATE CUST_MASTER SET CITY = 'Polled City' WHERE CUST_NO = '{number}'"])

    started = time.monotonic()
    _until("the Dataverse row", lambda: _city_in_dynamics(env, number) == "Polled City", stack)
    print(f"ERP -> Dataverse: {time.monotonic() - started:.1f} s")
    _until("the runs to settle", stack.settled, stack)

    _event_run_that_wrote(stack, before)
    # our write to Dataverse came back as a notification: stored, ignored, and it started nothing
    _until(
        "the notification of our own write",
        lambda: len(env.store.inbox_events("customers", status="ignored")) > ignored_before,
        stack,
    )


def test_when_nothing_changes_nothing_runs_and_nothing_is_written(stack: Stack) -> None:
    _until("the runs to settle", stack.settled, stack)
    time.sleep(3)  # the triggers' next polls see whatever the last run wrote
    _until("the runs to settle", stack.settled, stack)
    before = {r["dag_run_id"] for r in stack.runs()}
    stack.env.sandbox.reset_counters()

    time.sleep(8)  # four ERP polls and sixteen inbox polls

    assert {r["dag_run_id"] for r in stack.runs()} == before
    assert stack.env.write_requests() == 0
    assert stack.env.sandbox.counters().get("requests", 0) == 0, "a quiet system makes no Dataverse request"
