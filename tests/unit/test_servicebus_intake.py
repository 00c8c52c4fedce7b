"""The Service Bus source (issue 13): Dataverse's messages, as the provider's queue trigger hands
them to Airflow, into the event inbox of a real SQLite state store.

Service Bus itself is Microsoft's cloud. So the provider's real ``AzureServiceBusQueueTrigger``
runs with its ``MessageHook.read_message`` answering real ``ServiceBusReceivedMessage`` objects
(the Azure SDK's class, built from an AMQP message whose data section is the body Dataverse posts,
with Dataverse's brokered-message properties), and every event it yields becomes the Task SDK's
``AssetEventDagRunReferenceResult`` the way ``Trigger.submit_event`` records it:
``extra = {"from_trigger": True, "payload": event.payload}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.microsoft.azure.triggers.message_bus import AzureServiceBusQueueTrigger
from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiveMode
from azure.servicebus._pyamqp.message import Message as AmqpMessage
from azure.servicebus._pyamqp.message import Properties

from d365sync.airflow.servicebus import RejectedMessages, messages_of, store_messages
from d365sync.engine.inbox import InboxEvent
from d365sync.engine.intake import AppUsers, Intake, IntakeUnavailable
from d365sync.engine.state import StateStore
from tests.notifications import ACCOUNT, APP_USER, PERSON, context
from tests.ui.conftest import EMAIL, PHONE

QUEUE = "d365sync-notifications"
CLAIMS = "http://schemas.microsoft.com/xrm/2011/Claims/"
T0 = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def received(body: bytes, message_id: str) -> ServiceBusReceivedMessage:
    """A message as the Azure SDK receives it from a queue Dataverse posts to."""
    amqp = AmqpMessage(
        data=[body],
        properties=Properties(message_id=message_id.encode(), content_type=b"application/json"),
        application_properties={
            f"{CLAIMS}EntityLogicalName".encode(): b"account",
            f"{CLAIMS}RequestName".encode(): b"Update",
            f"{CLAIMS}Organization".encode(): b"contoso.crm.dynamics.com",
        },
    )
    return ServiceBusReceivedMessage(amqp, receive_mode=ServiceBusReceiveMode.PEEK_LOCK, receiver=None)


def trigger_payloads(bodies: list[bytes], monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Run the provider's trigger over these messages; the payloads of the events it yields."""
    trigger = AzureServiceBusQueueTrigger(
        queues=[QUEUE], azure_service_bus_conn_id="asb", poll_interval=0.001, max_wait_time=1
    )
    queue = deque(received(body, f"sb-{n}") for n, body in enumerate(bodies))
    completed: list[str] = []

    def read_message(queue_name: str, max_wait_time: float | None = None) -> Any:
        assert (queue_name, max_wait_time) == (QUEUE, 1)
        if not queue:
            return None
        message = queue.popleft()
        completed.append(message.message_id)  # the hook completes each message before returning it
        return message

    monkeypatch.setattr(trigger.message_hook, "read_message", read_message)

    async def collect() -> list[dict[str, Any]]:
        events, run = [], trigger.run()
        while len(events) < len(bodies):
            events.append((await asyncio.wait_for(anext(run), timeout=10)).payload)
        await run.aclose()
        return events

    payloads = asyncio.run(collect())
    assert completed == [f"sb-{n}" for n in range(len(bodies))]
    return payloads


def asset_events(payloads: list[dict[str, Any]], start: datetime = T0) -> list[Any]:
    """The run's triggering asset events, as the Task SDK hands them to the task."""
    from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult

    asset = {"name": "d365sync_servicebus", "uri": "d365sync://events/servicebus", "extra": {}}
    return [
        AssetEventDagRunReferenceResult(
            asset=asset,
            extra={"from_trigger": True, "payload": payload},
            source_task_id=None,
            source_dag_id=None,
            source_run_id=None,
            source_map_index=None,
            source_aliases=[],
            timestamp=start + timedelta(seconds=n),
        )
        for n, payload in enumerate(payloads)
    ]


def bodies(*contexts: Any) -> list[bytes]:
    return [c if isinstance(c, bytes) else json.dumps(c).encode() for c in contexts]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "state.db"
    StateStore.open(f"sqlite:///{path}").close()
    return path


def rows(db: Path) -> list[InboxEvent]:
    """What a separate connection sees: committed rows only."""
    with StateStore.open(f"sqlite:///{db}") as store:
        return store.inbox_events(limit=10_000)


def intake(own: frozenset[str] | None = frozenset({APP_USER})) -> Intake:
    def whoami() -> frozenset[str]:
        raise AssertionError("the configured application user ids are used, WhoAmI is not asked")

    return Intake("servicebus", AppUsers(own, whoami))


def deliver(db: Path, payloads: list[dict[str, Any]], via: Intake | None = None) -> dict[str, Any]:
    with StateStore.open(f"sqlite:///{db}") as store:
        return store_messages(asset_events(payloads), via or intake(), lambda: store)


# --- what the provider's trigger hands over ---------------------------------------------------


def test_the_provider_trigger_yields_the_body_as_text_and_the_queue_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = json.dumps(context()).encode()
    (payload,) = trigger_payloads([body], monkeypatch)
    # no MessageId, no brokered-message properties (Dataverse's claims): everything comes from the body
    assert payload == {"message": body.decode(), "queue": QUEUE}
    (message,) = messages_of(asset_events([payload]))
    assert (message.position, message.queue, message.at, message.body) == (1, QUEUE, T0, body.decode())


# --- stored as the webhook receiver stores it ---------------------------------------------------


def test_a_json_context_becomes_one_inbox_row_with_ids_and_names_only(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context()
    summary = deliver(db, trigger_payloads(bodies(ctx), monkeypatch))
    assert summary == {
        "messages": 1,
        "added": 1,
        "ignored": 0,
        "duplicates": 0,
        "not_stored": 0,
        "rejected": 0,
        "entities": ["customers"],
    }
    (row,) = rows(db)
    assert (row.source, row.entity, row.table_name, row.message, row.status) == (
        "servicebus",
        "customers",
        "account",
        "Update",
        "new",
    )
    assert row.record_id == ACCOUNT.lower() and row.user_id == PERSON
    assert row.attributes == ("address1_line1", "emailaddress1", "telephone1")
    assert row.dedupe_key == f"op:{ctx['OperationId']}:{ACCOUNT.lower()}:Update"
    assert row.correlation_id == ctx["CorrelationId"] and row.depth == 1
    assert row.operation_created_on == datetime(2017, 9, 26, 7, 4, 8, tzinfo=UTC)
    assert EMAIL not in repr(row) and PHONE not in repr(row)
    with StateStore.open(f"sqlite:///{db}") as store:
        assert store.inbox_head("customers", waiting_only=True) == row.id  # what InboxTrigger watches


def test_a_redelivery_adds_no_second_row(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dataverse retrying the post, or Service Bus redelivering after a lost lock: same OperationId."""
    ctx = context()
    twice = trigger_payloads(bodies(ctx, ctx), monkeypatch)  # both in one run
    assert deliver(db, twice) | {"entities": []} == {
        "messages": 2,
        "added": 1,
        "ignored": 0,
        "duplicates": 1,
        "not_stored": 0,
        "rejected": 0,
        "entities": [],
    }
    again = deliver(db, trigger_payloads(bodies(ctx), monkeypatch))  # and in a later run
    assert (again["added"], again["duplicates"]) == (0, 1)
    assert len(rows(db)) == 1
    deliver(db, trigger_payloads(bodies(context()), monkeypatch))  # another operation: a row
    assert len(rows(db)) == 2


def test_the_same_change_by_webhook_and_by_service_bus_is_one_row_each(db: Path) -> None:
    """Deduplication is per source: both carriers registered at once cost an extra row, not a change."""
    ctx = json.dumps(context())
    for source in ("dataverse_webhook", "servicebus"):
        via = Intake(source, AppUsers(frozenset(), lambda: frozenset()))
        deliver(db, [{"message": ctx, "queue": QUEUE}], via)
    assert sorted(r.source for r in rows(db)) == ["dataverse_webhook", "servicebus"]


@pytest.mark.parametrize("who", ["UserId", "InitiatingUserId"])
def test_the_syncs_own_writes_are_stored_ignored(db: Path, monkeypatch: pytest.MonkeyPatch, who: str) -> None:
    own = context(**{who: "{" + APP_USER.upper() + "}"})
    summary = deliver(db, trigger_payloads(bodies(own), monkeypatch))
    assert (summary["added"], summary["ignored"]) == (0, 1)
    (row,) = rows(db)
    assert row.status == "ignored"
    with StateStore.open(f"sqlite:///{db}") as store:
        assert store.inbox_head() == 0  # starts no run


def test_the_app_user_ids_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from d365sync.airflow import servicebus

    monkeypatch.setenv("D365SYNC_APP_USER_IDS", "{" + APP_USER.upper() + "}")
    monkeypatch.setenv("D365SYNC_DYNAMICS_CONN_ID", "nowhere")  # would fail if WhoAmI were asked
    assert servicebus.servicebus_intake().app_users.get() == frozenset({APP_USER})
    assert servicebus.servicebus_intake().source == "servicebus"


def test_tables_and_messages_no_entity_syncs_are_accepted_and_not_stored(db: Path) -> None:
    payloads = [
        {"message": json.dumps(context(table="contact")), "queue": QUEUE},
        {"message": json.dumps(context("Assign")), "queue": QUEUE},
    ]
    summary = deliver(db, payloads)
    assert (summary["not_stored"], summary["rejected"], summary["added"]) == (2, 0, 0)
    assert rows(db) == []


# --- bad messages: named, the rest stored -------------------------------------------------------


def test_a_malformed_message_is_named_and_the_rest_of_the_batch_is_stored(
    db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first, last = context(), context("Delete")
    broken = context(PrimaryEntityId=EMAIL)  # JSON, but not a notification: named by its OperationId
    xml = f"<RemoteExecutionContext><UserId>{PERSON}</UserId><Email>{EMAIL}</Email></RemoteExecutionContext>"
    payloads = trigger_payloads(
        bodies(first, xml.encode(), b'{"MessageName": "Upd', broken, last), monkeypatch
    )
    payloads.append({"unexpected": PHONE})  # an asset event someone made by hand: no payload.message

    with caplog.at_level(logging.DEBUG), pytest.raises(RejectedMessages) as raised:
        deliver(db, payloads)

    assert [(r.message, r.status) for r in rows(db)] == [("Update", "new"), ("Delete", "new")]  # committed
    error = str(raised.value)
    assert error.startswith("4 of 6 Service Bus message(s) rejected, not stored; the others are in the inbox")
    assert len(raised.value.rejected) == 4
    xml_line, json_line, broken_line, foreign_line = raised.value.rejected
    t = [(T0 + timedelta(seconds=n)).isoformat() for n in range(6)]
    assert xml_line.startswith(f"message 2 of 6 (queue {QUEUE}, asset event {t[1]}, body sha256:")
    assert xml_line.endswith(
        "the body is not JSON (the Dataverse service endpoint's message format must be JSON)"
    )
    assert json_line.startswith(f"message 3 of 6 (queue {QUEUE}, asset event {t[2]}, body sha256:")
    assert json_line.endswith("): the body is not JSON")
    assert broken_line == (
        f"message 4 of 6 (queue {QUEUE}, asset event {t[3]}, OperationId {broken['OperationId']}): "
        "PrimaryEntityId is not a GUID"
    )
    assert foreign_line == (
        f"message 6 of 6 (queue ?, asset event {t[5]}): "
        "not a message of the Service Bus queue trigger (no payload.message)"
    )
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert log.count("Service Bus message rejected") == 4
    for value in (EMAIL, PHONE):
        assert value not in error and value not in log


def test_rejected_messages_fail_the_task_at_once_and_a_store_outage_is_retried() -> None:
    from airflow.sdk import RetryAction

    from d365sync.airflow.retry import SyncRetryPolicy

    policy = SyncRetryPolicy()
    assert (
        policy.evaluate(RejectedMessages(["message 1 of 1 (queue q): bad"], 1), 1, 4).action
        is RetryAction.FAIL
    )
    outage = IntakeUnavailable("state store unavailable; retry")
    assert policy.evaluate(outage, 1, 4).action is RetryAction.DEFAULT


def test_a_store_outage_stores_nothing_and_the_retry_stores_everything(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = trigger_payloads(bodies(context(), context(table="salesorder")), monkeypatch)

    def down() -> Any:
        raise ConnectionError("state store down")

    with pytest.raises(IntakeUnavailable, match="state store unavailable; retry"):
        store_messages(asset_events(payloads), intake(), down)
    assert rows(db) == []
    summary = deliver(db, payloads)  # the task's retry: the same asset events
    assert (summary["added"], summary["entities"]) == (2, ["customers", "orders"])


# --- the task body, with the Task SDK's own accessor ----------------------------------------------


@pytest.fixture
def state_conn(db: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_STATE_DEFAULT", f"sqlite:///{db}")
    monkeypatch.setenv("D365SYNC_APP_USER_IDS", APP_USER)
    yield db


def _run_task(monkeypatch: pytest.MonkeyPatch, events: list[Any]) -> dict[str, Any]:
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    from d365sync.airflow import servicebus, tasks

    accessor = TriggeringAssetEventsAccessor.build(events)
    monkeypatch.setattr(tasks, "airflow_context", lambda: {"triggering_asset_events": accessor})
    return servicebus.servicebus_to_inbox()


def test_the_task_reads_the_triggering_asset_events(
    state_conn: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = trigger_payloads(bodies(context(), context(UserId=APP_USER)), monkeypatch)
    summary = _run_task(monkeypatch, asset_events(payloads))
    assert (summary["messages"], summary["added"], summary["ignored"]) == (2, 1, 1)
    assert sorted(r.status for r in rows(state_conn)) == ["ignored", "new"]


def test_a_run_without_asset_events_stores_nothing(state_conn: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run_task(monkeypatch, [])["messages"] == 0
    assert rows(state_conn) == []


# --- entity files ---------------------------------------------------------------------------------


def test_an_entity_fed_by_service_bus_claims_its_inbox_rows_and_gets_no_webhook(
    tmp_path: Path, db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``events: {dynamics: servicebus}``: the run claims the inbox like a webhook entity, and
    ``d365sync events register`` (webhook steps) leaves the entity out."""
    import shutil

    from d365sync.airflow.tasks import _claim_events
    from d365sync.cli import main
    from d365sync.spec import load_entities

    entities = tmp_path / "entities"
    shutil.copytree(Path(__file__).resolve().parents[2] / "include" / "entities", entities)
    for path in entities.glob("*.yaml"):  # no entity on the webhook: customers on Service Bus
        lines = [line for line in path.read_text().splitlines() if not line.startswith("events:")]
        path.write_text("\n".join(lines) + "\n")
    with (entities / "customers.yaml").open("a") as f:
        f.write("events: {dynamics: servicebus}\n")
    spec = load_entities(entities)["customers"]
    assert spec.events.inbox and spec.events.dynamics == "servicebus"

    deliver(db, [{"message": json.dumps(context()), "queue": QUEUE}])
    with StateStore.open(f"sqlite:///{db}") as store:
        assert _claim_events(store, spec, "run-1") == 1

    url = "http://127.0.0.1:9/d365sync/events/dataverse"  # port 9: nothing may connect there
    assert main(["events", "register", "--url", url, "--entities-dir", str(entities)]) == 0
    assert "nothing to register" in capsys.readouterr().out
