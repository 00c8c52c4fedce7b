"""Column types shared by the head schema and the frozen migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Dialect,
    Integer,
    MetaData,
    Table,
    TypeDecorator,
    text,
)

#: An autoincrement primary key: BIGINT on PostgreSQL, INTEGER (rowid alias) on SQLite.
IdType = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend.

    Why: SQLite drops the offset, so naive values would come back and comparisons with aware
    datetimes from the extracts would raise. Everything is stored in UTC and handed back aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def add_column(conn: Connection, table: str, column: str, ddl_type: str) -> None:
    """``ALTER TABLE <table> ADD COLUMN <column> <ddl_type>`` in the connection's schema (the
    store's ``schema_translate_map``), quoted for its dialect: how a migration adds a column."""
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
    target = conn.dialect.identifier_preparer.format_table(Table(table, MetaData(), schema=schema))
    conn.execute(text(f"ALTER TABLE {target} ADD COLUMN {column} {ddl_type}"))
