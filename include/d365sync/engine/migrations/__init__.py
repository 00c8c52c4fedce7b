"""A small versioned migration runner for the sync state database.

Why not Alembic: the state schema is a handful of tables owned by one package, the store must
upgrade itself on open (in a worker, a CLI or a test) without an ``alembic.ini`` or a script
directory, and the same runner has to work under a per-test PostgreSQL schema. Each migration
is a frozen module with ``NAME`` and ``upgrade(conn)``; applied versions are rows of
``sync_schema_version``, each written in the same transaction as its DDL.

Concurrency: every task of the first DAG runs opens the store, often at the same moment on a
fresh database. Each migration runs under a database-wide lock (SQLite ``BEGIN IMMEDIATE``,
a PostgreSQL transaction-level advisory lock) and re-reads the applied version inside it, so
only one process applies it and the others see it done (before, the losers failed with "table
already exists" / "duplicate column name"). A database at head is read without any lock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import Column, Connection, Engine, Integer, MetaData, String, Table, exc, func, select, text

from d365sync.engine.migrations import (
    v001_initial,
    v002_dead_letter_payload,
    v003_record_first_seen,
    v004_event_inbox,
    v005_run_progress,
    v006_review_changes,
)
from d365sync.engine.migrations.types import UtcDateTime


class Migration(NamedTuple):
    version: int
    name: str
    upgrade: Callable[[Connection], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, v001_initial.NAME, v001_initial.upgrade),
    Migration(2, v002_dead_letter_payload.NAME, v002_dead_letter_payload.upgrade),
    Migration(3, v003_record_first_seen.NAME, v003_record_first_seen.upgrade),
    Migration(4, v004_event_inbox.NAME, v004_event_inbox.upgrade),
    Migration(5, v005_run_progress.NAME, v005_run_progress.upgrade),
    Migration(6, v006_review_changes.NAME, v006_review_changes.upgrade),
)
HEAD = MIGRATIONS[-1].version

schema_version = Table(
    "sync_schema_version",
    MetaData(),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", String(255), nullable=False),
    Column("applied_at", UtcDateTime, nullable=False),
)


#: PostgreSQL advisory lock key of the migration runner (any constant shared by all processes)
_PG_LOCK_KEY = 0x0D365_5EC


def current_version(engine: Engine) -> int:
    """The highest applied version; 0 for an empty database."""
    try:
        with engine.connect() as conn:
            return _applied(conn)
    except (exc.OperationalError, exc.ProgrammingError):  # no version table yet
        pass
    with engine.begin() as conn:
        _lock(conn)
        schema_version.create(conn, checkfirst=True)
        return _applied(conn)


def upgrade(engine: Engine, target: int = HEAD) -> int:
    """Apply every migration above the current version up to ``target``, one transaction each."""
    version = current_version(engine)
    for migration in MIGRATIONS:
        if version < migration.version <= target:
            with engine.begin() as conn:
                _lock(conn)
                version = _applied(conn)  # another process may have applied it meanwhile
                if version >= migration.version:
                    continue
                migration.upgrade(conn)
                row = {"version": migration.version, "name": migration.name, "applied_at": datetime.now(UTC)}
                conn.execute(schema_version.insert(), row)
            version = migration.version
    return version


def _applied(conn: Connection) -> int:
    return conn.execute(select(func.coalesce(func.max(schema_version.c.version), 0))).scalar_one()


def _lock(conn: Connection) -> None:
    """Hold the database's migration lock until the transaction ends."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock now, not at the first write
    elif conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
