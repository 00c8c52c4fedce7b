"""A small versioned migration runner for the sync state database.

Why not Alembic: the state schema is a handful of tables owned by one package, the store must
upgrade itself on open (in a worker, a CLI or a test) without an ``alembic.ini`` or a script
directory, and the same runner has to work under a per-test PostgreSQL schema. Each migration
is a frozen module with ``NAME`` and ``upgrade(conn)``; applied versions are rows of
``sync_schema_version``, each written in the same transaction as its DDL.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import Column, Connection, Engine, Integer, MetaData, String, Table, func, select

from d365sync.engine.migrations import v001_initial, v002_dead_letter_payload
from d365sync.engine.migrations.types import UtcDateTime


class Migration(NamedTuple):
    version: int
    name: str
    upgrade: Callable[[Connection], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, v001_initial.NAME, v001_initial.upgrade),
    Migration(2, v002_dead_letter_payload.NAME, v002_dead_letter_payload.upgrade),
)
HEAD = MIGRATIONS[-1].version

schema_version = Table(
    "sync_schema_version",
    MetaData(),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", String(255), nullable=False),
    Column("applied_at", UtcDateTime, nullable=False),
)


def current_version(engine: Engine) -> int:
    """The highest applied version; 0 for an empty database."""
    with engine.begin() as conn:
        schema_version.create(conn, checkfirst=True)
        return conn.execute(select(func.coalesce(func.max(schema_version.c.version), 0))).scalar_one()


def upgrade(engine: Engine, target: int = HEAD) -> int:
    """Apply every migration above the current version up to ``target``, one transaction each."""
    version = current_version(engine)
    for migration in MIGRATIONS:
        if version < migration.version <= target:
            with engine.begin() as conn:
                migration.upgrade(conn)
                row = {"version": migration.version, "name": migration.name, "applied_at": datetime.now(UTC)}
                conn.execute(schema_version.insert(), row)
            version = migration.version
    return version
