"""Migration 4: the event inbox (``sync_inbox``), change notifications waiting for a run.

Why a table in the state store: a Dataverse webhook is acknowledged only once its row has
committed, and an acknowledged notification must never be lost, so the inbox needs the same
durability as the watermarks. Runs claim rows (``new`` -> ``claimed`` -> ``done``) so two runs
never work on the same notification. Rows hold ids and changed attribute *names*, never values.

Frozen: never edit; change the table with a new migration and update ``schema.py``.
"""

from __future__ import annotations

from sqlalchemy import Column, Connection, Index, Integer, MetaData, String, Table, Text, UniqueConstraint

from d365sync.engine.migrations.types import IdType, UtcDateTime

NAME = "event inbox"

metadata = MetaData()

inbox = Table(
    "sync_inbox",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("source", String(32), nullable=False),
    Column("entity", String(64), nullable=False),
    Column("table_name", String(128), nullable=False),
    Column("record_id", String(255), nullable=False),
    Column("message", String(16), nullable=False),
    Column("attributes", Text),
    Column("dedupe_key", String(255), nullable=False),
    Column("correlation_id", String(64)),
    Column("user_id", String(64)),
    Column("depth", Integer),
    Column("operation_created_on", UtcDateTime),
    Column("received_at", UtcDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("run_id", String(250)),
    Column("claimed_at", UtcDateTime),
    Column("done_at", UtcDateTime),
    UniqueConstraint("source", "entity", "dedupe_key", name="uq_sync_inbox_dedupe"),
)
Index("ix_sync_inbox_queue", inbox.c.entity, inbox.c.status, inbox.c.id)
Index("ix_sync_inbox_closed", inbox.c.status, inbox.c.done_at)


def upgrade(conn: Connection) -> None:
    """Create ``sync_inbox`` and its indexes."""
    metadata.create_all(conn)
