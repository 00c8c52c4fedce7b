"""SQLite persistence for the sandbox: one SQL table per Dataverse table plus tombstones.

Why one connection behind a re-entrant lock: SQLite allows a single writer anyway, and
serialising every operation makes change-tracking snapshots trivially consistent (a delta
read never sees a half-committed write).  Concurrency limits and latency knobs live outside
the lock, in the HTTP layer, so the sandbox can still model concurrent clients.

``versionnumber`` is a global, strictly increasing counter shared by all tables and the
tombstone table, just like Dataverse's rowversion; it is recovered from the data on start.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.schema import TABLES, Table, ddl, missing_columns

# SQLite's own size limits; a query past them is the client's (a 400), not a sandbox fault.
_TOO_COMPLEX = (
    "parser stack overflow",
    "expression tree is too large",
    "too many terms",
    "pattern too complex",
    "too many sql variables",
)

DB_FILE = "dataverse.sqlite3"

_SYSTEM_DDL = (
    "CREATE TABLE IF NOT EXISTS _tombstone ("
    " version INTEGER PRIMARY KEY, entity TEXT NOT NULL, id TEXT NOT NULL, deletedon TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ix_tombstone_entity ON _tombstone (entity, version)",
    "CREATE TABLE IF NOT EXISTS _meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class Store:
    """The sandbox database.  Use :meth:`atomic` around every write."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / DB_FILE
        self.lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._depth = 0
        for statement in _SYSTEM_DDL:
            self._conn.execute(statement)
        for table in TABLES.values():
            for statement in ddl(table):
                self._conn.execute(statement)
            present = {r[1] for r in self._conn.execute(f'PRAGMA table_info("{table.logical_name}")')}
            for statement in missing_columns(table, present):  # a data dir from an older schema
                self._conn.execute(statement)
        self._version = self._recover_version()

    def close(self) -> None:
        with self.lock:
            self._conn.close()

    def _recover_version(self) -> int:
        parts = [f'SELECT MAX(versionnumber) AS v FROM "{t.logical_name}"' for t in TABLES.values()]
        parts.append("SELECT MAX(version) AS v FROM _tombstone")
        row = self._conn.execute(f"SELECT MAX(v) FROM ({' UNION ALL '.join(parts)})").fetchone()
        return int(row[0] or 1000)

    # -- versions and transactions -------------------------------------------------------
    @property
    def current_version(self) -> int:
        return self._version

    def next_version(self) -> int:
        """Reserve the next rowversion.  Gaps after a rollback are harmless (Dataverse has them)."""
        with self.lock:
            self._version += 1
            return self._version

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """A transaction, or a SAVEPOINT when already inside one (batch changesets, bulk actions)."""
        with self.lock:
            name = f"sp{self._depth}"
            if self._depth == 0:
                self._conn.execute("BEGIN IMMEDIATE")
            else:
                self._conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._conn.execute("ROLLBACK")
                else:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._conn.execute("COMMIT")
            else:
                self._conn.execute(f"RELEASE {name}")

    # -- reads -----------------------------------------------------------------------------
    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self.lock, _query_limits():
            return self._conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.lock, _query_limits():
            row = self._conn.execute(sql, params).fetchone()
            return row[0] if row else None

    def get(self, table: Table, record_id: str) -> sqlite3.Row | None:
        rows = self.fetch(
            f'SELECT * FROM "{table.logical_name}" WHERE "{table.primary_id}" = ?', (record_id.lower(),)
        )
        return rows[0] if rows else None

    def find(self, table: Table, values: dict[str, Any]) -> sqlite3.Row | None:
        """The row whose columns equal ``values`` (alternate-key lookup, case-insensitive)."""
        where = " AND ".join(f'"{name}" = ?' for name in values)
        rows = self.fetch(
            f'SELECT * FROM "{table.logical_name}" WHERE {where} LIMIT 1', list(values.values())
        )
        return rows[0] if rows else None

    # -- writes ----------------------------------------------------------------------------
    def insert(self, table: Table, values: dict[str, Any]) -> None:
        names = ", ".join(f'"{n}"' for n in values)
        marks = ", ".join("?" for _ in values)
        with self.lock:
            self._conn.execute(
                f'INSERT INTO "{table.logical_name}" ({names}) VALUES ({marks})', list(values.values())
            )

    def update(self, table: Table, record_id: str, values: dict[str, Any]) -> None:
        assignments = ", ".join(f'"{n}" = ?' for n in values)
        with self.lock:
            self._conn.execute(
                f'UPDATE "{table.logical_name}" SET {assignments} WHERE "{table.primary_id}" = ?',
                [*values.values(), record_id],
            )

    def delete(self, table: Table, record_id: str, version: int, deletedon: str) -> None:
        """Delete a row and leave a tombstone so change tracking can report it."""
        with self.lock:
            self._conn.execute(
                f'DELETE FROM "{table.logical_name}" WHERE "{table.primary_id}" = ?', (record_id,)
            )
            self._conn.execute(
                "INSERT INTO _tombstone (version, entity, id, deletedon) VALUES (?, ?, ?, ?)",
                (version, table.logical_name, record_id, deletedon),
            )

    def bulk_insert(self, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Fast path for seeding: one executemany inside the caller's transaction."""
        names = ", ".join(f'"{n}"' for n in columns)
        marks = ", ".join("?" for _ in columns)
        with self.lock:
            self._conn.executemany(f'INSERT INTO "{table.logical_name}" ({names}) VALUES ({marks})', rows)

    def reserve_versions(self, count: int) -> int:
        """Reserve ``count`` consecutive versions; returns the first."""
        with self.lock:
            first = self._version + 1
            self._version += count
            return first

    def meta(self, key: str) -> str | None:
        return self.scalar("SELECT value FROM _meta WHERE key = ?", (key,))

    def set_meta(self, key: str, value: str) -> None:
        with self.lock:
            self._conn.execute("INSERT OR REPLACE INTO _meta (key, value) VALUES (?, ?)", (key, value))


@contextmanager
def _query_limits() -> Iterator[None]:
    """Turn SQLite's "query too large" errors into a Dataverse 400."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if any(text in str(exc).lower() for text in _TOO_COMPLEX):
            raise errors.bad_request(f"The query is too complex to run: {exc}.") from None
        raise
