"""Set-based writes: validate a chunk, stage it, apply it with one statement, commit.

Each chunk is one transaction: rows are validated against the spec (bad ones become
:class:`RowFailure` and are left out), bulk-inserted into a session-private staging table with
multi-row ``VALUES`` batches (``fast_executemany`` where the driver supports parameter arrays),
then applied with the dialect's MERGE / ON CONFLICT / ON DUPLICATE KEY UPDATE. If the database
still rejects the chunk, it is replayed row by row so only the offending rows fail.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyodbc

from d365sync.erp.convert import to_db
from d365sync.erp.dialects import Dialect
from d365sync.erp.errors import Key, RowFailure, RowRejected, format_key
from d365sync.erp.session import Session, driver_message
from d365sync.erp.spec import Column, TableSpec


@dataclass(frozen=True)
class Conflict:
    """An optimistic update that lost: the row's version moved since the caller read it."""

    table: str
    key: Key
    expected_version: Any
    current_version: Any  # None when the row no longer exists

    def __str__(self) -> str:
        now = "deleted" if self.current_version is None else f"now {self.current_version}"
        return f"{self.table} key={format_key(self.key)}: version {self.expected_version} is stale ({now})"


@dataclass
class LoadResult:
    """What a write call did; failures and conflicts are data, not exceptions."""

    table: str
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    failures: list[RowFailure] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.conflicts

    def add(self, other: LoadResult) -> None:
        """Fold in the outcome of one committed chunk."""
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.deleted += other.deleted
        self.failures.extend(other.failures)
        self.conflicts.extend(other.conflicts)


@dataclass
class Batch:
    """One validated chunk: bound values in ``names`` order and the display key of each row."""

    names: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    keys: list[Key]

    def only(self, index: int) -> Batch:
        return Batch(self.names, [self.rows[index]], [self.keys[index]])


class Preparer:
    """Validates the rows of one call; the first valid row fixes the column set of the call."""

    def __init__(self, spec: TableSpec, dialect: Dialect, allowed: Sequence[Column], required: Sequence[str]):
        self.spec, self.dialect = spec, dialect
        self._allowed = {c.name: c for c in allowed}
        self._required = required
        self._ignored = {spec.cursor_column, spec.version_column} - set(self._allowed) - {None}
        self.names: tuple[str, ...] | None = None

    def prepare(self, rows: Sequence[Mapping[str, Any]], failures: list[RowFailure]) -> Batch:
        index: dict[Key, int] = {}
        batch = Batch((), [], [])
        for row in rows:
            key = tuple(_strip(row.get(k)) for k in self.spec.key)
            try:
                values = self._values(row)
            except RowRejected as exc:
                failures.append(RowFailure(self.spec.name, key, exc.column, str(exc)))
                continue
            if key in index:  # the same key twice in one chunk: the later row wins
                batch.rows[index[key]] = values
                continue
            index[key] = len(batch.rows)
            batch.rows.append(values)
            batch.keys.append(key)
        batch.names = self.names or ()
        return batch

    def _values(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        present = [n for n in row if n not in self._ignored]
        for name in present:
            if name not in self._allowed:
                raise RowRejected(name, f"{name!r} is not a writable column of {self.spec.name} in the spec")
        for name in self._required:
            if row.get(name) is None:
                raise RowRejected(name, f"key/version column {name} is missing or empty")
        if self.names is None:
            self.names = tuple(n for n in self._allowed if n in present)
        if set(present) != set(self.names):
            raise RowRejected(None, f"row has columns {sorted(present)}; this load writes {list(self.names)}")
        return tuple(to_db(self._allowed[n], row[n], self.dialect) for n in self.names)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``itertools.batched`` for Python 3.11."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _strip(value: Any) -> Any:
    return value.rstrip(" ") if isinstance(value, str) else value


def staging_table(spec: TableSpec, purpose: str, names: Sequence[str]) -> str:
    """Session-private staging name; the column set is part of it so shapes never clash."""
    shape = hashlib.blake2b(",".join(names).encode(), digest_size=3).hexdigest()
    return f"STG_{spec.name[:40]}_{purpose}_{shape}"


def stage(
    cur: pyodbc.Cursor,
    dialect: Dialect,
    stg: str,
    columns: Sequence[Column],
    batch: Batch,
    fast: bool,
    flag: bool = False,
) -> None:
    """(Re)create the staging table if this connection lacks it, empty it and bulk-insert the batch."""
    cur.execute(dialect.create_staging(stg, columns, flag))
    cur.execute(dialect.clear_staging(stg))
    width = len(batch.names)
    per = max(1, min(dialect.rows_per_insert, dialect.max_params // width))
    full = len(batch.rows) - len(batch.rows) % per
    target = dialect.staging_name(stg)
    if full:
        cur.fast_executemany = fast
        groups = [_flatten(batch.rows[i : i + per]) for i in range(0, full, per)]
        cur.executemany(dialect.insert_values(target, batch.names, per), groups)
        cur.fast_executemany = False
    if rest := batch.rows[full:]:
        cur.execute(dialect.insert_values(target, batch.names, len(rest)), _flatten(rest))


def _flatten(rows: Sequence[tuple[Any, ...]]) -> list[Any]:
    return [value for row in rows for value in row]


ChunkOp = Callable[[pyodbc.Cursor, Batch], LoadResult]


def apply_chunk(session: Session, spec: TableSpec, batch: Batch, op: ChunkOp, result: LoadResult) -> None:
    """Run ``op`` on the whole chunk; if the database rejects it, replay it row by row."""
    if not batch.rows:
        return
    try:
        result.add(session.run(lambda cur: op(cur, batch)))  # counted only once committed
    except pyodbc.Error as exc:  # transient errors were retried inside run() already
        if len(batch.rows) == 1:
            result.failures.append(_failure(spec, batch.keys[0], exc))
            return
        for i in range(len(batch.rows)):
            apply_chunk(session, spec, batch.only(i), op, result)


def _failure(spec: TableSpec, key: Key, exc: pyodbc.Error) -> RowFailure:
    message = driver_message(exc)
    return RowFailure(spec.name, key, guess_column(spec, message), f"rejected by the database: {message}")


def guess_column(spec: TableSpec, message: str) -> str | None:
    """Drivers name the column in different places (or not at all); find a spec column in the text."""
    for name in spec.column_names:
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message, re.IGNORECASE):
            return name
    return None
