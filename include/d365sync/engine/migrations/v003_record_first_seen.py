"""Migration 3: a record remembers when the sync first saw it (``sync_record.first_seen_at``).

Why: sync lag is the time from a change to its landing, but a change the sync could not have
seen yet does not count. An initial load of legacy rows whose ``LAST_UPD`` is years old lands
minutes after the run started; measured from ``LAST_UPD`` alone the health page reported a lag
of years. ``first_seen_at`` is the start of the run that first stored the record; lag is
measured from ``max(change, first_seen_at)`` (:mod:`d365sync.engine.health`).

Existing rows get the start of their entity's first recorded run (the sync cannot have seen a
record before it first ran for that entity), else their ``updated_at``.
"""

from __future__ import annotations

from sqlalchemy import Column, Connection, MetaData, String, Table, func, select, text, update

from d365sync.engine.migrations.types import UtcDateTime

NAME = "record first seen"

_meta = MetaData()
_record = Table(
    "sync_record",
    _meta,
    Column("entity", String(64)),
    Column("updated_at", UtcDateTime),
    Column("first_seen_at", UtcDateTime),
)
_run = Table("sync_run", _meta, Column("entity", String(64)), Column("started_at", UtcDateTime))


def upgrade(conn: Connection) -> None:
    """Add ``first_seen_at`` and fill it for the records already stored."""
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
    target = Table("sync_record", MetaData(), schema=schema)
    table = conn.dialect.identifier_preparer.format_table(target)
    column_type = UtcDateTime().impl.compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN first_seen_at {column_type}"))
    first_run = select(func.min(_run.c.started_at)).where(_run.c.entity == _record.c.entity).scalar_subquery()
    conn.execute(update(_record).values(first_seen_at=func.coalesce(first_run, _record.c.updated_at)))
