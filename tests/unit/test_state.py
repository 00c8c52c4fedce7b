"""State store tests on a SQLite file; ``tests/integration/test_state_postgres.py`` reruns them on PG."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, select

from d365sync.engine import migrations
from d365sync.engine.merge import Base, EntityRules, FieldRule, RecordInput, SideRecord, merge_record
from d365sync.engine.migrations import schema, v001_initial
from d365sync.engine.pii import mask_value
from d365sync.engine.state import (
    AuditEntry,
    BaseRow,
    Failure,
    KeyMapConflict,
    KeyPair,
    ParkedChild,
    ReviewItem,
    StateError,
    StateStore,
    decode,
    encode,
    make_engine,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
GUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore.open(f"sqlite:///{tmp_path / 'state.db'}", chunk_size=3) as opened:
        yield opened


def base(**values: object) -> Base:
    return Base(values, 'W/"1"', "7", T0, T0 + timedelta(seconds=1))


# --- codec and masking --------------------------------------------------------------------------


def test_codec_round_trips_decimal_scale_and_dates() -> None:
    value = {"a": Decimal("10.50"), "d": T0, "day": T0.date(), "f": 0.1, "n": None, "s": "x"}
    assert decode(encode(value)) == value
    assert str(decode(encode(Decimal("10.50")))) == "10.50"


@pytest.mark.parametrize(
    ("field", "value", "masked"),
    [
        ("email", "john.doe@example.com", "j***@e***.com"),
        ("CUST_EMAIL_ID", "a@b.co.uk", "a***@b***.uk"),
        ("telephone1", "+33 6 12 34 56 12", "+33 *** *** 12"),
        ("note", "+33612345612", "+33 *** *** 12"),
        ("PHONE", "01 23 45 67 89", "*** *** 89"),
        ("name", "Acme", "Acme"),
        ("credit", Decimal(5), Decimal(5)),
    ],
)
def test_mask_value(field: str, value: object, masked: object) -> None:
    assert mask_value(field, value) == masked


# --- migrations ---------------------------------------------------------------------------------


def test_new_database_is_at_head_with_the_head_schema(store: StateStore) -> None:
    assert store.schema_version() == migrations.HEAD
    inspector = inspect(store.engine)
    for table in schema.metadata.sorted_tables:
        columns = {c["name"] for c in inspector.get_columns(table.name, schema=_schema(store))}
        assert columns == set(table.columns.keys()), table.name


def write_v1_data(engine: Engine) -> None:
    """A record and a run as a version-1 store wrote them (the frozen v1 tables, not today's code)."""
    with engine.begin() as conn:
        conn.execute(
            v001_initial.run.insert(),
            [
                {"run_id": "r0", "entity": "customers", "status": "success", "started_at": T0},
                {"run_id": "r1", "entity": "customers", "status": "success", "started_at": T0 + HOUR},
            ],
        )
        conn.execute(
            v001_initial.record.insert(),
            {
                "entity": "customers",
                "dynamics_id": GUID,
                "erp_key": "C1",
                "status": "synced",
                "base_json": encode({"name": "A"}),
                "dynamics_modified": T0 - timedelta(days=3000),
                "run_id": "r1",
                "updated_at": T0 + HOUR,
            },
        )


def test_old_database_is_upgraded_with_its_data(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        assert migrations.upgrade(engine, target=1) == 1
        write_v1_data(engine)
        with StateStore(engine) as upgraded:
            assert upgraded.schema_version() == migrations.HEAD
            assert upgraded.load_base("customers", "erp", ["C1"])["C1"].base.values == {"name": "A"}
            upgraded.dead_letter("customers", "load_erp", "r2", [Failure("C1", "boom", {"x": 1})])
            assert upgraded.dead_letters("customers")[0].payload == {"x": 1}
            # v3: a record stored before first_seen_at existed was first seen by its entity's first run
            assert first_seen(upgraded, "C1") == T0
    finally:
        engine.dispose()


def first_seen(store: StateStore, erp_key: str) -> datetime | None:
    query = select(schema.record.c.first_seen_at).where(schema.record.c.erp_key == erp_key)
    with store.engine.connect() as conn:
        return conn.execute(query).scalar_one()


def test_a_record_is_first_seen_by_the_run_that_first_stores_it(store: StateStore) -> None:
    store.start_run("r1", "customers", now=T0)
    store.reserve_keys("customers", [KeyPair(None, "C1")], "r1")
    store.save_base("customers", [BaseRow(GUID, "C1", base(name="A"))], "r1")
    store.start_run("r2", "customers", now=T0 + HOUR)
    store.save_base("customers", [BaseRow(GUID, "C1", base(name="B")), BaseRow(None, "C2", base())], "r2")
    assert first_seen(store, "C1") == T0  # reserved in r1; later saves keep it
    assert first_seen(store, "C2") == T0 + HOUR


def test_processes_opening_a_fresh_database_at_once_migrate_it_once(tmp_path: Path) -> None:
    # Every task of a DAG's first run opens the store at the same moment (seen in the demo:
    # "table sync_record already exists", "duplicate column name" on the losers).
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    barrier, errors = threading.Barrier(6), []

    def open_store() -> None:
        barrier.wait()
        try:
            StateStore.open(url).close()
        except Exception as exc:  # collected and asserted below
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    with StateStore.open(url) as opened:
        assert opened.schema_version() == migrations.HEAD


def test_upgrade_is_idempotent(store: StateStore) -> None:
    assert migrations.upgrade(store.engine) == migrations.HEAD


# --- key map and base ---------------------------------------------------------------------------


def test_base_round_trip_keeps_values_versions_and_timestamps(store: StateStore) -> None:
    stored = base(name="Acme", credit=Decimal("100.00"), since=T0)
    store.save_base("customers", [BaseRow(GUID.upper(), "C1", stored)], "r1")
    (found,) = store.load_base("customers", "dynamics", [GUID]).values()
    assert found.base == stored
    assert found.dynamics_id == GUID and found.erp_key == "C1" and found.status == "synced"
    assert store.load_base("customers", "erp", ["C1", "C2"]).keys() == {"C1"}


def test_load_base_is_chunked_and_iter_base_pages(store: StateStore) -> None:
    rows = [BaseRow(None, f"C{i}", base(n=i)) for i in range(10)]
    assert store.save_base("customers", iter(rows), "r1") == 10
    assert len(store.load_base("customers", "erp", (f"C{i}" for i in range(12)))) == 10
    pages = list(store.iter_base("customers"))
    assert [len(p) for p in pages] == [3, 3, 3, 1]


def test_key_map_is_unique_both_ways(store: StateStore) -> None:
    store.save_base("customers", [BaseRow(GUID, "C1", base())], "r1")
    with pytest.raises(KeyMapConflict):
        store.save_base("customers", [BaseRow(GUID, "C2", base())], "r2")
    store.save_base("customers", [BaseRow(None, "C2", base())], "r2")
    with pytest.raises(KeyMapConflict):
        store.save_base("customers", [BaseRow(GUID, "C2", base())], "r3")
    assert store.load_base("customers", "erp", ["C1"])["C1"].dynamics_id == GUID
    assert store.load_base("orders", "erp", ["C1"]) == {}  # per entity


def test_update_fills_the_missing_key_and_never_erases_one(store: StateStore) -> None:
    store.save_base("customers", [BaseRow(None, "C1", base(v=1))], "r1")
    store.save_base("customers", [BaseRow(GUID, "C1", base(v=2))], "r2")
    store.save_base("customers", [BaseRow(None, "C1", base(v=3))], "r3")
    found = store.load_base("customers", "erp", ["C1"])["C1"]
    assert (found.dynamics_id, found.base.values) == (GUID, {"v": 3})


def test_reserved_pairing_is_returned_without_base_until_saved(store: StateStore) -> None:
    store.reserve_keys("customers", [KeyPair(GUID, "C9")], "r1")
    store.reserve_keys("customers", [KeyPair(GUID, "C9")], "r1-retry")  # idempotent
    pending = store.load_base("customers", "dynamics", [GUID])[GUID]
    assert (pending.erp_key, pending.status, pending.base) == ("C9", "pending", None)
    with pytest.raises(KeyMapConflict):
        store.reserve_keys("customers", [KeyPair(GUID, "C10")], "r2")


def test_unseen_keys_are_reserved_without_a_look_up_and_saved_like_checked_ones(store: StateStore) -> None:
    """An entity's first run reserves keys it knows the store lacks without querying them; the
    rows are the same pending pairings, and saving their bases later finds them as usual."""
    from sqlalchemy import event

    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2].split()[0]))
    assert store.reserve_keys("customers", [KeyPair(None, f"N{i}") for i in range(7)], "r1", unseen=True) == 7
    unseen, statements[:] = statements.count("SELECT"), []
    assert store.reserve_keys("customers", [KeyPair(None, f"M{i}") for i in range(7)], "r1") == 7
    assert statements.count("SELECT") - unseen == 3  # the key look-up of each chunk of 3, skipped
    pending = store.load_base("customers", "erp", ["N0", "N6", "M1"])
    assert {k: (r.status, r.base) for k, r in pending.items()} == {
        "N0": ("pending", None),
        "N6": ("pending", None),
        "M1": ("pending", None),
    }
    store.save_base("customers", [BaseRow(GUID, "N6", base(v=1))], "r1")
    saved = store.load_base("customers", "erp", ["N6"])["N6"]
    assert (saved.dynamics_id, saved.status, saved.base.values) == (GUID, "synced", {"v": 1})
    assert len(store.load_base("customers", "dynamics", [GUID])) == 1  # one row: the reserved one


def _guid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def _key_map(store: StateStore, entity: str) -> list[tuple[object, ...]]:
    """An entity's key-map rows as stored, without the ids and times that differ between runs."""
    c = schema.record.c
    columns = [c.dynamics_id, c.erp_key, c.status, c.dynamics_version, c.erp_version]
    columns += [c.dynamics_modified, c.erp_modified, c.deleted_on, c.run_id]
    query = select(*columns, c.base_json).where(c.entity == entity).order_by(c.erp_key)
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
    return [(*row[:-1], store.privacy.reveal(decode(row[-1])) if row[-1] else None) for row in rows]


def test_bulk_rows_are_stored_as_sqlalchemy_stores_them(store: StateStore) -> None:
    """``execute_many`` (SQLite: compiled once, the rows handed to the driver as tuples) stores
    exactly what SQLAlchemy's ``executemany`` stores, aware datetimes and NULLs included. A
    timestamp is formatted once per statement: the same instant in another zone (an equal key)
    is stored alike, another instant differently."""
    from d365sync.engine.bulk import execute_many

    aware = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    at = [aware, aware.astimezone(UTC), aware, aware + timedelta(seconds=1)]
    rows = [
        {"run_id": "r", "entity": "bulk", "record_key": f"K{i}", "side": "erp", "operation": "create"}
        | {"fields_json": "[]", "before_json": None, "after_json": f'{{"v": {i}}}', "actor": "a", "at": at[i]}
        for i in range(4)
    ]
    a = schema.audit.c
    with store.engine.begin() as conn:
        assert execute_many(conn, schema.audit.insert(), rows) in (4, -1)
        conn.execute(schema.audit.insert(), [r | {"entity": "plain"} for r in rows])
    with store.engine.connect() as conn:
        stored = {
            entity: conn.execute(
                select(a.record_key, a.before_json, a.after_json, a.at)
                .where(a.entity == entity)
                .order_by(a.id)
            ).all()
            for entity in ("bulk", "plain")
        }
    assert stored["bulk"] == stored["plain"]
    assert stored["bulk"][2] == (
        "K2",
        None,
        '{"v": 2}',
        T0 + timedelta(microseconds=123456),
    )  # 14:00+02 is 12:00 UTC
    assert [r.at for r in stored["bulk"]] == [T0 + timedelta(microseconds=123456)] * 3 + [
        T0 + timedelta(seconds=1, microseconds=123456)
    ]
    with store.engine.connect() as conn:
        assert execute_many(conn, schema.audit.insert(), []) == 0


def test_reserved_creates_fill_their_reservations_without_a_look_up_and_store_what_checked_saves_do(
    store: StateStore,
) -> None:
    """A first run's creates update their own pending reservations by key, without a look-up
    query where the driver counts the rows an ``executemany`` matched. The rows end up
    exactly as the checked path leaves them (entity ``vendors`` here), and a chunk with a row
    that has no reservation of this run falls back to the checked path, losing or doubling none."""
    from sqlalchemy import event

    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    counts_rows = store.engine.dialect.supports_sane_multi_rowcount  # SQLite and psycopg2 do
    for entity, reserved in (("customers", True), ("vendors", False)):
        store.reserve_keys(entity, [KeyPair(None, f"N{i}") for i in range(5)], "r1", unseen=True)
        statements.clear()
        rows = [BaseRow(_guid(i).upper(), f"N{i}", base(v=i)) for i in range(5)]
        assert store.save_base(entity, rows, "r1", reserved=reserved) == 5
        looked_up = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        assert (looked_up == []) is (reserved and counts_rows)
        # the second chunk holds N5, never reserved, and N3x, reserved by another run
        store.reserve_keys(entity, [KeyPair(None, "N3x")], "r0")
        more = [BaseRow(_guid(6), "N5", base(v=5)), BaseRow(_guid(7), "N3x", base(v=3))]
        assert store.save_base(entity, more, "r1", reserved=reserved) == 2
    customers = _key_map(store, "customers")
    assert customers == _key_map(store, "vendors")
    assert [(row[1], row[0], row[2], row[-1]) for row in customers] == [
        *[(f"N{i}", _guid(i), "synced", {"v": i}) for i in range(4)],
        ("N3x", _guid(7), "synced", {"v": 3}),
        ("N4", _guid(4), "synced", {"v": 4}),
        ("N5", _guid(6), "synced", {"v": 5}),
    ]


# --- watermarks ---------------------------------------------------------------------------------


def test_watermark_moves_only_on_commit(store: StateStore) -> None:
    store.stage_watermark("customers", "erp", "r1", T0, None)
    assert store.watermark("customers", "erp") is None
    marks = store.commit_watermarks("customers", "r1")
    assert marks["erp"].value == T0 and marks["erp"].run_id == "r1"


def test_failed_run_discards_its_staged_watermark(store: StateStore) -> None:
    store.stage_watermark("customers", "dynamics", "r1", None, "token-1")
    store.discard_watermarks("customers", "r1")
    assert store.commit_watermarks("customers", "r1") == {}


def test_watermark_never_moves_backwards_and_backfill_keeps_the_live_token(store: StateStore) -> None:
    store.stage_watermark("customers", "dynamics", "live", T0, "tok-live")
    store.commit_watermarks("customers", "live")
    store.stage_watermark("customers", "dynamics", "bf", T0 - timedelta(days=30), "tok-bf", backfill=True)
    store.commit_watermarks("customers", "bf")
    mark = store.watermark("customers", "dynamics")
    assert (mark.value, mark.token) == (T0, "tok-live")
    store.stage_watermark("customers", "dynamics", "late", T0 - timedelta(hours=1), "tok-old")
    store.commit_watermarks("customers", "late")
    assert store.watermark("customers", "dynamics").token == "tok-live"
    store.stage_watermark("customers", "dynamics", "next", T0 + timedelta(hours=1), "tok-2")
    store.commit_watermarks("customers", "next")
    assert store.watermark("customers", "dynamics").token == "tok-2"


def test_watermark_type_change_is_refused(store: StateStore) -> None:
    store.stage_watermark("items", "erp", "r1", 10)
    store.commit_watermarks("items", "r1")
    store.stage_watermark("items", "erp", "r2", "x")
    with pytest.raises(StateError):
        store.commit_watermarks("items", "r2")


def test_reset_watermark(store: StateStore) -> None:
    store.stage_watermark("items", "erp", "r1", 10)
    store.commit_watermarks("items", "r1")
    store.reset_watermark("items", "erp")
    assert store.watermark("items", "erp") is None


# --- review queue -------------------------------------------------------------------------------


def test_review_lifecycle_open_decide_apply(store: StateStore) -> None:
    item = ReviewItem("INV1", "amount", Decimal("10.00"), Decimal("11.00"), Decimal("12.00"), "both changed")
    store.open_reviews("invoices", "r1", [item, item])  # parked twice in one run: one item
    again = ReviewItem("INV1", "amount", Decimal("10.00"), Decimal(13), Decimal(12))
    store.open_reviews("invoices", "r2", [again])
    (review,) = store.reviews("invoices")
    assert review.dynamics == Decimal(13) and review.base == Decimal("10.00")
    assert store.under_review("invoices", ["INV1", "INV2"]) == {"INV1": {"amount"}}
    decided = store.decide_review(review.id, Decimal("12.00"), by="alice", comment="ERP is right", now=T0)
    assert (decided.status, decided.decided_by, decided.decided_at, decided.chosen) == (
        "decided",
        "alice",
        T0,
        Decimal("12.00"),
    )
    with pytest.raises(StateError):
        store.decide_review(review.id, 1, by="bob")
    assert store.under_review("invoices", ["INV1"]) == {}
    assert [r.id for r in store.decided_reviews("invoices", ["INV1"])] == [review.id]
    assert store.mark_reviews_applied([review.id], "r3") == 1
    assert store.decided_reviews("invoices") == []
    store.open_reviews("invoices", "r4", [item])  # a new conflict later is a new item
    assert len(store.reviews("invoices")) == 1


def test_review_refresh_keeps_the_value_of_a_side_the_run_did_not_see(store: StateStore) -> None:
    store.open_reviews("customers", "r1", [ReviewItem("C1", "city", None, "Paris", "Lyon", "first sync")])
    refresh = ReviewItem("C1", "city", None, "Nice", None, "awaiting review decision", unseen=("erp",))
    store.open_reviews("customers", "r2", [refresh])
    (review,) = store.reviews("customers")
    assert (review.base, review.dynamics, review.erp, review.reason) == (
        None,
        "Nice",
        "Lyon",
        "awaiting review decision",
    )


def test_review_closed_when_the_conflict_went_away(store: StateStore) -> None:
    store.open_reviews("invoices", "r1", [ReviewItem("INV1", "amount", 1, 2, 3)])
    (review,) = store.reviews("invoices")
    assert store.close_reviews([review.id], "r2") == 1
    assert store.reviews("invoices") == [] and len(store.reviews("invoices", status="closed")) == 1


# --- dead letters -------------------------------------------------------------------------------


def test_dead_letter_backoff_replay_and_skip(store: StateStore) -> None:
    store.dead_letter("orders", "load_erp", "r1", [Failure("SO1", "timeout"), Failure("SO2", "bad")], now=T0)
    store.dead_letter("orders", "load_erp", "r2", [Failure("SO1", "timeout again")], now=T0)
    letters = {d.record_key: d for d in store.dead_letters("orders")}
    assert letters["SO1"].attempts == 2 and letters["SO1"].error == "timeout again"
    assert letters["SO1"].next_retry_at == T0 + timedelta(minutes=10)
    assert letters["SO2"].next_retry_at == T0 + timedelta(minutes=5)
    assert [d.record_key for d in store.due_dead_letters("orders", now=T0 + timedelta(minutes=6))] == ["SO2"]
    store.replay_dead_letter(letters["SO1"].id, by="ops")
    assert {d.record_key for d in store.due_dead_letters("orders", now=T0)} == {"SO1"}
    store.skip_dead_letter(letters["SO2"].id, reason="test data", by="ops")
    assert store.resolve_dead_letters("orders", "load_erp", ["SO1", "SO2"]) == 1
    assert store.dead_letters("orders") == [] and len(store.dead_letters("orders", "skipped")) == 1


def test_a_run_retries_a_bounded_share_of_the_backlog_replays_first(store: StateStore) -> None:
    keys = [f"SO{i}" for i in range(6)]
    for i, key in enumerate(keys):  # failed a minute apart: SO0 is the longest overdue
        store.dead_letter("orders", "validate", "r1", [Failure(key, "bad")], now=T0 + timedelta(minutes=i))
    later = T0 + timedelta(hours=1)
    assert [d.record_key for d in store.due_dead_letters("orders", now=later, limit=3)] == keys[:3]
    (last,) = [d for d in store.dead_letters("orders") if d.record_key == "SO5"]
    store.replay_dead_letter(last.id, by="ops")
    taken = [d.record_key for d in store.due_dead_letters("orders", now=later, limit=3)]
    assert taken == ["SO5", "SO0", "SO1"], "an operator's replay goes ahead of the backlog"
    # the first three fail again and back off: the next run takes the rest
    store.dead_letter("orders", "validate", "r2", [Failure(k, "bad") for k in taken], now=later)
    assert [d.record_key for d in store.due_dead_letters("orders", now=later, limit=3)] == [
        "SO2",
        "SO3",
        "SO4",
    ]


def test_dead_letter_backoff_is_capped(store: StateStore) -> None:
    for run in range(15):
        store.dead_letter("orders", "load", f"r{run}", [Failure("SO1", "x")], now=T0)
    assert store.dead_letters("orders")[0].next_retry_at == T0 + timedelta(hours=24)


# --- parked children ----------------------------------------------------------------------------


def test_parked_child_is_ready_when_its_parent_is_synced(store: StateStore) -> None:
    child = ParkedChild("SO1", "customers", "erp", "C1", {"total": Decimal("5.00")}, "customer C1 not synced")
    store.park_children("orders", "r1", [child, child])
    assert store.ready_children("orders") == []
    store.reserve_keys("customers", [KeyPair(None, "C1")], "r2")
    assert store.ready_children("orders") == []  # a pending parent is not there yet
    store.save_base("customers", [BaseRow(GUID, "C1", base())], "r2")
    (ready,) = store.ready_children("orders")
    assert ready.payload == {"total": Decimal("5.00")}
    assert store.release_children([ready.id], "r2") == 1
    assert store.parked_children("orders") == []


def test_parked_child_waiting_on_a_dynamics_parent(store: StateStore) -> None:
    store.park_children("orders", "r1", [ParkedChild("SO1", "customers", "dynamics", GUID.upper())])
    store.save_base("customers", [BaseRow(GUID, None, base())], "r2")
    assert [c.record_key for c in store.ready_children("orders")] == ["SO1"]


# --- audit and runs -----------------------------------------------------------------------------


def test_audit_masks_personal_data(store: StateStore) -> None:
    entry = AuditEntry(
        "C1",
        "erp",
        "update",
        ["email", "telephone1", "name"],
        before={"email": "john@example.com", "telephone1": "+33 6 12 34 56 12", "name": "A"},
        after={"email": "jane@example.org", "telephone1": "+33 6 99 99 99 34", "name": "B"},
    )
    assert store.audit("r1", "customers", [entry] * 4, actor="sync") == 4
    row = store.audit_log("customers", record_key="C1")[0]
    assert row["before"] == {"email": "j***@e***.com", "telephone1": "+33 *** *** 12", "name": "A"}
    assert row["after"]["email"] == "j***@e***.org"
    assert row["fields"] == ["email", "name", "telephone1"]
    assert (row["run_id"], row["side"], row["operation"], row["actor"]) == ("r1", "erp", "update", "sync")


def test_run_report(store: StateStore) -> None:
    store.start_run("r1", "customers", now=T0)
    store.finish_run("r1", "customers", "success", {"created": 3}, {"merge": 0.5})
    report = store.run_report("r1", "customers")
    assert (report.status, report.counts, report.timings, report.started_at) == (
        "success",
        {"created": 3},
        {"merge": 0.5},
        T0,
    )
    assert store.run_reports("customers")[0].run_id == "r1"
    with pytest.raises(StateError):
        store.finish_run("nope", "customers", "failed")


# --- crash between load and commit --------------------------------------------------------------

RULES = EntityRules("customers", (FieldRule("name", owner="dynamics"), FieldRule("credit", owner="erp")))


class FakeErp:
    """An ERP table that upserts by key, as the real loader does (staging + MERGE)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, object]] = {}

    def upsert(self, key: str, values: dict[str, object]) -> None:
        self.rows.setdefault(key, {}).update(values)


def run_sync(
    store: StateStore, erp: FakeErp, dynamics: dict[str, dict[str, object]], run: str, crash: bool
) -> None:
    """One run: extract since the watermark, merge, reserve, load, then (unless crashing) commit."""
    mark = store.watermark("customers", "dynamics")
    since = mark.value if mark else -1
    changed = {k: v for k, v in dynamics.items() if v["seq"] > since}
    known = store.load_base("customers", "dynamics", changed)
    erp_keys = {k: known[k].erp_key if k in known else f"C-{k}" for k in changed}
    store.reserve_keys("customers", [KeyPair(k, erp_keys[k]) for k in changed if k not in known], run)
    saved = []
    for key, row in changed.items():
        stored = known.get(key)
        side = SideRecord({"name": row["name"]}, None, str(row["seq"]))
        erp_side = SideRecord(erp.rows[erp_keys[key]]) if erp_keys[key] in erp.rows else None
        decision = merge_record(RULES, RecordInput(key, side, erp_side, stored.base if stored else None))
        if decision.erp is not None:
            erp.upsert(erp_keys[key], decision.erp.fields)
        saved.append(BaseRow(key, erp_keys[key], decision.base))
    high = max((v["seq"] for v in dynamics.values()), default=-1)
    store.stage_watermark("customers", "dynamics", run, high)
    if crash:
        return
    store.save_base("customers", saved, run)
    store.commit_watermarks("customers", run)


def test_crash_between_load_and_commit_leaves_no_duplicate_and_no_lost_change(store: StateStore) -> None:
    dynamics = {GUID: {"name": "Acme", "seq": 1}}
    erp = FakeErp()
    run_sync(store, erp, dynamics, "r1", crash=True)
    assert store.watermark("customers", "dynamics") is None  # nothing committed
    dynamics[GUID] = {"name": "Acme Corp", "seq": 2}  # a change lands before the rerun
    run_sync(store, erp, dynamics, "r1-retry", crash=False)
    assert erp.rows == {f"C-{GUID}": {"name": "Acme Corp"}}  # same reserved key: one record
    found = store.load_base("customers", "dynamics", [GUID])[GUID]
    assert found.base.values == {"name": "Acme Corp"} and found.status == "synced"
    assert store.watermark("customers", "dynamics").value == 2
    run_sync(store, erp, dynamics, "r3", crash=False)
    assert len(erp.rows) == 1


def test_crash_after_save_base_replays_as_echo(store: StateStore) -> None:
    dynamics = {GUID: {"name": "Acme", "seq": 1}}
    erp = FakeErp()
    run_sync(store, erp, dynamics, "r1", crash=False)
    store.reset_watermark("customers", "dynamics")  # as if the watermark commit never happened
    writes_before = dict(erp.rows)
    run_sync(store, erp, dynamics, "r2", crash=False)
    assert erp.rows == writes_before and len(erp.rows) == 1


def _schema(store: StateStore) -> str | None:
    options = store.engine.get_execution_options().get("schema_translate_map") or {}
    return options.get(None)


def test_a_running_run_stores_its_progress(store: StateStore) -> None:
    store.start_run("r1", "customers", T0)
    assert store.run_report("r1", "customers").progress is None  # type: ignore[union-attr]
    figures = {"stage": "load_dynamics", "done": 500, "total": 1000, "rate": 25.0, "eta_s": 20.0}
    store.note_progress("r1", "customers", figures)
    (report,) = store.run_reports("customers")
    assert report.status == "running" and report.progress == figures
