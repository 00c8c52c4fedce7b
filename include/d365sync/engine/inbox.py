"""The event inbox: change notifications waiting for the run that syncs them, claimed by one run each.

Why: near-real-time sync starts a run seconds after a record changes. A Dataverse webhook, a
Service Bus message or an ERP poll adds a row here; a trigger watches :meth:`InboxQueries.inbox_head`
and starts the entity's run; the run claims the rows, syncs, and marks them done. The rows are
*hints*, not data: the run still reads the records through change tracking and the merge's echo
guard, so a lost hint only delays a change until the next scheduled run, and a duplicate one costs
an empty run at most.

Guarantees:

* **Durable acknowledgement.** :meth:`~InboxQueries.inbox_add` commits every event of a call in
  one transaction and returns after the commit; the receiver acknowledges only then.
* **Idempotent.** ``(source, entity, dedupe_key)`` is unique: a redelivered notification adds
  nothing and is counted as a duplicate.
* **One claimer.** :meth:`~InboxQueries.inbox_claim` moves rows ``new`` -> ``claimed`` under a
  write lock (PostgreSQL ``FOR UPDATE SKIP LOCKED``, SQLite ``BEGIN IMMEDIATE``): concurrent
  claimers never get the same row. A retry of the same run gets its own rows back; rows claimed by
  a run whose report says ``failed``, or claimed longer ago than ``stale_after``, are claimed anew.
* **No personal data.** Ids, table and entity names, the message and the *names* of the changed
  attributes; never a value. ``ignored`` rows (the sync's own writes) keep dedupe and counts but
  never start a run.

Statuses: ``new`` -> ``claimed`` -> ``done``, ``claimed`` -> ``new`` (released by a failed run),
and ``ignored`` from the start. :meth:`~InboxQueries.purge_inbox` deletes old ``done`` and
``ignored`` rows (``privacy.retention.inbox_days``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, get_args

from sqlalchemy import Connection, Engine, and_, delete, exists, func, or_, select, update

from d365sync.engine.migrations import schema as t

Source = Literal["dataverse_webhook", "servicebus", "erp_poll"]
Message = Literal["Create", "Update", "Delete"]
Status = Literal["new", "claimed", "done", "ignored"]
SOURCES: Final = frozenset(get_args(Source))
MESSAGES: Final = frozenset(get_args(Message))
DEFAULT_LIMIT: Final = 1000
#: a claim older than this is assumed abandoned (a run killed without its failure callback)
DEFAULT_STALE_AFTER: Final = timedelta(hours=1)
_DATAVERSE_SOURCES: Final = frozenset({"dataverse_webhook", "servicebus"})


class InboxError(ValueError):
    """An event that cannot go into the inbox (unknown source or message, missing key)."""


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """A change notification to add: what changed, never the values.

    ``attributes`` holds the changed attribute names (``None``: unknown, e.g. Dataverse dropped
    them from an oversized message; the run treats every attribute as possibly changed).
    ``ignored`` stores the event as ``ignored`` (the sync's own write): deduplicated and counted,
    but it never starts a run.
    """

    source: Source
    entity: str
    table_name: str
    record_id: str
    message: Message
    dedupe_key: str
    attributes: tuple[str, ...] | None = None
    correlation_id: str | None = None
    user_id: str | None = None
    depth: int | None = None
    operation_created_on: datetime | None = None
    ignored: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InboxError(f"unknown inbox source {self.source!r} (one of {', '.join(sorted(SOURCES))})")
        if self.message not in MESSAGES:
            raise InboxError(f"unknown message {self.message!r} (one of {', '.join(sorted(MESSAGES))})")
        for name in ("entity", "table_name", "record_id", "dedupe_key"):
            if not getattr(self, name):
                raise InboxError(f"an inbox event needs a {name}")


@dataclass(frozen=True, slots=True)
class InboxEvent:
    """An inbox row. ``id`` is the order of arrival; ``run_id`` the run that claimed it."""

    id: int
    source: str
    entity: str
    table_name: str
    record_id: str
    message: str
    attributes: tuple[str, ...] | None
    dedupe_key: str
    correlation_id: str | None
    user_id: str | None
    depth: int | None
    operation_created_on: datetime | None
    received_at: datetime
    status: str
    run_id: str | None
    claimed_at: datetime | None
    done_at: datetime | None


@dataclass(frozen=True, slots=True)
class InboxAddResult:
    """What one :meth:`~InboxQueries.inbox_add` stored: new rows, redeliveries, ignored rows."""

    added: int
    duplicates: int
    ignored: int

    @property
    def duplicate(self) -> bool:
        """Nothing was stored because everything had been delivered before."""
        return self.duplicates > 0 and self.added == 0 and self.ignored == 0


@dataclass(frozen=True, slots=True)
class InboxStats:
    """One entity's inbox: rows per status, the oldest unclaimed arrival, the head id."""

    entity: str
    new: int = 0
    claimed: int = 0
    done: int = 0
    ignored: int = 0
    oldest_new: datetime | None = None
    head: int = 0


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


class InboxQueries:
    """The inbox part of :class:`~d365sync.engine.state.StateStore` (a mixin: same engine)."""

    engine: Engine
    _insert: Any

    def inbox_add(self, events: Iterable[IncomingEvent], now: datetime | None = None) -> InboxAddResult:
        """Store events in one transaction, returning after the commit; redeliveries add nothing."""
        rows = [_row(event, _now(now)) for event in events]
        if not rows:
            return InboxAddResult(0, 0, 0)
        stmt = self._insert(t.inbox).on_conflict_do_nothing(index_elements=["source", "entity", "dedupe_key"])
        with self.engine.begin() as conn:
            stored = conn.execute(stmt.returning(t.inbox.c.status), rows).scalars().all()
        ignored = sum(status == "ignored" for status in stored)
        return InboxAddResult(len(stored) - ignored, len(rows) - len(stored), ignored)

    def inbox_head(self, entity: str | None = None, *, waiting_only: bool = False) -> int:
        """The newest event that may start a run (``ignored`` rows never do); 0 when none.
        ``waiting_only``: the newest still ``new`` (not claimed by a run yet).

        One indexed aggregate: cheap enough for a trigger to poll every second or two.
        """
        i = t.inbox
        wanted = i.c.status == "new" if waiting_only else i.c.status != "ignored"
        query = select(func.coalesce(func.max(i.c.id), 0)).where(wanted)
        if entity is not None:
            query = query.where(i.c.entity == entity)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def inbox_pending(self, entity: str, after_id: int = 0, limit: int = DEFAULT_LIMIT) -> list[InboxEvent]:
        """Unclaimed events of an entity after ``after_id``, oldest first (nothing is claimed)."""
        return self.inbox_events(entity, "new", after_id, limit)

    def inbox_events(
        self,
        entity: str | None = None,
        status: Status | None = None,
        after_id: int = 0,
        limit: int = DEFAULT_LIMIT,
    ) -> list[InboxEvent]:
        """Inbox rows in arrival order, filtered by entity and status (reports, the UI, tests)."""
        i = t.inbox
        query = select(i).where(i.c.id > after_id).order_by(i.c.id).limit(limit)
        if entity is not None:
            query = query.where(i.c.entity == entity)
        if status is not None:
            query = query.where(i.c.status == status)
        with self.engine.connect() as conn:
            return [_event(row) for row in conn.execute(query).mappings()]

    def inbox_claim(
        self,
        entity: str,
        run_id: str,
        limit: int = DEFAULT_LIMIT,
        *,
        stale_after: timedelta = DEFAULT_STALE_AFTER,
        now: datetime | None = None,
    ) -> list[InboxEvent]:
        """Claim up to ``limit`` events of an entity for ``run_id``, oldest first.

        Claimable: ``new`` rows; rows this run claimed before (a retried task gets them back);
        rows of a run whose report is ``failed``; rows claimed before ``now - stale_after``.
        Atomic: a concurrent claimer skips the rows this one locked and never gets the same row.
        """
        now = _now(now)
        i = t.inbox
        query = (
            select(i)
            .where(i.c.entity == entity, _claimable(run_id, now - stale_after))
            .order_by(i.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=i)
        )
        with self.engine.begin() as conn:
            _write_lock(conn)
            rows = [dict(row) for row in conn.execute(query).mappings()]
            if rows:
                ids = [row["id"] for row in rows]
                values = {"status": "claimed", "run_id": run_id, "claimed_at": now}
                conn.execute(update(i).where(i.c.id.in_(ids)).values(values))
        return [_event({**row, "status": "claimed", "run_id": run_id, "claimed_at": now}) for row in rows]

    def inbox_done(self, entity: str, run_id: str, now: datetime | None = None) -> int:
        """Close the events ``run_id`` claimed, once its run committed; returns how many."""
        return self._close_claims(entity, run_id, {"status": "done", "done_at": _now(now)})

    def inbox_release(self, entity: str, run_id: str) -> int:
        """Give a failed run's claimed events back (``new``) for the next run; returns how many."""
        return self._close_claims(entity, run_id, {"status": "new", "run_id": None, "claimed_at": None})

    def inbox_stats(self) -> dict[str, InboxStats]:
        """Rows per status, oldest unclaimed arrival and head, per entity (health, metrics)."""
        i = t.inbox
        query = select(
            i.c.entity, i.c.status, func.count(), func.min(i.c.received_at), func.max(i.c.id)
        ).group_by(i.c.entity, i.c.status)
        found: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for entity, status, count, oldest, newest in conn.execute(query):
                stats = found.setdefault(entity, {"entity": entity})
                stats[status] = count
                if status == "new":
                    stats["oldest_new"] = oldest
                if status != "ignored":
                    stats["head"] = max(stats.get("head", 0), newest)
        return {entity: InboxStats(**values) for entity, values in found.items()}

    def purge_inbox(self, older_than: datetime) -> int:
        """Delete ``done`` and ``ignored`` events closed (or, ignored, received) before ``older_than``."""
        i = t.inbox
        closed = func.coalesce(i.c.done_at, i.c.received_at)
        stmt = delete(i).where(i.c.status.in_(("done", "ignored")), closed < older_than)
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount

    def _close_claims(self, entity: str, run_id: str, values: Mapping[str, Any]) -> int:
        i = t.inbox
        where = and_(i.c.entity == entity, i.c.run_id == run_id, i.c.status == "claimed")
        with self.engine.begin() as conn:
            return conn.execute(update(i).where(where).values(values)).rowcount


def _claimable(run_id: str, stale_before: datetime) -> Any:
    i, r = t.inbox, t.run
    failed = exists().where(r.c.run_id == i.c.run_id, r.c.entity == i.c.entity, r.c.status == "failed")
    reclaim = or_(i.c.run_id == run_id, i.c.claimed_at < stale_before, failed)
    return or_(i.c.status == "new", and_(i.c.status == "claimed", reclaim))


def _write_lock(conn: Connection) -> None:
    """SQLite: take the write lock before reading what to claim (PostgreSQL locks the rows)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _row(event: IncomingEvent, now: datetime) -> dict[str, Any]:
    record_id = event.record_id
    if event.source in _DATAVERSE_SOURCES:
        record_id = record_id.strip("{}").lower()  # GUIDs compare case-insensitively
    attributes = None if event.attributes is None else json.dumps(sorted(set(event.attributes)))
    row = {"source": event.source, "entity": event.entity, "table_name": event.table_name}
    row |= {"record_id": record_id, "message": event.message, "attributes": attributes}
    row |= {"dedupe_key": event.dedupe_key, "correlation_id": _lower(event.correlation_id)}
    row |= {"user_id": _lower(event.user_id), "depth": event.depth}
    row |= {"operation_created_on": event.operation_created_on, "received_at": now}
    row |= {"status": "ignored" if event.ignored else "new", "run_id": None}
    row |= {"claimed_at": None, "done_at": None}
    return row


def _lower(value: str | None) -> str | None:
    return None if value is None else value.lower()


def _event(row: Mapping[str, Any]) -> InboxEvent:
    attributes = row["attributes"]
    return InboxEvent(
        id=row["id"],
        source=row["source"],
        entity=row["entity"],
        table_name=row["table_name"],
        record_id=row["record_id"],
        message=row["message"],
        attributes=None if attributes is None else tuple(json.loads(attributes)),
        dedupe_key=row["dedupe_key"],
        correlation_id=row["correlation_id"],
        user_id=row["user_id"],
        depth=row["depth"],
        operation_created_on=row["operation_created_on"],
        received_at=row["received_at"],
        status=row["status"],
        run_id=row["run_id"],
        claimed_at=row["claimed_at"],
        done_at=row["done_at"],
    )
