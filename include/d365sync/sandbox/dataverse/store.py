"""SQLite persistence for the sandbox: one SQL table per Dataverse table plus tombstones.

The database runs in WAL mode with one writer connection and a pool of read-only connections (as
many as reads run at once), so reads never wait for writes and concurrent requests proceed in parallel,
as on a real tenant with many application servers.  Writes are serialised behind :attr:`Store.lock`,
held only from ``BEGIN IMMEDIATE`` to ``COMMIT`` (:meth:`Store.atomic`): callers validate and convert
their input, and spend simulated server time, before they take it.  Every read-modify-write
therefore sees the latest committed data — no lost updates, no alternate-key duplicates.

``versionnumber`` is a global, strictly increasing counter shared by all tables and the
tombstone table, just like Dataverse's rowversion; it is recovered from the data on start.
Versions are handed out inside the write transaction, so they increase in commit order.
:attr:`Store.current_version` is the *committed* watermark: every version at or below it is
either committed or rolled back, so a change-tracking snapshot taken at the watermark never
misses a write that commits later with a lower version.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
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
BUSY_TIMEOUT_MS = 30_000

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
        """The write lock: held for a whole write transaction; reads do not take it."""
        self._conn = self._connect()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._depth = 0
        self._owner: int | None = None  # the thread inside a write transaction
        self._idle: list[sqlite3.Connection] = []  # reader connections not in use
        self._readers_lock = threading.Lock()
        self._closed = False
        self._hooks: list[Callable[[bool], None]] = []
        for statement in _SYSTEM_DDL:
            self._conn.execute(statement)
        for table in TABLES.values():
            for statement in ddl(table):
                self._conn.execute(statement)
            present = {r[1] for r in self._conn.execute(f'PRAGMA table_info("{table.logical_name}")')}
            for statement in missing_columns(table, present):  # a data dir from an older schema
                self._conn.execute(statement)
        self._version = self._recover_version()
        self._committed = self._version

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def close(self) -> None:
        with self.lock, self._readers_lock:
            self._closed = True
            for reader in self._idle:
                reader.close()
            self._idle.clear()
            self._conn.close()

    def _recover_version(self) -> int:
        parts = [f'SELECT MAX(versionnumber) AS v FROM "{t.logical_name}"' for t in TABLES.values()]
        parts.append("SELECT MAX(version) AS v FROM _tombstone")
        row = self._conn.execute(f"SELECT MAX(v) FROM ({' UNION ALL '.join(parts)})").fetchone()
        return int(row[0] or 1000)

    # -- connections -----------------------------------------------------------------------
    def in_transaction(self) -> bool:
        """Whether the calling thread is inside :meth:`atomic` (it then holds the write lock)."""
        return self._owner == threading.get_ident()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection a read uses: the writer's inside a transaction (to see its own
        uncommitted rows), else a read-only one from the pool (as many as concurrent reads)."""
        if self.in_transaction():
            yield self._conn
            return
        with self._readers_lock:
            if self._closed:
                raise sqlite3.ProgrammingError("the sandbox store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=1")
        try:
            yield conn
        finally:
            with self._readers_lock:
                if self._closed:
                    conn.close()
                else:
                    self._idle.append(conn)

    # -- versions and transactions -------------------------------------------------------
    @property
    def current_version(self) -> int:
        """The committed watermark: no write still in progress holds a version at or below it."""
        return self._committed

    def next_version(self) -> int:
        """Reserve the next rowversion.  Gaps after a rollback are harmless (Dataverse has them)."""
        with self.lock:
            self._version += 1
            return self._version

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """A transaction, or a SAVEPOINT when already inside one (batch changesets, bulk actions).

        The outermost level holds the write lock from ``BEGIN IMMEDIATE`` to ``COMMIT`` and then
        publishes the versions it used through :attr:`current_version`.
        """
        with self.lock:
            name = f"sp{self._depth}"
            if self._depth == 0:
                self._conn.execute("BEGIN IMMEDIATE")
                self._owner = threading.get_ident()
            else:
                self._conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._finish("ROLLBACK")
                else:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._finish("COMMIT")
            else:
                self._conn.execute(f"RELEASE {name}")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Inside the caller's transaction, or a transaction of its own (no savepoint per row)."""
        if self.in_transaction():
            yield
        else:
            with self.atomic():
                yield

    def _finish(self, statement: str) -> None:
        committed = False
        try:
            self._conn.execute(statement)
            committed = statement == "COMMIT"
        finally:
            self._committed = self._version
            self._owner = None
            for hook in self._hooks:
                hook(committed)

    def after_transaction(self, hook: Callable[[bool], None]) -> None:
        """Call ``hook(committed)`` when each outermost transaction ends, still under the write
        lock (keep it cheap: set an event, drop a cache)."""
        self._hooks.append(hook)

    # -- reads -----------------------------------------------------------------------------
    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._reading() as conn, _query_limits():
            return conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._reading() as conn, _query_limits():
            rows = conn.execute(sql, params).fetchall()  # drained: the read snapshot ends here
            return rows[0][0] if rows else None

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
        with self._writing():
            self._conn.execute(
                f'INSERT INTO "{table.logical_name}" ({names}) VALUES ({marks})', list(values.values())
            )

    def update(self, table: Table, record_id: str, values: dict[str, Any]) -> None:
        assignments = ", ".join(f'"{n}" = ?' for n in values)
        with self._writing():
            self._conn.execute(
                f'UPDATE "{table.logical_name}" SET {assignments} WHERE "{table.primary_id}" = ?',
                [*values.values(), record_id],
            )

    def delete(self, table: Table, record_id: str, version: int, deletedon: str) -> None:
        """Delete a row and leave a tombstone so change tracking can report it."""
        with self._writing():
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
        with self._writing():
            self._conn.executemany(f'INSERT INTO "{table.logical_name}" ({names}) VALUES ({marks})', rows)

    def reserve_versions(self, count: int) -> int:
        """Reserve ``count`` consecutive versions; returns the first."""
        with self.lock:
            first = self._version + 1
            self._version += count
            return first

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement inside the caller's transaction (or a transaction of its own); returns the
        number of rows it changed.  For the sandbox's own tables (the webhook queue)."""
        with self._writing():
            return self._conn.execute(sql, params).rowcount

    def meta(self, key: str) -> str | None:
        return self.scalar("SELECT value FROM _meta WHERE key = ?", (key,))

    def set_meta(self, key: str, value: str) -> None:
        with self._writing():
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
