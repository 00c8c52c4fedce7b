"""Streaming reads: keyset pages, cursor extraction and snapshot hash-diffs.

Every read is a sequence of keyset pages (``WHERE (order cols) > last ORDER BY … LIMIT n``),
each fetched with ``fetchmany``. Memory therefore depends on the page size, not on the table,
whatever the driver buffers per result set, and a page lost to a disconnect is simply read
again from the same position.

The client holds no sync state: the caller passes the previous :class:`ExtractCursor` or the
previous snapshot hashes in and gets the new ones back, to store only after its load commits.

A value that cannot be converted (a CHAR(8) date ``'20231399'``, ``'N/A'`` stored in a DECIMAL
column by SQLite) never aborts a read: its row is delivered like any other, the value kept as
read, and :attr:`Row.errors` says which column failed which rule. A change stream delivers such
a row once and moves its watermark past it (a bad row is neither re-read forever nor blocking),
so the caller must dead-letter it, not drop it; fixing it at the source (which re-stamps the
cursor column) delivers the corrected row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyodbc

from d365sync.erp.convert import read_converter
from d365sync.erp.errors import CursorNotReady, Key, UnreadableValue
from d365sync.erp.session import Session
from d365sync.erp.spec import Column, ColumnType, TableSpec

CursorValue = dt.datetime | int
_TYPED = (ColumnType.DECIMAL, ColumnType.DATE8, ColumnType.INTEGER, ColumnType.TIMESTAMP)


@dataclass(frozen=True)
class ExtractCursor:
    """Watermark plus digests of the rows already delivered inside the overlap window."""

    value: CursorValue | None = None
    seen: frozenset[str] = field(default_factory=frozenset)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the caller's state store."""
        value = self.value.isoformat() if isinstance(self.value, dt.datetime) else self.value
        return {"value": value, "seen": sorted(self.seen)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractCursor:
        value = data.get("value")
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        return cls(value=value, seen=frozenset(data.get("seen", ())))


class Row(dict[str, Any]):
    """One row as read: column name → value, and :attr:`errors`, the values that could not be read.

    A value its column's type cannot hold (a CHAR(8) date ``'20231399'``, ``'N/A'`` in a DECIMAL
    column on SQLite) does not abort the read: it stays in the row as the driver returned it
    (text) and is described in ``errors``. Such a row is the caller's to dead-letter, never to
    load. ``errors`` is empty for every good row; the mapping compares like a plain dict.
    """

    __slots__ = ("errors",)

    def __init__(self, items: Any = (), errors: Sequence[UnreadableValue] = ()) -> None:
        super().__init__(items)
        self.errors: tuple[UnreadableValue, ...] = tuple(errors)


class Values(list[Any]):
    """The values of one driver row in column order, converted where possible; see :attr:`errors`."""

    __slots__ = ("errors",)

    def __init__(self, items: Any = (), errors: Sequence[UnreadableValue] = ()) -> None:
        super().__init__(items)
        self.errors: list[UnreadableValue] = list(errors)


class RowReader:
    """Turns driver rows of one table into converted dicts, keys and stable digests.

    Conversion is per value: one that fails leaves the raw value in place and becomes an
    :class:`UnreadableValue` in ``errors`` (of :meth:`values`, then of the :class:`Row`
    :meth:`as_dict` makes); the other rows, and the row's other values, are unaffected. Key
    columns are converted first, so every error names the row's key (the raw key text when
    the key itself cannot be converted).
    """

    def __init__(self, spec: TableSpec, columns: Sequence[Column]) -> None:
        self.spec = spec
        self.columns = tuple(columns)
        self.names = tuple(c.name for c in columns)
        self._key_idx = [self.names.index(k) for k in spec.key]
        convert = [(i, f) for i, c in enumerate(columns) if (f := read_converter(c)) is not None]
        self._convert = sorted(convert, key=lambda item: item[0] not in self._key_idx)

    def values(self, raw: Sequence[Any]) -> Values:
        values = Values(raw)
        for i, convert in self._convert:
            try:
                values[i] = convert(values[i])
            except (ValueError, ArithmeticError, TypeError) as exc:
                values.errors.append(self._unreadable(values, i, exc))
        return values

    def check(self, row: Mapping[str, Any]) -> list[UnreadableValue]:
        """The unreadable values of a row read earlier (a dead letter's copy) and kept as text.

        A typed column (DECIMAL, DATE8, INTEGER, TIMESTAMP) holds text only when its value could
        not be converted: such values are converted again to name the problem.
        """
        values = [row.get(n) for n in self.names]
        errors = []
        for i, convert in self._convert:
            if self.columns[i].type in _TYPED and isinstance(values[i], str):
                try:
                    convert(values[i])
                except (ValueError, ArithmeticError, TypeError) as exc:
                    errors.append(self._unreadable(values, i, exc))
        return errors

    def _unreadable(self, values: Sequence[Any], i: int, exc: Exception) -> UnreadableValue:
        col = self.columns[i]
        message = str(exc) or type(exc).__name__
        return UnreadableValue(self.spec.name, self.key(values), col.name, col.limit, message, values[i])

    def key(self, values: Sequence[Any]) -> Key:
        return tuple(_strip(values[i]) for i in self._key_idx)

    def as_dict(self, values: Sequence[Any]) -> Row:
        return Row(zip(self.names, values, strict=True), getattr(values, "errors", ()))


def digest(values: Sequence[Any]) -> str:
    """Stable across processes (unlike ``hash``): what a caller can store and compare later."""
    return hashlib.blake2b("\x1f".join(map(repr, values)).encode(), digest_size=12).hexdigest()


def _strip(value: Any) -> Any:
    return value.rstrip(" ") if isinstance(value, str) else value


def pages(
    session: Session,
    spec: TableSpec,
    order: Sequence[str],
    where: str = "",
    params: Sequence[Any] = (),
    size: int = 10_000,
) -> Iterator[list[pyodbc.Row]]:
    """Yield keyset pages of raw rows over all spec columns, ordered by ``order``."""
    dialect, names = session.dialect, spec.column_names
    positions = [names.index(n) for n in order]
    last: Sequence[Any] | None = None
    while True:
        seek, seek_params = ("", []) if last is None else _seek(session, order, [last[i] for i in positions])
        clause = " AND ".join(filter(None, [where, seek]))
        sql = dialect.select_page(spec.name, names, clause, order, size)
        args = [*params, *seek_params]
        rows = session.run(lambda cur, sql=sql, args=args: cur.execute(sql, args).fetchmany(size))
        if rows:
            yield rows
        if len(rows) < size:
            return
        last = rows[-1]


def _seek(session: Session, order: Sequence[str], last: Sequence[Any]) -> tuple[str, list[Any]]:
    """Lexicographic ``(c1, c2, …) > (v1, v2, …)`` spelled out, which every dialect accepts."""
    q = session.dialect.q
    sql, params = f"{q(order[-1])} > ?", [last[-1]]
    for name, value in zip(reversed(order[:-1]), reversed(last[:-1]), strict=True):
        sql = f"({q(name)} > ? OR ({q(name)} = ? AND {sql}))"
        params = [value, value, *params]
    return f"{q(order[0])} >= ? AND {sql}", [last[0], *params]


class ChangeStream:
    """Rows changed since a cursor, in chunks; :attr:`cursor` is the new cursor once exhausted.

    Rows are read from ``watermark - overlap`` (late commits with older timestamps are caught)
    and a re-read row is dropped only if its digest was delivered before, so a row updated
    with exactly the previous watermark's timestamp is delivered again, not lost.
    """

    def __init__(
        self,
        session: Session,
        spec: TableSpec,
        since: ExtractCursor | None,
        overlap: dt.timedelta | int,
        until: CursorValue | None,
        chunk_size: int,
    ) -> None:
        if spec.cursor_column is None:
            raise ValueError(f"table {spec.name} has no cursor column; use a snapshot diff")
        self._session, self._spec, self._since = session, spec, since or ExtractCursor()
        self._overlap, self._until, self._size = overlap, until, chunk_size
        self._reader = RowReader(spec, spec.columns)
        self._cursor_idx = spec.column_names.index(spec.cursor_column)
        self._new: ExtractCursor | None = None
        self.rows_read = self.rows_skipped = 0

    @property
    def cursor(self) -> ExtractCursor:
        if self._new is None:
            raise CursorNotReady("read the change stream to the end before asking for the new cursor")
        return self._new

    def __iter__(self) -> Iterator[list[Row]]:
        spec, since = self._spec, self._since
        window: deque[tuple[CursorValue, list[Any]]] = deque()
        assert spec.cursor_column is not None
        where, params = self._window_clause()
        for page in pages(self._session, spec, (spec.cursor_column, *spec.key), where, params, self._size):
            chunk: list[Row] = []
            for raw in page:
                values = self._reader.values(raw)
                if self._cursor_readable(values):
                    self._track(window, values)
                    if self._delivered_before(values):
                        self.rows_skipped += 1
                        continue
                chunk.append(self._reader.as_dict(values))
            self.rows_read += len(page)
            if chunk:
                yield chunk
        self._new = self._next_cursor(window) if window else since

    def _window_clause(self) -> tuple[str, list[Any]]:
        col = self._session.dialect.q(self._spec.cursor_column or "")
        parts, params = [f"{col} IS NOT NULL"], []
        if self._since.value is not None:
            parts.append(f"{col} >= ?")
            params.append(self._lower_bound(self._since.value))
        if self._until is not None:
            parts.append(f"{col} < ?")
            params.append(self._until)
        return " AND ".join(parts), params

    def _lower_bound(self, value: CursorValue) -> CursorValue:
        overlap = self._overlap
        if isinstance(value, dt.datetime):
            return value - (overlap if isinstance(overlap, dt.timedelta) else dt.timedelta(0))
        return value - (overlap if isinstance(overlap, int) else 0)

    def _cursor_readable(self, values: Values) -> bool:
        """False (and an error on the row) when the row's cursor value cannot be read.

        The query only returns rows whose cursor column is not NULL, so a None here is a value
        the driver could not convert. Such a row cannot be placed against the watermark: it is
        delivered with its error and moves neither the watermark nor ``seen``.
        """
        column, errors = self._spec.cursor_column or "", values.errors
        if values[self._cursor_idx] is None and not any(e.column == column for e in errors):
            spec = self._spec.column(column)
            message = "the driver returned no value for it"
            errors.append(
                UnreadableValue(self._spec.name, self._reader.key(values), column, spec.limit, message, None)
            )
        return not any(e.column == column for e in errors)

    def _track(self, window: deque[tuple[CursorValue, list[Any]]], values: list[Any]) -> None:
        """Keep only rows within ``overlap`` of the newest value: the next cursor's ``seen``."""
        value = values[self._cursor_idx]
        window.append((value, values))
        floor = self._lower_bound(value)
        while window[0][0] < floor:
            window.popleft()

    def _delivered_before(self, values: list[Any]) -> bool:
        watermark = self._since.value
        if watermark is None or values[self._cursor_idx] > watermark:
            return False  # newer than anything delivered: cannot be a repeat
        return digest(values) in self._since.seen

    def _next_cursor(self, window: deque[tuple[CursorValue, list[Any]]]) -> ExtractCursor:
        newest = window[-1][0]
        if self._since.value is not None and self._since.value > newest:
            newest = self._since.value  # a watermark never moves backwards
        floor = self._lower_bound(newest)
        return ExtractCursor(value=newest, seen=frozenset(digest(v) for c, v in window if c >= floor))


@dataclass
class SnapshotChunk:
    """Changes found in one page of a snapshot, and the hashes the caller should now store."""

    inserts: list[Row]
    updates: list[Row]
    hashes: dict[Key, str]


class SnapshotDiff:
    """Streams a table ordered by key and compares each row with the caller's stored hash.

    Yields :class:`SnapshotChunk` per page; after the last one :attr:`deletes` lists stored
    keys that no longer exist. Memory: the caller's mapping plus the set of keys seen.
    """

    def __init__(
        self, session: Session, spec: TableSpec, previous: Mapping[Key, str], chunk_size: int
    ) -> None:
        self._session, self._spec, self._previous, self._size = session, spec, previous, chunk_size
        self._reader = RowReader(spec, spec.columns)
        self._deletes: list[Key] | None = None

    @property
    def deletes(self) -> list[Key]:
        if self._deletes is None:
            raise CursorNotReady("read the snapshot diff to the end before asking for deletes")
        return self._deletes

    def __iter__(self) -> Iterator[SnapshotChunk]:
        seen: set[Key] = set()
        for page in pages(self._session, self._spec, self._spec.key, size=self._size):
            chunk = SnapshotChunk([], [], {})
            for raw in page:
                self._classify(self._reader.values(raw), chunk)
            seen.update(chunk.hashes)
            yield chunk
        self._deletes = [key for key in self._previous if key not in seen]

    def _classify(self, values: Values, chunk: SnapshotChunk) -> None:
        key, row_hash = self._reader.key(values), digest(values)
        chunk.hashes[key] = row_hash
        before = self._previous.get(key)
        if before is None:
            chunk.inserts.append(self._reader.as_dict(values))
        elif before != row_hash:
            chunk.updates.append(self._reader.as_dict(values))
