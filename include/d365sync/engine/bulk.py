"""``executemany`` of state-store rows without SQLAlchemy's per-row parameter handling on SQLite.

For every row of an ``executemany``, SQLAlchemy builds a parameter dictionary and runs each
column's bind processor through its generic machinery. For a chunk of key-map or audit rows
that cost more than SQLite's own insert: it was the largest single item of an initial sync's
profile (issue 14). SQLite's driver runs in this process, so the rows can go to it directly:
the statement is compiled once, each column's bind processor is looked up once, and the rows
are handed over as tuples. Values are converted by the same processors SQLAlchemy would use,
so what is stored is identical.

Other dialects keep SQLAlchemy's path: psycopg2 and the MariaDB driver batch the rows into
multi-row statements there, which a plain driver ``executemany`` (a round trip per row) would
undo. So does a statement that needs anything SQLAlchemy computes per row (Python-side column
defaults) or a schema translation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import Executable

from d365sync.engine.migrations.types import UtcDateTime


def execute_many(conn: Connection, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> int:
    """Run ``statement`` once per row; rows carry the keys of the first one. Returns the rows
    matched in all where the driver counts them (``supports_sane_multi_rowcount``), else -1.

    Parameters the rows do not name take the value bound in the statement (a literal in a
    ``WHERE``), as with SQLAlchemy.
    """
    if not rows:
        return 0
    dialect = conn.dialect
    if dialect.name != "sqlite" or conn.get_execution_options().get("schema_translate_map"):
        return conn.execute(statement, list(rows)).rowcount
    compiled = statement.compile(dialect=dialect, column_keys=list(rows[0]))  # type: ignore[attr-defined]
    names = compiled.positiontup
    per_row_defaults = getattr(compiled, "insert_prefetch", None) or getattr(
        compiled, "update_prefetch", None
    )
    if names is None or per_row_defaults:
        return conn.execute(statement, list(rows)).rowcount
    fields: list[tuple[str, Callable[[Any], Any] | None, Any]] = []  # name, converter, fixed value
    for name in names:
        bind = compiled.binds[name]
        convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if name in rows[0]:
            if convert is not None and isinstance(bind.type, UtcDateTime):
                convert = _remembered(convert)
            fields.append((name, convert, _PER_ROW))
        else:
            value = bind.effective_value
            fields.append((name, None, value if convert is None else convert(value)))
    params = [
        tuple(
            [
                fixed if fixed is not _PER_ROW else row[name] if convert is None else convert(row[name])
                for name, convert, fixed in fields
            ]
        )
        for row in rows
    ]
    return conn.exec_driver_sql(str(compiled), params).rowcount


_PER_ROW: Any = object()


def _remembered(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert`` with its results kept for the rows of one statement.

    Timestamps repeat within a chunk (every row's ``updated_at`` is the same instant), and
    formatting one for SQLite costs about as much as inserting the row. Only for
    ``UtcDateTime`` columns: equal instants in different zones are equal keys, and that type
    stores them alike (in UTC).
    """
    seen: dict[Any, Any] = {}

    def once(value: Any) -> Any:
        try:
            return seen[value]
        except KeyError:
            seen[value] = out = convert(value)
            return out

    return once
