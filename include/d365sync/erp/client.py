"""The ERP client: the only entry point the engine and the Airflow hook need.

It wraps one pyodbc connection (reopened on demand) and a dialect, and offers streaming reads
and set-based writes over tables described by :class:`TableSpec`. It keeps no sync state:
cursors and snapshot hashes go in as arguments and come back as results.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, Self

import pyodbc

from d365sync.erp.dialects import CONFLICT_FLAG, Dialect
from d365sync.erp.errors import ErpConnectionError, ErpSpecError, Key, RowFailure
from d365sync.erp.reading import ChangeStream, CursorValue, ExtractCursor, Row, RowReader, SnapshotDiff, pages
from d365sync.erp.retry import RetryPolicy
from d365sync.erp.session import Connect, Session, driver_message
from d365sync.erp.spec import Column, ColumnType, TableSpec
from d365sync.erp.writing import (
    Batch,
    Conflict,
    LoadResult,
    Preparer,
    apply_chunk,
    batched,
    stage,
    staging_table,
)

DEFAULT_CHUNK = 10_000
DEFAULT_OVERLAP = dt.timedelta(minutes=5)
KEY_READ_CHUNK = 200  # keys per IN list: well under every driver's parameter limit


class ErpClient:
    """Airflow-free ODBC client for a legacy ERP database."""

    def __init__(
        self,
        connect: Connect | str,
        *,
        dialect: str | Dialect | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        retry: RetryPolicy | None = None,
        fast_executemany: bool | None = None,
    ) -> None:
        factory = (lambda: pyodbc.connect(connect, autocommit=False)) if isinstance(connect, str) else connect
        self._session = Session(factory, dialect, retry or RetryPolicy())
        self.chunk_size = chunk_size
        self._fast = fast_executemany

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def dialect(self) -> Dialect:
        return self._session.dialect

    @property
    def fast_executemany(self) -> bool:
        return self.dialect.fast_executemany if self._fast is None else self._fast

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def server_info(self) -> str:
        """``DBMS version (dialect)`` — what ``test_connection`` shows an operator."""
        conn = self._session.connection()
        name, version = conn.getinfo(pyodbc.SQL_DBMS_NAME), conn.getinfo(pyodbc.SQL_DBMS_VER)
        return f"{name} {version} (dialect {self.dialect.name})"

    def execute(self, statements: Sequence[str], params: Sequence[Any] = ()) -> None:
        """Run trusted statements (sandbox DDL) in one transaction; never pass user input here."""

        def unit(cur: pyodbc.Cursor) -> None:
            for sql in statements:
                cur.execute(sql, *params) if params else cur.execute(sql)

        self._session.run(unit)

    def scalar(self, sql: str, *params: Any) -> Any:
        """First column of the first row of a trusted query (tests, checks, the sandbox)."""
        return self._session.run(lambda cur: cur.execute(sql, *params).fetchone()[0])

    def count_rows(self, spec: TableSpec) -> int:
        """How many rows the table holds (sizes the buckets of a whole-table read)."""
        return int(self.scalar(f"SELECT COUNT(*) FROM {self.dialect.q(spec.name)}"))

    # -- spec checks -------------------------------------------------------------------------
    def check_spec(self, spec: TableSpec) -> None:
        """Fail before any I/O on data if the table or a spec column does not exist."""
        sql = f"SELECT * FROM {self.dialect.q(spec.name)} WHERE 1 = 0"
        try:
            found = self._session.run(lambda cur: [d[0] for d in cur.execute(sql).description])
        except pyodbc.Error as exc:
            raise ErpSpecError(f"table {spec.name}: cannot be read ({driver_message(exc)})") from exc
        for name in spec.column_names:
            if name not in found:
                hint = [f for f in found if f.lower() == name.lower()]
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ErpSpecError(
                    f"table {spec.name}: unknown column {name!r} in spec (table has {found}){extra}"
                )

    def catalog(self, table: str) -> dict[str, Any]:
        """What the driver's catalog says of ``table`` (``SQLColumns``, ``SQLPrimaryKeys``,
        ``SQLStatistics``): ``name``, ``columns`` as (name, type name, ODBC type code, size,
        decimal digits, nullable, has a default) in table order, ``primary_key`` and ``indexes``
        (name → columns).
        The name is tried as given, then upper and lower case; no columns is an :class:`ErpSpecError`."""

        scope_sql = {
            "postgresql": "SELECT current_schema()",
            "mariadb": "SELECT DATABASE()",
            "mssql": "SELECT SCHEMA_NAME()",
        }.get(self.dialect.name)

        def read(cur: pyodbc.Cursor) -> dict[str, Any]:
            # the connection's own schema (database on MariaDB) only: the same table name elsewhere
            # on the server is another system's
            scope: dict[str, str] = {}
            if scope_sql is not None:
                current = cur.execute(scope_sql).fetchone()[0]
                scope = {"catalog": current} if self.dialect.name == "mariadb" else {"schema": current}
            for name in dict.fromkeys((table, table.upper(), table.lower())):
                columns = [
                    (
                        c.column_name,
                        c.type_name,
                        c.data_type,
                        c.column_size,
                        c.decimal_digits,
                        bool(c.nullable),
                        _has_default(c.column_def),
                    )
                    for c in cur.columns(table=name, **scope).fetchall()
                ]
                if columns:
                    break
            else:
                raise ErpSpecError(f"table {table}: not in the database's catalog (no columns found)")
            keys = sorted(cur.primaryKeys(table=name, **scope).fetchall(), key=lambda r: r.key_seq)
            indexes: dict[str, list[tuple[int, str]]] = {}
            for row in cur.statistics(table=name, **scope).fetchall():
                if row.index_name and row.column_name:
                    indexes.setdefault(row.index_name, []).append((row.ordinal_position, row.column_name))
            return {
                "name": name,
                "columns": columns,
                "primary_key": [r.column_name for r in keys],
                "indexes": {k: [c for _, c in sorted(v)] for k, v in indexes.items()},
            }

        return self._session.run(read)

    # -- reading -----------------------------------------------------------------------------
    def iter_rows(self, spec: TableSpec, chunk_size: int | None = None) -> Iterator[list[Row]]:
        """Whole table in key order, chunk by chunk."""
        self.check_spec(spec)
        reader = RowReader(spec, spec.columns)
        for page in pages(self._session, spec, spec.key, size=chunk_size or self.chunk_size):
            yield [reader.as_dict(reader.values(raw)) for raw in page]

    def read_keys(
        self, spec: TableSpec, column: str, values: Iterable[Any], chunk_size: int | None = None
    ) -> Iterator[list[Row]]:
        """Current rows whose ``column`` holds one of ``values``, in key order (a retry re-reads its
        source rows instead of trusting a stale copy); ``column`` may be a part of a compound key."""
        self.check_spec(spec)
        if column not in spec.column_names:
            raise ErpSpecError(f"table {spec.name}: unknown column {column!r}")
        reader, q = RowReader(spec, spec.columns), self.dialect.q
        wanted = list(dict.fromkeys(values))
        for start in range(0, len(wanted), KEY_READ_CHUNK):
            part = wanted[start : start + KEY_READ_CHUNK]
            where = f"{q(column)} IN ({', '.join('?' * len(part))})"
            for page in pages(self._session, spec, spec.key, where, part, chunk_size or self.chunk_size):
                yield [reader.as_dict(reader.values(raw)) for raw in page]

    def extract_changes(
        self,
        spec: TableSpec,
        since: ExtractCursor | None = None,
        *,
        overlap: dt.timedelta | int = DEFAULT_OVERLAP,
        until: CursorValue | None = None,
        chunk_size: int | None = None,
    ) -> ChangeStream:
        """Rows changed since ``since``; iterate it, then store ``stream.cursor`` after your load."""
        self.check_spec(spec)
        return ChangeStream(self._session, spec, since, overlap, until, chunk_size or self.chunk_size)

    def diff_snapshot(
        self,
        spec: TableSpec,
        previous: Mapping[Key, str] | Iterable[tuple[Key, str]],
        chunk_size: int | None = None,
    ) -> SnapshotDiff:
        """Inserts/updates per chunk and deletes at the end, against the caller's stored hashes."""
        self.check_spec(spec)
        stored = previous if isinstance(previous, Mapping) else dict(previous)
        return SnapshotDiff(self._session, spec, stored, chunk_size or self.chunk_size)

    # -- writing -----------------------------------------------------------------------------
    def upsert(
        self, spec: TableSpec, rows: Iterable[Mapping[str, Any]], chunk_size: int | None = None
    ) -> LoadResult:
        """Insert new rows and update changed ones; unchanged rows are not touched (idempotent)."""
        preparer = Preparer(spec, self.dialect, spec.writable, spec.key)
        return self._load(spec, rows, preparer, self._upsert_op(spec, preparer), chunk_size)

    def update(
        self, spec: TableSpec, rows: Iterable[Mapping[str, Any]], chunk_size: int | None = None
    ) -> LoadResult:
        """Update existing rows by key, never insert; a row whose key matches nothing is a failure.

        For tables without a version column. Rows already holding the values are ``unchanged``.
        """
        preparer = Preparer(spec, self.dialect, spec.writable, spec.key)
        return self._load(spec, rows, preparer, self._update_op(spec), chunk_size)

    def update_if_unchanged(
        self, spec: TableSpec, rows: Iterable[Mapping[str, Any]], chunk_size: int | None = None
    ) -> LoadResult:
        """Optimistic update: each row carries the version it was read at; stale rows become conflicts."""
        if spec.version_column is None:
            raise ErpSpecError(f"table {spec.name}: optimistic updates need a version column in the spec")
        allowed = (*spec.writable, spec.column(spec.version_column))
        preparer = Preparer(spec, self.dialect, allowed, (*spec.key, spec.version_column))
        return self._load(spec, rows, preparer, self._optimistic_op(spec, preparer), chunk_size)

    def deactivate(self, spec: TableSpec, keys: Iterable[Key]) -> LoadResult:
        """Soft delete: set the status column to ``spec.inactive_status``."""
        if spec.status_column is None:
            raise ErpSpecError(f"table {spec.name}: deactivation needs a status column in the spec")
        preparer = Preparer(spec, self.dialect, spec.key_columns, spec.key)
        return self._load(spec, self._key_rows(spec, keys), preparer, self._status_op(spec), None)

    def delete(self, spec: TableSpec, keys: Iterable[Key]) -> LoadResult:
        """Hard delete, refused unless the spec opts in with ``hard_delete=True``."""
        if not spec.hard_delete:
            raise ErpSpecError(f"table {spec.name}: hard deletes are not enabled; use deactivate()")
        preparer = Preparer(spec, self.dialect, spec.key_columns, spec.key)
        return self._load(spec, self._key_rows(spec, keys), preparer, self._delete_op(spec), None)

    def insert_rows(self, spec: TableSpec, names: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Trusted bulk append (the sandbox seeder): no validation, no conflict handling."""
        columns = [spec.column(n) for n in names]
        text_idx = [
            i for i, c in enumerate(columns) if c.type is ColumnType.DECIMAL and self.dialect.decimal_as_text
        ]
        total = 0
        for chunk in batched(rows, self.chunk_size):
            bound = [_decimals_as_text(r, text_idx) for r in chunk] if text_idx else [tuple(r) for r in chunk]
            batch = Batch(tuple(names), bound, [])
            self._session.run(lambda cur, b=batch: self._append(cur, spec, b))
            total += len(bound)
        return total

    # -- internals ---------------------------------------------------------------------------
    def _load(
        self,
        spec: TableSpec,
        rows: Iterable[Mapping[str, Any]],
        preparer: Preparer,
        op: Any,
        chunk_size: int | None,
    ) -> LoadResult:
        self.check_spec(spec)
        result = LoadResult(spec.name)
        for chunk in batched(rows, chunk_size or self.chunk_size):
            batch = preparer.prepare(chunk, result.failures)
            try:
                apply_chunk(self._session, spec, batch, op, result)
            except ErpConnectionError as exc:
                exc.partial = result  # what committed before the connection was lost
                raise
        return result

    def _append(self, cur: pyodbc.Cursor, spec: TableSpec, batch: Batch) -> None:
        d = self.dialect
        per = max(1, min(d.rows_per_insert, d.max_params // len(batch.names)))
        full = len(batch.rows) - len(batch.rows) % per
        flat = [[v for r in batch.rows[i : i + per] for v in r] for i in range(0, full, per)]
        if flat:
            cur.fast_executemany = self.fast_executemany
            cur.executemany(d.insert_values(d.q(spec.name), batch.names, per), flat)
        if rest := batch.rows[full:]:
            cur.execute(d.insert_values(d.q(spec.name), batch.names, len(rest)), [v for r in rest for v in r])

    def _staging(self, spec: TableSpec, purpose: str, names: Sequence[str]) -> tuple[str, list[Column]]:
        return staging_table(spec, purpose, names), [spec.column(n) for n in names]

    def _upsert_op(self, spec: TableSpec, preparer: Preparer) -> Any:
        d = self.dialect

        def op(cur: pyodbc.Cursor, batch: Batch) -> LoadResult:
            stg, cols = self._staging(spec, "U", batch.names)
            stage(cur, d, stg, cols, batch, self.fast_executemany)
            total, matched, changed = cur.execute(_count_sql(d, spec, stg, batch.names)).fetchone()
            cur.execute(d.upsert(spec.name, stg, batch.names, spec.key))
            changed = int(changed or 0)
            return LoadResult(
                spec.name, inserted=total - matched, updated=changed, unchanged=matched - changed
            )

        return op

    def _update_op(self, spec: TableSpec) -> Any:
        d = self.dialect

        def op(cur: pyodbc.Cursor, batch: Batch) -> LoadResult:
            stg, cols = self._staging(spec, "P", batch.names)
            stage(cur, d, stg, cols, batch, self.fast_executemany)
            missing = [_key(r) for r in cur.execute(_missing_sql(d, spec, stg)).fetchall()]
            sets = [n for n in batch.names if n not in spec.key]
            updated = 0
            if sets:
                updated = cur.execute(
                    d.update_from(spec.name, stg, sets, spec.key, d.any_differs(sets))
                ).rowcount
            failures = [RowFailure(spec.name, k, None, "update matched no row") for k in missing]
            unchanged = len(batch.rows) - len(missing) - updated
            return LoadResult(spec.name, updated=updated, unchanged=unchanged, failures=failures)

        return op

    def _optimistic_op(self, spec: TableSpec, preparer: Preparer) -> Any:
        d, version = self.dialect, spec.version_column or ""

        def op(cur: pyodbc.Cursor, batch: Batch) -> LoadResult:
            stg, cols = self._staging(spec, "V", batch.names)
            stage(cur, d, stg, cols, batch, self.fast_executemany, flag=True)
            if lock := d.lock_rows(spec.name, stg, spec.key):
                cur.execute(lock).fetchall()
            cur.execute(_mark_conflicts_sql(d, spec, stg))
            sets = [n for n in batch.names if n not in spec.key and n != version]
            ver = d.q(version)
            where = f"s.{d.q(CONFLICT_FLAG)} = 0 AND t.{ver} = s.{ver} AND {d.any_differs(sets)}"
            updated = cur.execute(d.update_from(spec.name, stg, sets, spec.key, where)).rowcount
            rows = cur.execute(_conflicts_sql(d, spec, stg)).fetchall()
            conflicts = [Conflict(spec.name, _key(r[:-2]), r[-2], r[-1]) for r in rows]
            unchanged = len(batch.rows) - len(conflicts) - updated
            return LoadResult(spec.name, updated=updated, unchanged=unchanged, conflicts=conflicts)

        return op

    def _status_op(self, spec: TableSpec) -> Any:
        d, inactive = self.dialect, spec.inactive_status

        def op(cur: pyodbc.Cursor, batch: Batch) -> LoadResult:
            stg, cols = self._staging(spec, "K", batch.names)
            stage(cur, d, stg, cols, batch, self.fast_executemany)
            updated = cur.execute(
                d.set_status(spec.name, stg, spec.status_column or "", spec.key), inactive, inactive
            ).rowcount
            return LoadResult(spec.name, updated=updated, unchanged=len(batch.rows) - updated)

        return op

    def _delete_op(self, spec: TableSpec) -> Any:
        d = self.dialect

        def op(cur: pyodbc.Cursor, batch: Batch) -> LoadResult:
            stg, cols = self._staging(spec, "K", batch.names)
            stage(cur, d, stg, cols, batch, self.fast_executemany)
            deleted = cur.execute(d.delete_listed(spec.name, stg, spec.key)).rowcount
            return LoadResult(spec.name, deleted=deleted, unchanged=len(batch.rows) - deleted)

        return op

    @staticmethod
    def _key_rows(spec: TableSpec, keys: Iterable[Key]) -> Iterator[dict[str, Any]]:
        for key in keys:
            yield dict(zip(spec.key, key, strict=True))


def _count_sql(d: Dialect, spec: TableSpec, stg: str, names: Sequence[str]) -> str:
    """Split staged rows into new / changed / unchanged before applying them."""
    k0 = f"t.{d.q(spec.key[0])}"
    update = [n for n in names if n not in spec.key]
    return (
        f"SELECT COUNT(*), COUNT({k0}), SUM(CASE WHEN {k0} IS NOT NULL AND {d.any_differs(update)} "
        f"THEN 1 ELSE 0 END) FROM {d.staging_name(stg)} s LEFT JOIN {d.q(spec.name)} t ON {d.join(spec.key)}"
    )


def _mark_conflicts_sql(d: Dialect, spec: TableSpec, stg: str) -> str:
    version, target = d.q(spec.version_column or ""), d.staging_name(stg)
    return (
        f"UPDATE {target} SET {d.q(CONFLICT_FLAG)} = 1 WHERE NOT EXISTS (SELECT 1 FROM {d.q(spec.name)} t "
        f"WHERE {d.join(spec.key, 't', target)} AND t.{version} = {target}.{version})"
    )


def _conflicts_sql(d: Dialect, spec: TableSpec, stg: str) -> str:
    version = d.q(spec.version_column or "")
    return (
        f"SELECT {d.cols(spec.key, 's')}, s.{version}, t.{version} FROM {d.staging_name(stg)} s "
        f"LEFT JOIN {d.q(spec.name)} t ON {d.join(spec.key)} WHERE s.{d.q(CONFLICT_FLAG)} = 1"
    )


def _missing_sql(d: Dialect, spec: TableSpec, stg: str) -> str:
    """Keys of staged rows with no row in the table."""
    return (
        f"SELECT {d.cols(spec.key, 's')} FROM {d.staging_name(stg)} s "
        f"LEFT JOIN {d.q(spec.name)} t ON {d.join(spec.key)} WHERE t.{d.q(spec.key[0])} IS NULL"
    )


def _key(values: Sequence[Any]) -> Key:
    return tuple(v.rstrip(" ") if isinstance(v, str) else v for v in values)


def _decimals_as_text(row: Sequence[Any], idx: Sequence[int]) -> tuple[Any, ...]:
    values = list(row)
    for i in idx:
        if isinstance(values[i], Decimal):
            values[i] = str(values[i])
    return tuple(values)


def _has_default(column_def: Any) -> bool:
    """SQLColumns' COLUMN_DEF: SQLite's and MariaDB's drivers spell "no default" as NULL."""
    return column_def is not None and str(column_def).strip().upper() not in ("", "NULL")
