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

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from d365sync.sandbox.dataverse.config import PERSON_USER
from tests.airflow_local import Components, components, entity_files, ready_for_events, sync_settings
from tests.dags.conftest import lane_of
from tests.integration.pipeline_env import Env, running_env
from tests.sandbox_fixtures import SandboxFactory

pytestmark = [pytest.mark.slow]

DAG_ID = "sync_customers"
KEY = "0123456789abcdef-events-test-key"
EVENTS = "{dynamics: webhook, erp: poll, poll_seconds: 2, inbox_poll_seconds: 0.5}"
PROPAGATION = 90.0  # an edit reaches the other system well within this (seconds, loaded CI)
USERS = {"alice": "op", "victor": "viewer"}


@dataclass
class Stack:
    env: Env
    server: Components
    entities: Path

    def runs(self) -> list[dict[str, Any]]:
        return self.server.runs(DAG_ID)

    def tasks(self, run_id: str) -> dict[str, str]:
        return self.server.task_states(DAG_ID, run_id)

    def settled(self) -> bool:
        return self.server.settled(DAG_ID)


def _until(what: str, probe: Callable[[], Any], stack: Stack, timeout: float = PROPAGATION) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.5)  # polling interval of an observation, not synchronisation
    pytest.fail(f"{what} not within {timeout:.0f} s\n{stack.server.log_tail()}")


@pytest.fixture(scope="module")
def stack(
    dataverse_sandbox_factory: SandboxFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("event-runs")

    def factory(**options: Any) -> Any:
        return dataverse_sandbox_factory(extra_users=[PERSON_USER], **options)

    entities = entity_files(folder / "entities", {"customers": EVENTS})
    with running_env(factory, folder, seed=5, rows=10) as env:
        extra = {
            **sync_settings(env, folder, entities, KEY),
            # no cron tick in the middle of a test: every run after the first is event-started
            "D365SYNC_SCHEDULE_OVERRIDE": "0 0 1 1 *",
            # a killed scheduler takes its running task with it (detected in a minute); with the
            # api-server down a task cannot start (Airflow 3 tasks call its execution API): both
            # are retried, after 10 s and then 20 s, enough for a restart
            "D365SYNC_TASK_RETRIES": "2",
            "D365SYNC_RETRY_DELAY_SECONDS": "10",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
            # a task the killed scheduler's executor had just started is an orphan of that
            # scheduler's job: the restarted scheduler resets it once the old job is seen dead,
            # which it checks every 300 s by default (longer than the test's window)
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
            # a restarted triggerer takes over the dead one's triggers this long after its last beat
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
        }
        state = (env.store, f"sqlite:///{folder / 'state.db'}")
        with components(folder, state, extra, USERS, folder) as server:
            running = Stack(env, server, entities)
            ready_for_events(server, env, KEY)
            server.unpause(DAG_ID)
            # the first runs: the ERP trigger fires at once (nothing committed yet), the cron may too
            _until(
                "a first successful run",
                lambda: any(r["state"] == "success" for r in running.runs()),
                running,
                240,
            )
            _until("the runs to settle", running.settled, running, 240)
            yield running


def _quiesce(stack: Stack, timeout: float = PROPAGATION) -> None:
    """Settled, and still settled once the triggers have polled again: a run's own ERP writes move
    the cursor, so one more (echo) run may start after it, and writes nothing."""
    _until("the runs to settle", stack.settled, stack, timeout)
    time.sleep(3)  # an ERP poll (2 s) and inbox polls (0.5 s) later
    _until("the runs to settle", stack.settled, stack, timeout)


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
    _quiesce(stack)

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
    _quiesce(stack)

    _event_run_that_wrote(stack, before)
    # our write to Dataverse came back as a notification: stored, ignored, and it started nothing
    _until(
        "the notification of our own write",
        lambda: len(env.store.inbox_events("customers", status="ignored")) > ignored_before,
        stack,
    )


def test_a_stream_of_edits_is_drained_by_the_running_fast_lane(stack: Stack) -> None:
    """Edits arriving while a fast-lane task runs are synced by that task in further passes (engine
    runs ``<run id>.pass<n>``), not left to queue one run each behind it. The person keeps editing,
    one edit every 0.7 s, until such a pass shows up in the run reports (at most 60 s)."""
    env = stack.env
    _quiesce(stack)
    numbers = [f"ACC-00000{i}" for i in range(5)]
    values: dict[str, str] = {}
    before = {r["dag_run_id"] for r in stack.runs()}

    def passes() -> set[str]:
        return {r.run_id for r in env.store.run_reports("customers", limit=50) if ".pass" in r.run_id}

    earlier = passes()

    def drained() -> bool:
        return bool(passes() - earlier)

    deadline = time.monotonic() + 60
    with env.sandbox.client_as(PERSON_USER) as person:
        while not drained() and time.monotonic() < deadline:
            number = numbers[len(values) % len(numbers)]
            values[number] = f"Stream {len(values)} {int(time.time()) % 100_000}"
            person.upsert_many(
                "accounts",
                "accountnumber",
                [{"accountnumber": number, "address1_city": values[number]}],
                logical_name="account",
            )
            time.sleep(0.7)  # a stream: edits land while earlier ones are being synced
    assert drained(), "no fast-lane task took a second pass within 60 s of edits"
    _until("every edit in the ERP", lambda: all(_city_in_erp(env, n) == v for n, v in values.items()), stack)
    _quiesce(stack)

    new = [r["dag_run_id"] for r in stack.runs() if r["dag_run_id"] not in before]
    summaries = []
    for run_id in new:
        if stack.tasks(run_id).get("sync_events") == "success":
            path = f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/sync_events/xcomEntries/return_value"
            summaries.append(stack.server.rest("GET", path)["value"])
    assert any(s["passes"] > 1 for s in summaries), summaries
    assert not env.store.inbox_pending("customers")


def test_when_nothing_changes_nothing_runs_and_nothing_is_written(stack: Stack) -> None:
    _quiesce(stack)
    before = {r["dag_run_id"] for r in stack.runs()}
    stack.env.sandbox.reset_counters()

    time.sleep(8)  # four ERP polls and sixteen inbox polls

    assert {r["dag_run_id"] for r in stack.runs()} == before
    assert stack.env.write_requests() == 0
    assert stack.env.sandbox.counters().get("requests", 0) == 0, "a quiet system makes no Dataverse request"


def _person_edits(stack: Stack, values: dict[str, str], during: Callable[[int], None]) -> None:
    """One person edit per account, a second apart; ``during(i)`` runs before the i-th edit."""
    with stack.env.sandbox.client_as(PERSON_USER) as person:
        for i, (number, city) in enumerate(values.items()):
            during(i)
            person.upsert_many(
                "accounts",
                "accountnumber",
                [{"accountnumber": number, "address1_city": city}],
                logical_name="account",
            )
            time.sleep(1.0)  # a stream of edits, spread over the outage


@pytest.mark.parametrize("component", ["triggerer", "scheduler", "api-server"])
def test_a_component_killed_mid_stream_loses_no_acknowledged_notification_and_syncs_each_once(
    stack: Stack, component: str
) -> None:
    """SIGKILL one component after the second of six edits, start it again after the fourth.
    Every notification the receiver acknowledged is done by exactly one run, every edit reaches
    the ERP with exactly one ERP write, and every run ends green. With the api-server down the
    sandbox's deliveries fail and are retried until the restarted receiver takes them."""
    env, server = stack.env, stack.server
    _quiesce(stack)
    accounts = env.dynamics_rows(
        "accounts", ["accountid", "accountnumber"], "startswith(accountnumber,'ACC-')"
    )
    ids = {a["accountnumber"]: a["accountid"] for a in accounts}
    numbers = sorted(ids)[-6:]
    tag = f"{component[:5]} {int(time.time()) % 100_000}"
    values = {number: f"{tag} {i}" for i, number in enumerate(numbers)}
    runs_before = {r["dag_run_id"] for r in stack.runs()}
    inbox_after = max((e.id for e in env.store.inbox_events("customers")), default=0)
    audit_after = max((a["id"] for a in env.store.audit_log("customers", limit=1)), default=0)
    deliveries_after = max((d["id"] for d in env.sandbox.webhooks(limit=1)["deliveries"]), default=0)

    def outage(i: int) -> None:
        if i == 2:
            server.kill(component)
        elif i == 4:
            server.start(component)

    _person_edits(stack, values, outage)
    server.wait_healthy()
    _until(
        "every edit in the ERP",
        lambda: all(_city_in_erp(env, n) == v for n, v in values.items()),
        stack,
        180,
    )
    _quiesce(stack, 180)

    # the sandbox delivers every notification of the person's edits, retrying (with doubling
    # backoff) while the receiver was down: the last retry may come after the edits were synced
    # by a run that read the delta token, so wait for it
    ours = {ids[n] for n in numbers}

    def deliveries() -> list[dict[str, Any]]:
        log = env.sandbox.webhooks(limit=1000)["deliveries"]
        return [d for d in log if d["id"] > deliveries_after and d["record_id"] in ours]

    delivered = lambda: all(d["status"] == "delivered" for d in deliveries())  # noqa: E731
    _until("every notification delivered", delivered, stack)
    mine = deliveries()
    assert mine and {d["status"] for d in mine} == {"delivered"}, mine
    _quiesce(stack, 180)  # runs the late deliveries started
    if component == "api-server":
        assert any(d["attempts"] > 1 for d in mine), mine
    # the inbox holds each acknowledged notification once, done by one run
    person = [
        e
        for e in env.store.inbox_events("customers", after_id=inbox_after)
        if e.record_id in ours and e.status != "ignored"
    ]
    assert len(person) == len(numbers), person
    assert len({e.dedupe_key for e in person}) == len(person)
    assert all(e.status == "done" and e.run_id for e in person), person
    # exactly one ERP write per edited customer, by a run that ended green
    writes = [
        a
        for a in env.store.audit_log("customers", limit=1000)
        if a["id"] > audit_after and a["side"] == "erp" and a["record_key"] in values
    ]
    assert sorted(a["record_key"] for a in writes) == sorted(values), writes
    new = [r for r in stack.runs() if r["dag_run_id"] not in runs_before]
    assert new and all(r["state"] == "success" for r in new), new
