"""Migration 2: dead letters keep the failing record's payload, and due retries are indexed.

Why: replaying a dead letter needs the record as it was when it failed (the source may have
moved on), and the scheduler asks "what is due" on every run.
"""

from __future__ import annotations

from sqlalchemy import Column, Connection, Index, MetaData, String, Table, text

from d365sync.engine.migrations.types import UtcDateTime

NAME = "dead letter payload and due-retry index"

_dead_letter = Table(
    "sync_dead_letter",
    MetaData(),
    Column("entity", String(64)),
    Column("status", String(16)),
    Column("next_retry_at", UtcDateTime),
)


def upgrade(conn: Connection) -> None:
    """Add the payload column and the due-retry index."""
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
    target = Table("sync_dead_letter", MetaData(), schema=schema)
    table = conn.dialect.identifier_preparer.format_table(target)
    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN payload_json TEXT"))
    Index(
        "ix_sync_dead_letter_due", _dead_letter.c.entity, _dead_letter.c.status, _dead_letter.c.next_retry_at
    ).create(conn)
