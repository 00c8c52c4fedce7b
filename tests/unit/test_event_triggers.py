"""The event triggers (issue 13) against a real SQLite state store and a real SQLite ERP over ODBC.

The triggers run here as the triggerer runs them: ``run()`` is an async generator driven by an
event loop, connections come from ``AIRFLOW_CONN_*`` through ``BaseHook.aget_connection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from d365sync.airflow.triggers import ErpChangeTrigger, InboxTrigger
from d365sync.engine.events import as_timestamp, committed_erp_cursor, erp_cursor_max
from d365sync.engine.inbox import IncomingEvent
from d365sync.engine.state import StateStore
from d365sync.erp import ErpClient
from d365sync.erp.session import Session
from d365sync.sandbox.erp import sqlite_airflow_connection
from d365sync.sandbox.erp.seeder import init_sandbox
from d365sync.spec import load_entities

ENTITIES = Path(__file__).resolve().parents[2] / "include" / "entities"
QUIET = 0.6  # seconds a trigger is given to stay silent


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StateStore]:
    db = tmp_path / "state.db"
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_STATE_DEFAULT", f"sqlite:///{db}")
    with StateStore.open(f"sqlite:///{db}") as opened:
        yield opened


@pytest.fixture
def erp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ErpClient]:
    db = tmp_path / "erp.db"
    client = ErpClient(f"DRIVER={{SQLite3}};Database={db};")
    init_sandbox(client, rows=5, only=("CURR_CODE_MAP", "CUST_MASTER"))
    monkeypatch.setenv("AIRFLOW_CONN_ERP_DEFAULT", json.dumps(sqlite_airflow_connection(db)))
    yield client
    client.close()


def _event(n: int, entity: str = "customers", *, ignored: bool = False) -> IncomingEvent:
    return IncomingEvent(
        source="dataverse_webhook",
        entity=entity,
        table_name="account",
        record_id=f"00000000-0000-0000-0000-{n:012d}",
        message="Update",
        dedupe_key=f"op:{n}",
        attributes=("name",),
        ignored=ignored,
    )


class Listener:
    """Drives a trigger's ``run()`` in a task, as the triggerer does; events land in a queue."""

    def __init__(self, trigger: Any) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._drain(trigger.run()))

    async def _drain(self, events: AsyncIterator[Any]) -> None:
        async for event in events:
            await self.queue.put(event)

    async def next(self, timeout: float) -> Any:
        """The next event, or None if the trigger stays silent for ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            assert not self.task.done(), self.task.exception()  # silent, not dead
            return None

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def test_inbox_trigger_fires_once_per_new_waiting_event(store: StateStore) -> None:
    async def scenario() -> list[Any]:
        seen: list[Any] = []
        events = Listener(InboxTrigger("customers", poll_seconds=0.2))
        seen.append(await events.next(QUIET))  # empty inbox: silent
        store.inbox_add([_event(1), _event(2)])
        seen.append(await events.next(5))  # fires for the batch
        seen.append(await events.next(QUIET))  # nothing newer: silent
        store.inbox_add([_event(3, ignored=True), _event(4, entity="orders")])
        seen.append(await events.next(QUIET))  # our own write and another entity: silent
        store.inbox_claim("customers", "run-1")
        store.inbox_add([_event(5)])
        seen.append(await events.next(5))
        await events.close()
        return seen

    seen = asyncio.run(scenario())

    assert seen[0] is None and seen[2] is None and seen[3] is None
    assert seen[1].payload == {"entity": "customers", "source": "dataverse_webhook", "head": 2}
    assert seen[4].payload["head"] == 5


def test_inbox_trigger_after_a_restart_fires_for_what_is_still_waiting(store: StateStore) -> None:
    store.inbox_add([_event(1), _event(2)])
    store.inbox_claim("customers", "run-1")  # taken by a run: not waiting any more
    store.inbox_add([_event(3)])

    async def first() -> Any:
        events = Listener(InboxTrigger("customers", poll_seconds=0.2))
        try:
            return await events.next(5)
        finally:
            await events.close()

    assert asyncio.run(first()).payload["head"] == 3
    store.inbox_claim("customers", "run-2")
    assert asyncio.run(_silent(InboxTrigger("customers", poll_seconds=0.2)))


async def _silent(trigger: Any) -> bool:
    events = Listener(trigger)
    try:
        return await events.next(QUIET) is None
    finally:
        await events.close()


def _committed_up_to_now(store: StateStore, erp: ErpClient) -> datetime:
    """A committed run that read the ERP up to its current cursor maximum; that maximum."""
    newest = erp_cursor_max(erp, load_entities(ENTITIES)["customers"])
    assert newest is not None
    store.stage_watermark("customers", "erp", "run-0", token=json.dumps({"value": newest.isoformat()}))
    store.commit_watermarks("customers", "run-0")
    return newest


def test_erp_trigger_fires_when_the_cursor_column_moves_past_the_committed_watermark(
    store: StateStore, erp: ErpClient
) -> None:
    newest = _committed_up_to_now(store, erp)
    assert committed_erp_cursor(store, "customers") == newest

    later = (newest + timedelta(minutes=3)).strftime("%Y-%m-%d %H:%M:%S")

    async def scenario() -> list[Any]:
        events = Listener(ErpChangeTrigger("customers", poll_seconds=0.2))
        seen = [await events.next(QUIET)]  # nothing past the watermark: silent
        erp.execute([f"UPDATE CUST_MASTER SET LAST_UPD = '{later}' WHERE CUST_NO = 'C000000001'"])
        seen.append(await events.next(5))
        seen.append(await events.next(QUIET))  # the same maximum again: silent
        await events.close()
        return seen

    seen = asyncio.run(scenario())

    assert seen[0] is None and seen[2] is None
    assert seen[1].payload["source"] == "erp_poll"
    assert as_timestamp(seen[1].payload["cursor"]) == datetime.fromisoformat(later)


def test_a_quiet_erp_costs_one_query_per_poll_and_fires_nothing(
    store: StateStore, erp: ErpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every statement the trigger sends to the ERP, counted at the client: one per poll."""
    _committed_up_to_now(store, erp)
    statements: list[str] = []
    probes = 0

    class Counting:
        """A pyodbc cursor that records each statement (pyodbc's own type cannot be patched)."""

        def __init__(self, cursor: Any) -> None:
            self._cursor = cursor

        def execute(self, sql: str, *params: Any) -> Any:
            statements.append(sql)
            return self._cursor.execute(sql, *params)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cursor, name)

    run = Session.run
    monkeypatch.setattr(Session, "run", lambda self, unit: run(self, lambda cur: unit(Counting(cur))))
    probe = ErpChangeTrigger._probe

    def counted_probe(self: ErpChangeTrigger, state: dict[str, Any]) -> Any:
        nonlocal probes
        probes += 1
        return probe(self, state)

    monkeypatch.setattr(ErpChangeTrigger, "_probe", counted_probe)

    async def scenario() -> list[Any]:
        events = Listener(ErpChangeTrigger("customers", poll_seconds=0.2))
        seen = []
        for _ in range(100):  # until three polls are done (a loaded machine opens the ERP slowly)
            seen.append(await events.next(0.3))
            if probes >= 3:
                break
        await events.close()
        return seen

    assert set(asyncio.run(scenario())) == {None}
    assert probes >= 3
    assert len(statements) == probes, statements
    assert all(s.upper().startswith("SELECT MAX(") for s in statements), statements


def test_triggers_serialize_to_their_own_class_and_arguments() -> None:
    path, kwargs = InboxTrigger("orders", poll_seconds=2).serialize()
    assert path == "d365sync.airflow.triggers.InboxTrigger"
    assert kwargs == {"entity": "orders", "poll_seconds": 2.0}
    assert ErpChangeTrigger(**kwargs).serialize()[0] == "d365sync.airflow.triggers.ErpChangeTrigger"


def test_erp_probe_refuses_a_snapshot_table() -> None:
    snapshot = [s for s in load_entities(ENTITIES).values() if s.erp.change_detection.mode == "snapshot"]
    assert snapshot, "no snapshot entity to check"
    with pytest.raises(ValueError, match="no cursor column"):
        erp_cursor_max(object(), snapshot[0])


def test_spec_refuses_erp_polling_on_a_snapshot_table() -> None:
    from d365sync.spec import EntitySpec

    snapshot = next(s for s in load_entities(ENTITIES).values() if s.erp.change_detection.mode == "snapshot")
    data = snapshot.model_dump(by_alias=True, exclude_none=False)
    data["events"] = {"erp": "poll"}
    with pytest.raises(ValueError, match=r"events\.erp: poll needs"):
        EntitySpec.model_validate(data)


def test_register_command_without_event_entities_does_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No entity file asks for webhooks: nothing is registered, nothing is contacted, exit 0."""
    from d365sync.cli import main

    quiet = tmp_path / "entities"  # the shipped files with their `events:` lines taken out
    quiet.mkdir()
    for source in ENTITIES.glob("*.yaml"):
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
        (quiet / source.name).write_text("".join(x for x in lines if not x.startswith("events:")))
    assert not any(s.events.enabled for s in load_entities(quiet).values())
    url = "http://127.0.0.1:9/d365sync/events/dataverse"  # port 9: nothing may connect there
    assert main(["events", "register", "--url", url, "--entities-dir", str(quiet)]) == 0
    assert "nothing to register" in capsys.readouterr().out


def test_register_command_by_default_takes_the_shipped_event_entities(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The shipped customers and orders ask for webhooks: their tables are what register asks for."""
    from d365sync.cli import main

    url = "http://127.0.0.1:9/d365sync/events/dataverse"  # --dry-run: nothing is contacted
    assert main(["events", "register", "--url", url, "--entities-dir", str(ENTITIES), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(plan["tables"]) == ["account", "salesorder"]
    assert "address1_city" in plan["tables"]["account"]["filtering_attributes"]


def test_route_takes_the_fast_lane_only_for_an_event_started_run_with_a_small_batch(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``route`` of the shipped event-driven customers DAG: an ``asset_triggered`` run (an inbox or
    ERP-poll event, or the upstream's commit) with at most ``fast_lane_max`` waiting notifications
    runs ``sync_events``; a bigger burst, a dry run, a window, and every scheduled, manual or
    backfill run take the staged chain."""
    from types import SimpleNamespace

    from d365sync.airflow import tasks
    from d365sync.airflow.dag_factory import load_specs

    limit = load_specs()["customers"].events.fast_lane_max
    context: dict[str, Any] = {}
    monkeypatch.setattr(tasks, "airflow_context", lambda: context)
    monkeypatch.setattr(tasks, "state_store", lambda: contextlib.nullcontext(store))

    def lane(kind: str, **params: Any) -> Any:
        context.clear()
        context.update({"dag_run": SimpleNamespace(run_type=kind), "params": params})
        return tasks.route("customers")

    window = {"window_start": "2026-11-01T00:00:00+00:00", "window_end": "2026-11-02T00:00:00+00:00"}
    assert lane("asset_triggered") == tasks.FAST_LANE  # nothing waiting: ERP poll or upstream commit
    assert lane("asset_triggered", dry_run=True) == tasks.STAGED_LANE
    assert lane("asset_triggered", **window) == tasks.STAGED_LANE
    for kind in ("scheduled", "manual", "backfill"):
        assert lane(kind) == tasks.STAGED_LANE, kind
    store.inbox_add([_event(n) for n in range(1, limit + 1)])
    store.inbox_add([_event(n, ignored=True) for n in range(limit + 1, limit + 6)])  # our own writes
    assert lane("asset_triggered") == tasks.FAST_LANE  # exactly the limit waiting
    store.inbox_add([_event(limit + 6)])
    assert lane("asset_triggered") == tasks.STAGED_LANE  # one more: the staged chain
