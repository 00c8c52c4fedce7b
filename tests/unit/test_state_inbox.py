"""The event inbox of the state store on a SQLite file; ``tests/integration/test_state_postgres.py``
reruns these on PostgreSQL (where concurrent claims take ``FOR UPDATE SKIP LOCKED``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import exc

from d365sync.engine.inbox import InboxError, IncomingEvent
from d365sync.engine.state import StateStore

AT = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
ACCOUNT = "6F9619FF-8B86-D011-B42D-00C04FC964FF"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore.open(f"sqlite:///{tmp_path / 'state.db'}", chunk_size=3) as opened:
        yield opened


def change(n: int, entity: str = "customers", **fields: object) -> IncomingEvent:
    """The ``n``-th notification: a distinct record and operation."""
    values: dict[str, object] = {
        "source": "dataverse_webhook",
        "entity": entity,
        "table_name": "account",
        "record_id": f"00000000-0000-0000-0000-{n:012d}",
        "message": "Update",
        "dedupe_key": f"op-{n}",
        "attributes": ("name",),
    }
    return IncomingEvent(**(values | fields))  # type: ignore[arg-type]


def add(store: StateStore, count: int, entity: str = "customers", start: int = 0) -> None:
    store.inbox_add([change(n, entity) for n in range(start, start + count)], now=AT)


# --- adding -----------------------------------------------------------------------------------


def test_inbox_add_stores_ids_and_names_and_a_redelivery_adds_nothing(store: StateStore) -> None:
    event = change(
        1,
        record_id="{" + ACCOUNT + "}",
        attributes=("telephone1", "emailaddress1", "telephone1"),
        correlation_id="ABC-DEF",
        user_id="F00D-BEEF",
        depth=2,
        operation_created_on=AT,
    )
    first = store.inbox_add([event, change(2, ignored=True)], now=AT)
    assert (first.added, first.duplicates, first.ignored, first.duplicate) == (1, 0, 1, False)
    again = store.inbox_add([event, change(2, ignored=True)], now=AT + timedelta(seconds=5))
    assert (again.added, again.duplicates, again.ignored, again.duplicate) == (0, 2, 0, True)
    (row,) = store.inbox_pending("customers")
    assert row.record_id == ACCOUNT.lower()
    assert row.attributes == ("emailaddress1", "telephone1")
    assert (row.correlation_id, row.user_id, row.depth) == ("abc-def", "f00d-beef", 2)
    assert (row.operation_created_on, row.received_at, row.status) == (AT, AT, "new")
    assert [e.status for e in store.inbox_events("customers")] == ["new", "ignored"]


def test_inbox_same_notification_for_two_entities_is_two_rows(store: StateStore) -> None:
    result = store.inbox_add([change(1, "products"), change(1, "inventory")])
    assert result.added == 2
    assert store.inbox_add([change(1, "products")]).duplicate


def test_inbox_attributes_unknown_stay_unknown_and_erp_keys_keep_their_case(store: StateStore) -> None:
    erp = change(1, source="erp_poll", table_name="CUST_MASTER", record_id="Cust-42", attributes=None)
    store.inbox_add([erp])
    (row,) = store.inbox_pending("customers")
    assert (row.record_id, row.attributes) == ("Cust-42", None)


def test_inbox_add_is_one_transaction(store: StateStore) -> None:
    broken = change(2)
    object.__setattr__(broken, "table_name", None)  # slips past validation: NOT NULL refuses it
    with pytest.raises(exc.IntegrityError):
        store.inbox_add([change(1), broken])
    assert store.inbox_events() == []  # the good event was not committed either


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"source": "email"}, "unknown inbox source 'email'"),
        ({"message": "Assign"}, "unknown message 'Assign'"),
        ({"dedupe_key": ""}, "needs a dedupe_key"),
        ({"entity": ""}, "needs a entity"),
    ],
)
def test_inbox_event_is_checked_before_any_io(fields: dict[str, object], error: str) -> None:
    with pytest.raises(InboxError, match=error):
        change(1, **fields)


# --- head and pending -------------------------------------------------------------------------


def test_inbox_head_moves_with_events_that_can_start_a_run(store: StateStore) -> None:
    assert store.inbox_head() == 0 and store.inbox_head("customers") == 0
    add(store, 2)
    add(store, 1, "orders", start=10)
    assert store.inbox_head() == 3
    assert store.inbox_head("customers") == 2
    store.inbox_add([change(20, ignored=True)])  # the sync's own write: never starts a run
    assert store.inbox_head() == 3 and store.inbox_head("customers") == 2
    store.inbox_claim("customers", "r1")
    store.inbox_done("customers", "r1")
    assert store.inbox_head("customers") == 2  # the head is an arrival count, not a backlog


def test_inbox_pending_pages_through_new_events_without_claiming(store: StateStore) -> None:
    add(store, 5)
    first = store.inbox_pending("customers", limit=2)
    rest = store.inbox_pending("customers", after_id=first[-1].id)
    assert [e.dedupe_key for e in first + rest] == [f"op-{n}" for n in range(5)]
    assert store.inbox_pending("orders") == []
    store.inbox_claim("customers", "r1", limit=2)
    assert [e.dedupe_key for e in store.inbox_pending("customers")] == ["op-2", "op-3", "op-4"]


# --- claim, done, release ---------------------------------------------------------------------


def test_inbox_claim_takes_the_oldest_and_a_second_claimer_gets_the_rest(store: StateStore) -> None:
    add(store, 5)
    add(store, 2, "orders", start=10)
    first = store.inbox_claim("customers", "r1", limit=3, now=AT)
    assert [e.dedupe_key for e in first] == ["op-0", "op-1", "op-2"]
    assert {(e.status, e.run_id, e.claimed_at) for e in first} == {("claimed", "r1", AT)}
    second = store.inbox_claim("customers", "r2", now=AT)
    assert [e.dedupe_key for e in second] == ["op-3", "op-4"]  # no orders, nothing of r1's
    assert store.inbox_claim("customers", "r3", now=AT) == []


def test_inbox_done_closes_only_the_runs_own_claims(store: StateStore) -> None:
    add(store, 3)
    store.inbox_claim("customers", "r1", limit=2)
    assert store.inbox_done("customers", "r2") == 0
    assert store.inbox_done("orders", "r1") == 0
    assert store.inbox_done("customers", "r1", now=AT) == 2
    done = store.inbox_events("customers", "done")
    assert [(e.dedupe_key, e.done_at) for e in done] == [("op-0", AT), ("op-1", AT)]
    assert store.inbox_done("customers", "r1") == 0  # nothing left to close
    assert [e.dedupe_key for e in store.inbox_claim("customers", "r3")] == ["op-2"]


def test_inbox_release_gives_a_failed_runs_events_back(store: StateStore) -> None:
    add(store, 2)
    store.inbox_claim("customers", "r1")
    assert store.inbox_release("customers", "r1") == 2
    pending = store.inbox_pending("customers")
    assert [(e.status, e.run_id, e.claimed_at) for e in pending] == [("new", None, None)] * 2
    assert len(store.inbox_claim("customers", "r2")) == 2


def test_inbox_a_retried_run_gets_its_own_claims_back(store: StateStore) -> None:
    add(store, 2)
    store.inbox_claim("customers", "r1", limit=1, now=AT)
    add(store, 1, start=2)
    again = store.inbox_claim("customers", "r1", now=AT + timedelta(minutes=1))
    assert [e.dedupe_key for e in again] == ["op-0", "op-1", "op-2"]
    assert store.inbox_claim("customers", "r2", now=AT + timedelta(minutes=1)) == []


def test_inbox_stale_claims_and_claims_of_failed_runs_are_claimed_anew(store: StateStore) -> None:
    add(store, 2)
    store.inbox_claim("customers", "crashed", limit=1, now=AT)
    store.inbox_claim("customers", "failing", limit=1, now=AT + timedelta(minutes=50))
    soon = AT + timedelta(minutes=55)
    assert store.inbox_claim("customers", "r2", now=soon) == []  # both claims are young and alive
    store.start_run("failing", "customers", now=AT)
    store.finish_run("failing", "customers", "failed", error="boom")
    assert [e.dedupe_key for e in store.inbox_claim("customers", "r2", now=soon)] == ["op-1"]
    late = AT + timedelta(minutes=61)  # the first claim is older than an hour: abandoned
    assert [e.dedupe_key for e in store.inbox_claim("customers", "r3", now=late)] == ["op-0"]
    assert store.inbox_done("customers", "crashed") == 0  # its claim moved on; nothing to close
    custom = store.inbox_claim("customers", "r4", now=late, stale_after=timedelta(minutes=5))
    assert [e.dedupe_key for e in custom] == ["op-1"]  # r2's claim is six minutes old


def test_inbox_concurrent_claimers_never_share_an_event(store: StateStore) -> None:
    total, workers = 120, 4
    add(store, total)
    start = threading.Barrier(workers)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def claim(run_id: str) -> None:
        try:
            start.wait()
            mine: list[int] = []
            while batch := store.inbox_claim("customers", run_id, limit=7):
                mine += [e.id for e in batch if e.id not in mine]
                store.inbox_done("customers", run_id)
            claimed[run_id] = mine
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=claim, args=(f"run-{n}",)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    everything = [i for ids in claimed.values() for i in ids]
    assert len(everything) == len(set(everything)) == total  # each event exactly once
    done = store.inbox_events("customers", "done", limit=total + 1)
    assert len(done) == total
    assert {e.run_id for e in done} <= set(claimed)
    assert all(e.id in claimed[e.run_id or ""] for e in done)  # closed by the run that claimed it


# --- stats and retention ----------------------------------------------------------------------


def test_inbox_stats_count_per_status_with_the_oldest_waiting_event(store: StateStore) -> None:
    assert store.inbox_stats() == {}
    store.inbox_add([change(0), change(1)], now=AT)
    store.inbox_add([change(2), change(3, ignored=True)], now=AT + timedelta(minutes=5))
    store.inbox_add([change(9, "orders")], now=AT)
    store.inbox_claim("customers", "r1", limit=1)
    stats = store.inbox_stats()
    customers = stats["customers"]
    assert (customers.new, customers.claimed, customers.done, customers.ignored) == (2, 1, 0, 1)
    assert customers.oldest_new == AT  # op-1; op-0 is claimed
    assert customers.head == 3  # op-3 is ignored
    assert (stats["orders"].new, stats["orders"].head) == (1, 5)
    store.inbox_done("customers", "r1")
    assert store.inbox_stats()["customers"].done == 1


def test_purge_inbox_deletes_only_old_done_and_ignored_events(store: StateStore) -> None:
    store.inbox_add([change(0), change(1), change(2), change(3, ignored=True)], now=AT)
    store.inbox_add([change(4, ignored=True)], now=AT + timedelta(days=2))
    store.inbox_claim("customers", "old", limit=1, now=AT)
    store.inbox_done("customers", "old", now=AT)
    store.inbox_claim("customers", "young", limit=1, now=AT)
    store.inbox_done("customers", "young", now=AT + timedelta(days=2))
    store.inbox_claim("customers", "running", limit=1, now=AT)
    assert store.purge_inbox(AT + timedelta(days=1)) == 2  # op-0 (done) and op-3 (ignored)
    left = {e.dedupe_key: e.status for e in store.inbox_events("customers")}
    assert left == {"op-1": "done", "op-2": "claimed", "op-4": "ignored"}
    assert store.purge_inbox(AT + timedelta(days=30)) == 2  # never the claimed one
    assert [e.status for e in store.inbox_events()] == ["claimed"]


def test_inbox_event_values_round_trip_as_given(store: StateStore) -> None:
    event = change(1, message="Delete", attributes=(), depth=1)
    store.inbox_add([event, replace(event, dedupe_key="op-x", message="Create")], now=AT)
    stored = store.inbox_events("customers")
    assert [(e.message, e.attributes) for e in stored] == [("Delete", ()), ("Create", ())]
