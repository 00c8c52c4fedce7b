"""The sync state store: key map and merge base, watermarks, queues, audit log and run reports.

Why a store of its own (not Airflow Variables or XCom): the base is what makes the three-way
merge and the echo guard work, and watermarks must move only after the loads they cover
committed. SQLAlchemy Core, a SQLite file (WAL) by default, PostgreSQL in production; the
schema is versioned by ``d365sync.engine.migrations`` and upgraded on open.

Crash safety, the contract the planner follows:

1. ``reserve_keys`` before loading creates: the pairing (Dynamics id <-> ERP key) of a record
   about to be created is committed first, in state ``pending``. A rerun after a crash finds
   the same pairing (``load_base`` returns it, with no base) and upserts the *same* key: no
   duplicate, even when the target does not dedupe by alternate key.
2. ``save_base`` after each chunk's loads succeeded: key map and base of a record live in one
   row, so they are written together, in one transaction per chunk. A crash before it means
   the rerun merges again and replays the (idempotent) writes; a crash after it means the
   replayed changes are echoes.
3. ``commit_watermarks`` last: the extract of a rerun starts from the old watermark, so no
   change is lost; watermarks only move forward, and a backfill never touches a live token.

Memory is bounded by ``chunk_size``: every bulk API consumes iterables chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import islice
from typing import Any, Literal, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    case,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import ConnectionPoolEntry

from d365sync.engine import migrations
from d365sync.engine.bulk import execute_many
from d365sync.engine.codec import decode, encode
from d365sync.engine.inbox import InboxQueries
from d365sync.engine.merge import SIDES, Base
from d365sync.engine.migrations import schema as t
from d365sync.engine.pii import mask_fields
from d365sync.engine.privacy import Privacy, erased_key

T = TypeVar("T")
DEFAULT_CHUNK = 1000
DEFAULT_URL = "sqlite:///sync_state.db"
ACTIVE = ("pending", "replay")  # dead-letter statuses still waiting for a retry


class StateError(RuntimeError):
    """The state store refuses an operation that would corrupt it."""


class KeyMapConflict(StateError):
    """A Dynamics id or an ERP key is already paired with something else: a duplicate."""


# --- value objects ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPair:
    """One record's identity on both sides; either may be None before the record exists there."""

    dynamics_id: str | None
    erp_key: str | None


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A key map row: the pairing, its state (pending | synced) and the merge base (if synced)."""

    record_id: int
    dynamics_id: str | None
    erp_key: str | None
    status: str
    base: Base | None


@dataclass(frozen=True, slots=True)
class BaseRow:
    """A record to save after its loads succeeded: both keys plus the merge's new base."""

    dynamics_id: str | None
    erp_key: str | None
    base: Base


@dataclass(frozen=True, slots=True)
class Watermark:
    """A committed watermark: a comparable value (datetime, int, str) and/or a delta token."""

    value: Any
    token: str | None
    run_id: str | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """A field parked for manual review, as the merge reported it.

    ``unseen`` names the sides whose value this run did not see (not extracted): refreshing an
    open item keeps the value it holds for them.
    """

    record_key: str
    field: str
    base: Any
    dynamics: Any
    erp: Any
    reason: str = ""
    unseen: Sequence[str] = ()
    changed: Mapping[str, datetime] | None = None  # side -> when it last changed (where it says)
    changed_by: Mapping[str, str] | None = None  # side -> who changed it last (where it says)


@dataclass(frozen=True, slots=True)
class Review:
    """A review queue row, open or decided."""

    id: int
    entity: str
    record_key: str
    field: str
    base: Any
    dynamics: Any
    erp: Any
    reason: str | None
    status: str
    decided_by: str | None = None
    decided_at: datetime | None = None
    chosen: Any = None
    comment: str | None = None
    changed: dict[str, datetime] | None = None  # side -> when it last changed the value
    changed_by: dict[str, str] | None = None  # side -> who changed it last (a Dataverse user's name)


@dataclass(frozen=True, slots=True)
class Failure:
    """A record that failed a stage, to put in the dead-letter queue."""

    record_key: str
    error: str
    payload: Any = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-letter queue row."""

    id: int
    entity: str
    record_key: str
    stage: str
    error: str
    attempts: int
    status: str
    next_retry_at: datetime | None
    payload: Any


@dataclass(frozen=True, slots=True)
class ParkedChild:
    """A child record waiting for its parent (e.g. an order for its customer)."""

    record_key: str
    parent_entity: str
    parent_side: Literal["dynamics", "erp"]
    parent_key: str
    payload: Any = None
    reason: str = ""
    id: int | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One write made to one side; before/after are masked when stored."""

    record_key: str
    side: str
    operation: str
    fields: Sequence[str]
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RunReport:
    """What a run did for one entity: counts, timings and outcome."""

    run_id: str
    entity: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    progress: dict[str, Any] | None = None  # the last progress a long stage stored


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consume an iterable ``size`` items at a time: the memory bound of every bulk API."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _now(now: datetime | None = None) -> datetime:
    return now if now is not None else datetime.now(UTC)


# --- engine -------------------------------------------------------------------------------------


def _sqlite_pragmas(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
    """WAL lets the UI read while a run writes; busy_timeout rides over short write locks."""
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str = DEFAULT_URL, schema: str | None = None, **kwargs: Any) -> Engine:
    """An engine for the state database; ``schema`` places the tables in a PostgreSQL schema."""
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    if schema:
        engine = engine.execution_options(schema_translate_map={None: schema})
    return engine


class StateStore(InboxQueries):
    """The state store API. Thread-safe as an Engine is; one instance per process is enough.

    The event inbox (``inbox_*``, ``purge_inbox``) lives in :mod:`d365sync.engine.inbox`.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        upgrade: bool = True,
        privacy: Privacy | None = None,
    ) -> None:
        self.engine = engine
        self.chunk_size = chunk_size
        #: the personal-data cipher and ``pii`` fields (default: keys from the environment)
        self.privacy = privacy if privacy is not None else Privacy.from_env()
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        if upgrade:
            migrations.upgrade(engine)

    @classmethod
    def open(cls, url: str = DEFAULT_URL, *, schema: str | None = None, **kwargs: Any) -> StateStore:
        """Open (and upgrade) the store at ``url``; SQLite files get WAL."""
        return cls(make_engine(url, schema), **kwargs)

    def close(self) -> None:
        """Release every pooled connection (tests turn leaked ones into errors)."""
        self.engine.dispose()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        """The applied migration version."""
        return migrations.current_version(self.engine)

    # --- key map and merge base ---------------------------------------------------------------

    def reserve_keys(
        self, entity: str, pairs: Iterable[KeyPair], run_id: str, *, unseen: bool = False
    ) -> int:
        """Commit the pairing of records about to be created, before the load (crash safety, 1).

        ``unseen``: the caller knows that the store holds none of these keys (an entity's first
        run, whose store held nothing of it), so they are inserted without looking them up.
        """
        count = 0
        for chunk in chunks(pairs, self.chunk_size):
            with self.engine.begin() as conn:
                rows = [(p.dynamics_id, p.erp_key, None) for p in chunk]
                count += self._store_rows(conn, entity, run_id, rows, unseen=unseen)
        return count

    def reserved_keys(self, entity: str, erp_keys: Iterable[str]) -> set[str]:
        """The keys among ``erp_keys`` already paired in the key map, reserved or synced: the
        record may exist on both sides, so a load must not assume it is new."""
        found: set[str] = set()
        with self.engine.connect() as conn:
            for chunk in chunks(erp_keys, self.chunk_size):
                query = select(t.record.c.erp_key).where(
                    t.record.c.entity == entity, t.record.c.erp_key.in_(chunk)
                )
                found.update(conn.execute(query).scalars())
        return found

    def save_base(self, entity: str, rows: Iterable[BaseRow], run_id: str, *, reserved: bool = False) -> int:
        """Store the new base of records whose loads succeeded, key map included, per chunk.

        ``reserved``: the caller knows that each row is a record this run created after
        reserving its key, in an entity's first run (the store held nothing else of it). Its
        pending key-map row is then updated by key, without looking the keys up first. A chunk
        in which any row finds no such row is stored the checked way instead (the same values,
        so the rows the first attempt did update are simply written again). That needs the
        driver to count the rows an ``executemany`` matched (SQLite and psycopg2 do); without
        it every chunk takes the checked way.
        """
        count = 0
        for chunk in chunks(rows, self.chunk_size):
            pairs = [(r.dynamics_id, r.erp_key, r.base) for r in chunk]
            with self.engine.begin() as conn:
                if not (reserved and self._claim_reserved(conn, entity, run_id, pairs)):
                    self._store_rows(conn, entity, run_id, pairs)
                count += len(pairs)
        return count

    def _claim_reserved(
        self, conn: Connection, entity: str, run_id: str, rows: list[tuple[str | None, str | None, Base]]
    ) -> bool:
        """Fill this run's pending reservations with their bases; False if any row found none."""
        if not conn.dialect.supports_sane_multi_rowcount or any(e is None for _, e, _ in rows):
            return False
        now = _now()
        params = [
            _record_values(entity, _guid(d), e, b, run_id, now, self.privacy) | {"_key": e, "_dyn": _guid(d)}
            for d, e, b in rows
        ]
        c = t.record.c
        claim = (
            update(t.record)
            .where(
                c.entity == entity,
                c.erp_key == bindparam("_key"),
                c.status == "pending",
                c.run_id == run_id,
                or_(c.dynamics_id.is_(None), c.dynamics_id == bindparam("_dyn")),
            )
            .values({name: bindparam(name) for name in params[0] if name not in _CLAIM_FIXED})
        )
        return execute_many(conn, claim, params) == len(params)

    def load_base(self, entity: str, side: str, keys: Iterable[str]) -> dict[str, StoredRecord]:
        """Key map rows (with their base) for the given keys of one side, fetched per chunk.

        An ERP key whose subject was erased (``d365sync privacy erase``) finds its tombstone: the
        pairing with status ``erased`` and no base, like a reserved pair, so the next run that sees
        the key again upserts the same record instead of creating a second one.
        """
        column = self._key_column(side)
        found: dict[str, StoredRecord] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(keys, self.chunk_size):
                query = select(t.record).where(t.record.c.entity == entity, column.in_(chunk))
                for row in conn.execute(query):
                    stored = self._stored(row._mapping)
                    if side == "dynamics" or stored.status != "erased":
                        found[row._mapping[column.name]] = stored
                if side == "erp":
                    found |= self._tombstones(conn, entity, [k for k in chunk if k not in found])
        return found

    def _tombstones(self, conn: Connection, entity: str, keys: list[str]) -> dict[str, StoredRecord]:
        hashed = {erased_key(entity, k): k for k in keys}
        if not hashed:
            return {}
        query = select(t.record).where(t.record.c.entity == entity, t.record.c.erp_key.in_(list(hashed)))
        out = {}
        for row in conn.execute(query).mappings():
            key = hashed[row["erp_key"]]
            out[key] = StoredRecord(row["id"], row["dynamics_id"], key, row["status"], None)
        return out

    def holds_anything(self, entity: str) -> bool:
        """Whether the store knows any record, open or decided review, or active dead letter of
        ``entity`` (an entity's first run knows none: its per-key look-ups can be skipped)."""
        queries = (
            select(t.record.c.id).where(t.record.c.entity == entity),
            select(t.review.c.id).where(
                t.review.c.entity == entity, t.review.c.status.in_(("open", "decided"))
            ),
            select(t.dead_letter.c.id).where(
                t.dead_letter.c.entity == entity, t.dead_letter.c.status.in_(ACTIVE)
            ),
        )
        with self.engine.connect() as conn:
            return any(conn.execute(query.limit(1)).first() is not None for query in queries)

    def iter_base(self, entity: str) -> Iterator[list[StoredRecord]]:
        """Every record of an entity, a chunk at a time in id order (reconciliation, reports)."""
        last = 0
        while True:
            query = (
                select(t.record)
                .where(t.record.c.entity == entity, t.record.c.id > last, t.record.c.status != "erased")
                .order_by(t.record.c.id)
                .limit(self.chunk_size)
            )
            with self.engine.connect() as conn:
                rows = [self._stored(row._mapping) for row in conn.execute(query)]
            if not rows:
                return
            last = rows[-1].record_id
            yield rows

    def _key_column(self, side: str) -> Any:
        if side not in SIDES:
            raise StateError(f"unknown side {side!r}")
        return t.record.c.dynamics_id if side == "dynamics" else t.record.c.erp_key

    def _store_rows(
        self,
        conn: Connection,
        entity: str,
        run_id: str,
        rows: list[tuple[str | None, str | None, Base | None]],
        *,
        unseen: bool = False,
    ) -> int:
        """Insert or update key map rows in bulk; a pairing that contradicts another is refused."""
        rows = list({(_guid(d), e): (_guid(d), e, b) for d, e, b in rows}.values())
        existing = {} if unseen else self._existing(conn, entity, rows)
        now = _now()
        seen: datetime | None = None
        inserts, updates = [], []
        for dyn_id, erp_key, base in rows:
            match = _match(existing, dyn_id, erp_key)
            values = _record_values(entity, dyn_id, erp_key, base, run_id, now, self.privacy)
            if match is None:
                seen = seen or self._run_started(conn, entity, run_id) or now
                inserts.append(values | {"first_seen_at": min(seen, now)})
            elif base is not None or match["status"] in ("pending", "erased"):
                updates.append({**_fill_keys(values, match), "_id": match["id"]})
        if inserts:
            execute_many(conn, t.record.insert(), inserts)
        if updates:
            cols = {c: bindparam(c) for c in updates[0] if c != "_id"}
            execute_many(
                conn, update(t.record).where(t.record.c.id == bindparam("_id")).values(cols), updates
            )
        return len(inserts) + len(updates)

    @staticmethod
    def _run_started(conn: Connection, entity: str, run_id: str) -> datetime | None:
        """When the run that sees a record for the first time started (its extract followed)."""
        where = and_(t.run.c.run_id == run_id, t.run.c.entity == entity)
        return conn.execute(select(t.run.c.started_at).where(where)).scalar_one_or_none()

    def _existing(
        self, conn: Connection, entity: str, rows: list[tuple[str | None, str | None, Base | None]]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """Current rows matching any key of the chunk, indexed by ('dynamics', id) / ('erp', key).

        An erased subject's tombstone matches by its Dynamics id or by its key's pseudonym, and
        counts as holding that key (or none): storing the pairing again revives it.
        """
        dyn_ids = [d for d, _, _ in rows if d is not None]
        erp_keys = [e for _, e, _ in rows if e is not None]
        hashed = {erased_key(entity, e): e for e in erp_keys}
        columns = select(t.record.c.id, t.record.c.dynamics_id, t.record.c.erp_key, t.record.c.status)
        # one indexed look-up per key column: SQLite answers an OR of two IN lists by scanning
        # every row of the entity, which made each chunk cost the size of the table
        lookups = [(t.record.c.dynamics_id, dyn_ids), (t.record.c.erp_key, [*erp_keys, *hashed])]
        found_rows = [
            row
            for column, values in lookups
            if values
            for row in conn.execute(columns.where(t.record.c.entity == entity, column.in_(values)))
        ]
        index: dict[tuple[str, str], dict[str, Any]] = {}
        for row in found_rows:
            found = dict(row._mapping)
            if found["status"] == "erased":
                found["erp_key"] = hashed.get(found["erp_key"] or "")
            if found["dynamics_id"] is not None:
                index["dynamics", found["dynamics_id"]] = found
            if found["erp_key"] is not None:
                index["erp", found["erp_key"]] = found
        return index

    # --- watermarks -----------------------------------------------------------------------------

    def stage_watermark(
        self,
        entity: str,
        side: str,
        run_id: str,
        value: Any = None,
        token: str | None = None,
        *,
        backfill: bool = False,
    ) -> None:
        """Record where this run's extract ended; nothing moves until :meth:`commit_watermarks`."""
        row = {"entity": entity, "side": side, "run_id": run_id, "value_json": encode(value), "token": token}
        row |= {"backfill": int(backfill), "staged_at": _now()}
        stmt = self._insert(t.watermark_pending)
        stmt = stmt.on_conflict_do_update(
            index_elements=["entity", "side", "run_id"],
            set_={k: stmt.excluded[k] for k in ("value_json", "token", "backfill", "staged_at")},
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, row)

    def commit_watermarks(self, entity: str, run_id: str) -> dict[str, Watermark]:
        """The commit step: promote this run's staged watermarks, never moving one backwards."""
        pending = t.watermark_pending
        with self.engine.begin() as conn:
            staged = conn.execute(
                select(pending).where(pending.c.entity == entity, pending.c.run_id == run_id)
            )
            for row in staged.mappings().all():
                self._promote(conn, row)
            conn.execute(pending.delete().where(pending.c.entity == entity, pending.c.run_id == run_id))
        return {side: mark for side in SIDES if (mark := self.watermark(entity, side)) is not None}

    def staged_watermark(self, entity: str, side: str, run_id: str) -> Watermark | None:
        """What :meth:`stage_watermark` recorded for this run (the load's freshness check reads
        the Dynamics delta token taken at extract), or None."""
        pending = t.watermark_pending
        query = select(pending).where(
            pending.c.entity == entity, pending.c.side == side, pending.c.run_id == run_id
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        return Watermark(decode(row["value_json"]), row["token"], run_id, row["staged_at"])

    def discard_watermarks(self, entity: str, run_id: str) -> None:
        """Forget a failed run's staged watermarks (a rerun stages its own)."""
        pending = t.watermark_pending
        with self.engine.begin() as conn:
            conn.execute(pending.delete().where(pending.c.entity == entity, pending.c.run_id == run_id))

    def watermark(self, entity: str, side: str) -> Watermark | None:
        """The committed watermark of one side, or None before the first commit."""
        query = select(t.watermark).where(t.watermark.c.entity == entity, t.watermark.c.side == side)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        return Watermark(decode(row["value_json"]), row["token"], row["run_id"], row["updated_at"])

    def reset_watermark(self, entity: str, side: str) -> None:
        """Operator action: forget a watermark so the next run does a full extract."""
        with self.engine.begin() as conn:
            conn.execute(
                t.watermark.delete().where(t.watermark.c.entity == entity, t.watermark.c.side == side)
            )

    def _promote(self, conn: Connection, staged: Mapping[str, Any]) -> None:
        key = {"entity": staged["entity"], "side": staged["side"]}
        current = (
            conn.execute(
                select(t.watermark).where(
                    t.watermark.c.entity == key["entity"], t.watermark.c.side == key["side"]
                )
            )
            .mappings()
            .first()
        )
        value, token = _next_watermark(current, staged)
        row = {"value_json": encode(value), "token": token, "run_id": staged["run_id"], "updated_at": _now()}
        if current is None:
            conn.execute(t.watermark.insert(), {**key, **row})
        else:
            where = and_(t.watermark.c.entity == key["entity"], t.watermark.c.side == key["side"])
            conn.execute(update(t.watermark).where(where).values(row))

    # --- review queue ---------------------------------------------------------------------------

    def open_reviews(self, entity: str, run_id: str, items: Iterable[ReviewItem]) -> int:
        """Park fields for review; an already open item for the same field is refreshed, not doubled.

        A side the item names as ``unseen`` keeps its stored value (SQL NULL in the new row).
        """
        stmt = self._insert(t.review)
        set_: dict[str, Any] = {k: stmt.excluded[k] for k in ("base_json", "reason", "updated_at")}
        kept = ("dynamics_json", "erp_json", "changes_json")
        set_ |= {k: func.coalesce(stmt.excluded[k], t.review.c[k]) for k in kept}
        stmt = stmt.on_conflict_do_update(
            index_elements=["entity", "record_key", "field"], index_where=t.ACTIVE_REVIEW, set_=set_
        )
        count = 0
        for chunk in chunks(items, self.chunk_size):
            now = _now()
            rows = [_review_row(entity, run_id, item, now, self.privacy) for item in chunk]
            with self.engine.begin() as conn:
                conn.execute(stmt, rows)
            count += len(rows)
        return count

    def reviews(self, entity: str | None = None, status: str = "open", limit: int = 1000) -> list[Review]:
        """Review items in one status, oldest first (the UI's queue)."""
        query = select(t.review).where(t.review.c.status == status).order_by(t.review.c.id).limit(limit)
        if entity is not None:
            query = query.where(t.review.c.entity == entity)
        with self.engine.connect() as conn:
            return [_review(row, self.privacy) for row in conn.execute(query).mappings()]

    def under_review(self, entity: str, keys: Iterable[str]) -> dict[str, set[str]]:
        """Fields with an open (undecided) item per record key: the merge keeps them parked."""
        found: dict[str, set[str]] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(keys, self.chunk_size):
                query = select(t.review.c.record_key, t.review.c.field).where(
                    t.review.c.entity == entity, t.review.c.status == "open", t.review.c.record_key.in_(chunk)
                )
                for key, name in conn.execute(query):
                    found.setdefault(key, set()).add(name)
        return found

    def decide_review(
        self, review_id: int, chosen: Any, by: str, comment: str | None = None, now: datetime | None = None
    ) -> Review:
        """Record a human decision: who, when, the chosen canonical value and why.

        The chosen value is sealed like the item's own values (a ``pii`` field, or values that
        are sealed already), whoever decides it.
        """
        with self.engine.begin() as conn:
            item = conn.execute(select(t.review).where(t.review.c.id == review_id)).mappings().first()
            stored = chosen
            if item is not None:
                stored = self.privacy.seal_field(item["entity"], item["field"], chosen)
                if stored is chosen and self.privacy.cipher is not None and _any_sealed(item):
                    stored = self.privacy.cipher.seal(chosen)
            values = {"status": "decided", "chosen_json": encode(stored), "decided_by": by}
            values |= {"comment": comment, "decided_at": _now(now), "updated_at": _now(now)}
            result = conn.execute(
                update(t.review).where(t.review.c.id == review_id, t.review.c.status == "open").values(values)
            )
            if result.rowcount != 1:
                raise StateError(f"review {review_id} is not open")
            row = conn.execute(select(t.review).where(t.review.c.id == review_id)).mappings().one()
            return _review(row, self.privacy)

    def decided_reviews(self, entity: str, keys: Iterable[str] | None = None) -> list[Review]:
        """Decisions not applied yet: the next run feeds them to the merge as ``decided``."""
        query = select(t.review).where(t.review.c.entity == entity, t.review.c.status == "decided")
        with self.engine.connect() as conn:
            if keys is None:
                rows = conn.execute(query.order_by(t.review.c.id)).mappings()
                return [_review(row, self.privacy) for row in rows]
            out: list[Review] = []
            for chunk in chunks(keys, self.chunk_size):
                rows = conn.execute(query.where(t.review.c.record_key.in_(chunk))).mappings()
                out.extend(_review(row, self.privacy) for row in rows)
            return out

    def mark_reviews_applied(self, review_ids: Iterable[int], run_id: str) -> int:
        """Close decisions once the run that applied them has committed."""
        return self._set_status(
            t.review, review_ids, "decided", "applied", applied_run_id=run_id, applied_at=_now()
        )

    def close_reviews(self, review_ids: Iterable[int], run_id: str) -> int:
        """Close open items whose conflict went away on its own (both sides agree again)."""
        return self._set_status(
            t.review, review_ids, "open", "closed", applied_run_id=run_id, applied_at=_now()
        )

    # --- dead-letter queue ----------------------------------------------------------------------

    def dead_letter(
        self,
        entity: str,
        stage: str,
        run_id: str,
        failures: Iterable[Failure],
        now: datetime | None = None,
        backoff: timedelta = timedelta(minutes=5),
        max_backoff: timedelta = timedelta(hours=24),
    ) -> int:
        """Queue failed records; a record failing again counts an attempt and backs off exponentially.

        A record has one active letter: the newest failure. Failing at another stage than its
        pending letter supersedes that letter (status ``superseded``); the new letter keeps the
        old payload's rows of the sides the new failure did not read, so the record's other
        side is still re-read when it is retried.
        """
        now = _now(now)
        count = 0
        for chunk in chunks(failures, self.chunk_size):
            with self.engine.begin() as conn:
                keys = [f.record_key for f in chunk]
                attempts = self._attempts(conn, entity, stage, keys)
                older = self._supersede(conn, entity, stage, keys, now)
                rows = {}  # one letter per record and stage: the last failure of the chunk wins
                for failure in chunk:
                    tries = attempts.get(failure.record_key, 0) + 1
                    delay = min(backoff * 2 ** (tries - 1), max_backoff)
                    failure = _with_older_sides(failure, older.get(failure.record_key, []))
                    rows[failure.record_key] = self._dead_letter_row(
                        entity, stage, run_id, failure, tries, now, now + delay
                    )
                self._upsert_dead_letters(conn, list(rows.values()))
                count += len(chunk)
        return count

    def active_dead_letters(
        self, entity: str, limit: int = 50_000, keys: Iterable[str] | None = None
    ) -> list[DeadLetter]:
        """Every pending or replay-requested letter of an entity (due or not), oldest first; with
        ``keys``, only the letters of those record keys (indexed, per chunk of keys)."""
        d = t.dead_letter
        query = select(d).where(d.c.entity == entity, d.c.status.in_(ACTIVE))
        with self.engine.connect() as conn:
            if keys is None:
                rows = conn.execute(query.order_by(d.c.id).limit(limit)).mappings()
                return [_dead(row, self.privacy) for row in rows]
            found = []
            for chunk in chunks(keys, self.chunk_size):
                found += conn.execute(query.where(d.c.record_key.in_(chunk))).mappings().all()
            return [_dead(row, self.privacy) for row in sorted(found, key=lambda r: r["id"])]

    def _supersede(
        self, conn: Connection, entity: str, stage: str, keys: list[str], now: datetime
    ) -> dict[str, list[Any]]:
        """Close the active letters of ``keys`` at other stages; returns their payloads by key."""
        d = t.dead_letter
        where = and_(
            d.c.entity == entity, d.c.stage != stage, d.c.status.in_(ACTIVE), d.c.record_key.in_(keys)
        )
        found: dict[str, list[Any]] = {}
        for key, payload in conn.execute(select(d.c.record_key, d.c.payload_json).where(where)):
            found.setdefault(key, []).append(self.privacy.reveal(decode(payload)))
        if found:
            conn.execute(update(d).where(where).values(status="superseded", resolved_at=now))
        return found

    def due_dead_letters(
        self, entity: str, now: datetime | None = None, limit: int = 2_000
    ) -> list[DeadLetter]:
        """Dead letters to retry on this run: asked for by a replay, then due by backoff.

        At most ``limit``: operator replays first, then the longest overdue. A letter that fails
        again backs off, so the next run takes the next ones and a large backlog is worked off
        over a few runs without any run paying for all of it.
        """
        d = t.dead_letter
        due = or_(d.c.status == "replay", and_(d.c.status == "pending", d.c.next_retry_at <= _now(now)))
        order = (case((d.c.status == "replay", 0), else_=1), d.c.next_retry_at, d.c.id)
        query = select(d).where(d.c.entity == entity, due).order_by(*order).limit(limit)
        with self.engine.connect() as conn:
            return [_dead(row, self.privacy) for row in conn.execute(query).mappings()]

    def dead_letters(self, entity: str | None = None, status: str = "pending") -> list[DeadLetter]:
        """Dead letters in one status (the UI's list)."""
        query = select(t.dead_letter).where(t.dead_letter.c.status == status).order_by(t.dead_letter.c.id)
        if entity is not None:
            query = query.where(t.dead_letter.c.entity == entity)
        with self.engine.connect() as conn:
            return [_dead(row, self.privacy) for row in conn.execute(query).mappings()]

    def replay_dead_letter(self, dead_letter_id: int, by: str) -> None:
        """Operator action: retry on the next run regardless of backoff."""
        if not self.replay_dead_letters([dead_letter_id], by):
            raise StateError(f"dead letter {dead_letter_id} is not pending")

    def replay_dead_letters(self, ids: Iterable[int], by: str) -> int:
        """:meth:`replay_dead_letter` for many (a group); returns how many were pending."""
        return self._set_status(t.dead_letter, ids, "pending", "replay", handled_by=by)

    def skip_dead_letter(self, dead_letter_id: int, reason: str, by: str) -> None:
        """Operator action: give up on a record, saying why (kept for the audit)."""
        if not self.skip_dead_letters([dead_letter_id], reason, by):
            raise StateError(f"dead letter {dead_letter_id} is not pending")

    def skip_dead_letters(self, ids: Iterable[int], reason: str, by: str) -> int:
        """:meth:`skip_dead_letter` for many (a group); returns how many were pending."""
        values = {"skip_reason": reason, "handled_by": by, "resolved_at": _now()}
        return self._set_status(t.dead_letter, ids, ("pending", "replay"), "skipped", **values)

    def resolve_dead_letters(self, entity: str, stage: str, record_keys: Iterable[str]) -> int:
        """Close the dead letters of records that went through on a retry."""
        d = t.dead_letter
        count = 0
        for chunk in chunks(record_keys, self.chunk_size):
            where = and_(d.c.entity == entity, d.c.stage == stage, d.c.record_key.in_(chunk))
            with self.engine.begin() as conn:
                result = conn.execute(
                    update(d)
                    .where(where, d.c.status.in_(ACTIVE))
                    .values(status="resolved", resolved_at=_now())
                )
                count += result.rowcount
        return count

    def _attempts(self, conn: Connection, entity: str, stage: str, keys: list[str]) -> dict[str, int]:
        d = t.dead_letter
        query = select(d.c.record_key, d.c.attempts).where(
            d.c.entity == entity,
            d.c.stage == stage,
            d.c.status.in_(ACTIVE),
            d.c.record_key.in_(keys),
        )
        return {key: attempts for key, attempts in conn.execute(query)}

    def _dead_letter_row(
        self,
        entity: str,
        stage: str,
        run_id: str,
        failure: Failure,
        attempts: int,
        now: datetime,
        next_retry: datetime,
    ) -> dict[str, Any]:
        row = {"entity": entity, "record_key": failure.record_key, "stage": stage, "error": failure.error}
        row |= {"attempts": attempts, "status": "pending", "run_id": run_id, "first_failed_at": now}
        payload = encode(self.privacy.seal_whole(entity, failure.payload))
        return row | {"last_failed_at": now, "next_retry_at": next_retry, "payload_json": payload}

    def _upsert_dead_letters(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert the chunk's letters in one statement; a record's active letter is updated."""
        if not rows:
            return
        stmt = self._insert(t.dead_letter)
        keep = ("error", "attempts", "status", "run_id", "last_failed_at", "next_retry_at", "payload_json")
        stmt = stmt.on_conflict_do_update(
            index_elements=["entity", "record_key", "stage"],
            index_where=t.ACTIVE_DEAD_LETTER,
            set_={k: stmt.excluded[k] for k in keep},
        )
        conn.execute(stmt, rows)

    # --- parked children ------------------------------------------------------------------------

    def park_children(self, entity: str, run_id: str, children: Iterable[ParkedChild]) -> int:
        """Park children whose parent is not synced yet; parking again counts an attempt."""
        p = t.parked
        stmt = self._insert(p)
        stmt = stmt.on_conflict_do_update(
            index_elements=["entity", "record_key"],
            index_where=t.PARKED,
            set_={
                "payload_json": stmt.excluded.payload_json,
                "reason": stmt.excluded.reason,
                "attempts": p.c.attempts + 1,
            },
        )
        count = 0
        for chunk in chunks(children, self.chunk_size):
            rows = [_parked_row(entity, run_id, child, self.privacy) for child in chunk]
            with self.engine.begin() as conn:
                conn.execute(stmt, rows)
            count += len(rows)
        return count

    def ready_children(self, entity: str) -> list[ParkedChild]:
        """Parked children whose parent now has a synced key map row: retry them this run."""
        p, r = t.parked, t.record
        parent_key = (p.c.parent_side == "dynamics") & (r.c.dynamics_id == p.c.parent_key) | (
            (p.c.parent_side == "erp") & (r.c.erp_key == p.c.parent_key)
        )
        query = (
            select(p)
            .join(r, and_(r.c.entity == p.c.parent_entity, r.c.status == "synced", parent_key))
            .where(p.c.entity == entity, p.c.status == "parked")
            .order_by(p.c.id)
        )
        with self.engine.connect() as conn:
            return [_child(row, self.privacy) for row in conn.execute(query).mappings()]

    def parked_children(self, entity: str) -> list[ParkedChild]:
        """Every child still waiting (for the plan and the UI)."""
        query = select(t.parked).where(t.parked.c.entity == entity, t.parked.c.status == "parked")
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(t.parked.c.id)).mappings()
            return [_child(row, self.privacy) for row in rows]

    def release_children(self, ids: Iterable[int], run_id: str) -> int:
        """Mark children synced once their run committed."""
        return self._set_status(
            t.parked, ids, "parked", "released", released_run_id=run_id, released_at=_now()
        )

    # --- audit log and run reports --------------------------------------------------------------

    def audit(self, run_id: str, entity: str, entries: Iterable[AuditEntry], actor: str) -> int:
        """Log every write with masked before/after values (e-mails and phones never stored clear)."""
        count = 0
        for chunk in chunks(entries, self.chunk_size):
            now = _now()
            rows = [_audit_row(run_id, entity, entry, actor, now, self.privacy) for entry in chunk]
            with self.engine.begin() as conn:
                execute_many(conn, t.audit.insert(), rows)
            count += len(rows)
        return count

    def audit_log(
        self,
        entity: str | None = None,
        run_id: str | None = None,
        record_key: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Audit rows, newest first, filtered by entity, run and/or record."""
        a = t.audit
        query = select(a).order_by(a.c.id.desc()).limit(limit)
        for column, value in ((a.c.entity, entity), (a.c.run_id, run_id), (a.c.record_key, record_key)):
            if value is not None:
                query = query.where(column == value)
        with self.engine.connect() as conn:
            return [_audit(row, self.privacy) for row in conn.execute(query).mappings()]

    def start_run(self, run_id: str, entity: str, now: datetime | None = None) -> None:
        """Open a run report (a retried run starts over)."""
        stmt = self._insert(t.run)
        row = {"run_id": run_id, "entity": entity, "status": "running", "started_at": _now(now)}
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "entity"],
            set_={
                "status": "running",
                "started_at": stmt.excluded.started_at,
                "finished_at": None,
                "error": None,
            },
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, row)

    def finish_run(
        self,
        run_id: str,
        entity: str,
        status: str,
        counts: Mapping[str, int] | None = None,
        timings: Mapping[str, float] | None = None,
        error: str | None = None,
    ) -> None:
        """Close a run report with its counts, timings and outcome."""
        values = {"status": status, "finished_at": _now(), "counts_json": encode(dict(counts or {}))}
        values |= {"timings_json": encode(dict(timings or {})), "error": error}
        where = and_(t.run.c.run_id == run_id, t.run.c.entity == entity)
        with self.engine.begin() as conn:
            if conn.execute(update(t.run).where(where).values(values)).rowcount != 1:
                raise StateError(f"run {run_id} of {entity} was never started")

    def note_progress(self, run_id: str, entity: str, progress: Mapping[str, Any]) -> None:
        """Store where a running stage is (:class:`d365sync.engine.progress.Progress`)."""
        where = and_(t.run.c.run_id == run_id, t.run.c.entity == entity)
        with self.engine.begin() as conn:
            conn.execute(update(t.run).where(where).values(progress_json=encode(dict(progress))))

    def run_report(self, run_id: str, entity: str) -> RunReport | None:
        """One run's report."""
        where = and_(t.run.c.run_id == run_id, t.run.c.entity == entity)
        with self.engine.connect() as conn:
            row = conn.execute(select(t.run).where(where)).mappings().first()
        return None if row is None else _run(row)

    def run_reports(self, entity: str, limit: int = 50) -> list[RunReport]:
        """An entity's latest runs, newest first."""
        query = select(t.run).where(t.run.c.entity == entity).order_by(t.run.c.started_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [_run(row) for row in conn.execute(query).mappings()]

    # --- helpers --------------------------------------------------------------------------------

    def _stored(self, row: Mapping[str, Any]) -> StoredRecord:
        return _stored(row, self.privacy)

    def _set_status(
        self, table: Any, ids: Iterable[int], current: str | tuple[str, ...], new: str, **values: Any
    ) -> int:
        """Move rows from one status to another, chunked; returns how many moved."""
        allowed = (current,) if isinstance(current, str) else current
        count = 0
        for chunk in chunks(ids, self.chunk_size):
            stmt = update(table).where(table.c.id.in_(chunk), table.c.status.in_(allowed))
            with self.engine.begin() as conn:
                count += conn.execute(stmt.values(status=new, **values)).rowcount
        return count


# --- row conversions ----------------------------------------------------------------------------


def _guid(value: str | None) -> str | None:
    """Dataverse GUIDs compare case-insensitively; store them lower-case and without braces."""
    return None if value is None else value.strip("{}").lower()


def _match(
    existing: dict[tuple[str, str], dict[str, Any]], dyn_id: str | None, erp_key: str | None
) -> dict[str, Any] | None:
    """The row this pairing belongs to; two rows or a contradicting key is a duplicate in the making."""
    by_dyn = existing.get(("dynamics", dyn_id)) if dyn_id is not None else None
    by_erp = existing.get(("erp", erp_key)) if erp_key is not None else None
    if by_dyn is not None and by_erp is not None and by_dyn["id"] != by_erp["id"]:
        raise KeyMapConflict(f"dynamics {dyn_id} and erp {erp_key} belong to different records")
    match = by_dyn or by_erp
    if match is not None:
        for column, key in (("dynamics_id", dyn_id), ("erp_key", erp_key)):
            if key is not None and match[column] is not None and match[column] != key:
                raise KeyMapConflict(f"{column} {match[column]} is already paired; refused {key}")
    return match


#: columns a claimed reservation already holds (its ``WHERE`` matched them): setting them
#: again would make SQLite rewrite the ``(entity, erp_key)`` index entry of every row
_CLAIM_FIXED = frozenset({"entity", "erp_key", "run_id", "_key", "_dyn"})


def _record_values(
    entity: str,
    dyn_id: str | None,
    erp_key: str | None,
    base: Base | None,
    run_id: str,
    now: datetime,
    privacy: Privacy,
) -> dict[str, Any]:
    values: dict[str, Any] = {"entity": entity, "dynamics_id": dyn_id, "erp_key": erp_key, "run_id": run_id}
    values["updated_at"] = now
    values["status"] = "pending" if base is None else "synced"
    values["base_json"] = None if base is None else encode(privacy.seal_values(entity, base.values))
    for side in SIDES:
        values[f"{side}_version"] = None if base is None else base.version(side)
        values[f"{side}_modified"] = None if base is None else base.modified(side)
    values["deleted_on"] = None if base is None else base.deleted_on
    return values


def _fill_keys(values: dict[str, Any], match: Mapping[str, Any]) -> dict[str, Any]:
    """Never erase a known key with None when updating a row."""
    return values | {c: values[c] or match[c] for c in ("dynamics_id", "erp_key")}


def _stored(row: Mapping[str, Any], privacy: Privacy) -> StoredRecord:
    """A key map row as the merge needs it: the base decrypted; a tombstone holds no key."""
    base = None
    if row["base_json"] is not None:
        base = Base(
            privacy.reveal(decode(row["base_json"])),
            dynamics_version=row["dynamics_version"],
            erp_version=row["erp_version"],
            dynamics_modified=row["dynamics_modified"],
            erp_modified=row["erp_modified"],
            deleted_on=row["deleted_on"],
        )
    erp_key = None if row["status"] == "erased" else row["erp_key"]
    return StoredRecord(row["id"], row["dynamics_id"], erp_key, row["status"], base)


def _next_watermark(current: Mapping[str, Any] | None, staged: Mapping[str, Any]) -> tuple[Any, str | None]:
    """Forward only: the larger value; a live run's token replaces the old one, a backfill's never."""
    new_value = decode(staged["value_json"])
    old_value = None if current is None else decode(current["value_json"])
    old_token = None if current is None else current["token"]
    value = _max(old_value, new_value)
    if staged["backfill"] or staged["token"] is None:
        return value, old_token
    if old_value is not None and new_value is not None and value is old_value and new_value != old_value:
        return value, old_token  # an older live extract: the newer token stays
    return value, staged["token"]


def _max(old: Any, new: Any) -> Any:
    if old is None or new is None:
        return new if old is None else old
    if type(old) is not type(new) and not (
        isinstance(old, (int, Decimal)) and isinstance(new, (int, Decimal))
    ):
        raise StateError(f"watermark type changed from {type(old).__name__} to {type(new).__name__}")
    return new if new > old else old


def _review_row(
    entity: str, run_id: str, item: ReviewItem, now: datetime, privacy: Privacy
) -> dict[str, Any]:
    def sealed(value: Any) -> str:
        return encode(privacy.seal_field(entity, item.field, value))

    row = {"entity": entity, "record_key": item.record_key, "field": item.field, "reason": item.reason}
    row |= {
        "base_json": sealed(item.base),
        "dynamics_json": None if "dynamics" in item.unseen else sealed(item.dynamics),
        "erp_json": None if "erp" in item.unseen else sealed(item.erp),
    }
    row |= {"status": "open", "opened_run_id": run_id, "opened_at": now, "updated_at": now}
    changes: dict[str, Any] = dict(item.changed or {})
    if item.changed_by:
        changes["by"] = dict(item.changed_by)
    row |= {"changes_json": encode(changes) if changes else None}
    return row


def _review(row: Mapping[str, Any], privacy: Privacy | None = None, *, display: bool = False) -> Review:
    """A review row; sealed values decrypted (``display``: unreadable ones shown as ``[encrypted]``)."""
    value = _opener(privacy, display)
    changes = decode(row.get("changes_json")) or {}
    by = changes.pop("by", None)
    return Review(
        row["id"],
        row["entity"],
        row["record_key"],
        row["field"],
        value(row["base_json"]),
        value(row["dynamics_json"]),
        value(row["erp_json"]),
        row["reason"],
        row["status"],
        row["decided_by"],
        row["decided_at"],
        value(row["chosen_json"]),
        row["comment"],
        changes or None,
        by,
    )


def _opener(privacy: Privacy | None, display: bool) -> Any:
    """Column text → value, sealed entries opened by ``privacy`` (a keyless one when None)."""
    privacy = privacy if privacy is not None else Privacy()
    reveal = privacy.display if display else privacy.reveal
    return lambda text: reveal(decode(text))


def _any_sealed(row: Mapping[str, Any]) -> bool:
    return any('"$pii"' in (row[c] or "") for c in ("base_json", "dynamics_json", "erp_json"))


def _with_older_sides(failure: Failure, older: list[Any]) -> Failure:
    """The failure's payload plus the rows of sides only a superseded letter had read."""
    payload = failure.payload if isinstance(failure.payload, dict) else None
    if payload is None or not older:
        return failure
    rows = list(payload.get("rows", []))
    sides = {r.get("side") for r in rows}
    for old in older:
        for row in (old or {}).get("rows", []) if isinstance(old, dict) else []:
            if row.get("side") not in sides:
                rows.append(row)
                sides.add(row.get("side"))
    return Failure(failure.record_key, failure.error, {**payload, "rows": rows})


def _dead(row: Mapping[str, Any], privacy: Privacy | None = None, *, display: bool = False) -> DeadLetter:
    return DeadLetter(
        row["id"],
        row["entity"],
        row["record_key"],
        row["stage"],
        row["error"],
        row["attempts"],
        row["status"],
        row["next_retry_at"],
        _opener(privacy, display)(row["payload_json"]),
    )


def _parked_row(entity: str, run_id: str, child: ParkedChild, privacy: Privacy) -> dict[str, Any]:
    row = {"entity": entity, "record_key": child.record_key, "parent_entity": child.parent_entity}
    row |= {"parent_side": child.parent_side, "parent_key": _parent_key(child), "reason": child.reason}
    row |= {"payload_json": encode(privacy.seal_whole(entity, child.payload))}
    row |= {"status": "parked", "attempts": 1}
    row |= {"parked_run_id": run_id, "parked_at": _now()}
    return row


def _parent_key(child: ParkedChild) -> str:
    return _guid(child.parent_key) if child.parent_side == "dynamics" else child.parent_key  # type: ignore[return-value]


def _child(row: Mapping[str, Any], privacy: Privacy) -> ParkedChild:
    return ParkedChild(
        row["record_key"],
        row["parent_entity"],
        row["parent_side"],
        row["parent_key"],
        privacy.reveal(decode(row["payload_json"])),
        row["reason"] or "",
        row["id"],
    )


def _audit_row(
    run_id: str, entity: str, entry: AuditEntry, actor: str, now: datetime, privacy: Privacy
) -> dict[str, Any]:
    def values(given: Mapping[str, Any] | None) -> str | None:
        return None if given is None else encode(privacy.seal_values(entity, mask_fields(dict(given))))

    before, after = values(entry.before), values(entry.after)
    row = {"run_id": run_id, "entity": entity, "record_key": entry.record_key, "side": entry.side}
    row |= {"operation": entry.operation, "fields_json": encode(sorted(entry.fields)), "actor": actor}
    row |= {"before_json": before, "after_json": after, "at": now}
    return row


def _audit(
    row: Mapping[str, Any], privacy: Privacy | None = None, *, display: bool = False
) -> dict[str, Any]:
    out = dict(row)
    value = _opener(privacy, display)
    for name in ("fields_json", "before_json", "after_json"):
        out[name.removesuffix("_json")] = value(out.pop(name))
    return out


def _run(row: Mapping[str, Any]) -> RunReport:
    return RunReport(
        row["run_id"],
        row["entity"],
        row["status"],
        row["started_at"],
        row["finished_at"],
        decode(row["counts_json"]) or {},
        decode(row["timings_json"]) or {},
        row["error"],
        decode(row.get("progress_json")),
    )
