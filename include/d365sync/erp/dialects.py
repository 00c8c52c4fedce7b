"""SQL dialects: quoting, DDL types and the set-based statements that differ per database.

Every statement is assembled from identifiers that passed :data:`spec.IDENTIFIER` and are
quoted here; values are always ``?`` parameters. Supported: SQLite (SQLite3 ODBC driver),
PostgreSQL (psqlODBC), MariaDB/MySQL (Connector/ODBC) and SQL Server (MS ODBC Driver 17/18,
statements written to its documentation but not exercised by the test-suite).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from d365sync.erp.spec import IDENTIFIER, Column, ColumnType

CONFLICT_FLAG = "STG_CONFLICT"  # extra staging column marking version conflicts


@dataclass(frozen=True)
class Join:
    """Equality of key columns between a target alias ``t`` and a staging alias ``s``."""

    keys: Sequence[str]


class Dialect:
    """Base dialect: ANSI-ish SQL with ``LIMIT``; subclasses override what differs."""

    name = "ansi"
    open_quote, close_quote = '"', '"'
    max_params = 2000  # per statement
    rows_per_insert = 200  # rows per multi-row VALUES statement when staging
    fast_executemany = False
    decimal_as_text = False  # bind DECIMAL values as text (driver cannot bind them exactly)
    lock_suffix = " FOR UPDATE"
    maxwrite: int | None = None  # pyodbc Connection.maxwrite (data-at-execution threshold)

    def q(self, ident: str) -> str:
        """Quote one allow-listed identifier; anything else is a programming error."""
        if not IDENTIFIER.match(ident.lstrip("#")):
            raise ValueError(f"refusing to quote identifier {ident!r}")
        return f"{self.open_quote}{ident}{self.close_quote}"

    def cols(self, names: Sequence[str], alias: str | None = None) -> str:
        prefix = f"{alias}." if alias else ""
        return ", ".join(prefix + self.q(n) for n in names)

    def join(self, keys: Sequence[str], left: str = "t", right: str = "s") -> str:
        return " AND ".join(f"{left}.{self.q(k)} = {right}.{self.q(k)}" for k in keys)

    def text_length(self, value: str) -> int:
        """Length as the database counts it against VARCHAR(n): code points by default."""
        return len(value)

    def column_type(self, col: Column) -> str:
        match col.type:
            case ColumnType.CHAR:
                return f"CHAR({col.length})"
            case ColumnType.VARCHAR:
                return f"VARCHAR({col.length})"
            case ColumnType.DECIMAL:
                return f"DECIMAL({col.precision},{col.scale})"
            case ColumnType.INTEGER:
                return "INTEGER"
            case ColumnType.TIMESTAMP:
                return self.timestamp_type
            case ColumnType.DATE8:
                return "CHAR(8)"
        raise ValueError(col.type)

    timestamp_type = "TIMESTAMP"

    # -- reading -----------------------------------------------------------------------------
    def select_page(self, table: str, names: Sequence[str], where: str, order: Sequence[str], n: int) -> str:
        clause = f" WHERE {where}" if where else ""
        return (
            f"SELECT {self.cols(names)} FROM {self.q(table)}{clause} "
            f"ORDER BY {self.cols(order)} LIMIT {int(n)}"
        )

    def differs(self, left: str, right: str) -> str:
        """Null-safe inequality, so NULL → value counts as a change and NULL → NULL does not."""
        return f"{left} IS DISTINCT FROM {right}"

    def any_differs(self, names: Sequence[str], left: str = "t", right: str = "s") -> str:
        parts = [self.differs(f"{left}.{self.q(n)}", f"{right}.{self.q(n)}") for n in names]
        return "(" + " OR ".join(parts) + ")" if parts else "(1 = 0)"

    # -- staging -----------------------------------------------------------------------------
    def staging_name(self, name: str) -> str:
        return self.q(name)

    def create_staging(self, name: str, columns: Sequence[Column], flag: bool = False) -> str:
        defs = [f"{self.q(c.name)} {self.column_type(c)}" for c in columns]
        if flag:
            defs.append(f"{self.q(CONFLICT_FLAG)} INTEGER DEFAULT 0")
        return f"CREATE TEMPORARY TABLE IF NOT EXISTS {self.staging_name(name)} ({', '.join(defs)})"

    def clear_staging(self, name: str) -> str:
        return f"DELETE FROM {self.staging_name(name)}"

    def insert_values(self, table_sql: str, names: Sequence[str], rows: int) -> str:
        one = "(" + ", ".join("?" * len(names)) + ")"
        return f"INSERT INTO {table_sql} ({self.cols(names)}) VALUES " + ", ".join([one] * rows)

    # -- writing -----------------------------------------------------------------------------
    def upsert(self, table: str, stg: str, names: Sequence[str], keys: Sequence[str]) -> str:
        """INSERT … ON CONFLICT that skips rows whose values are unchanged (idempotent)."""
        update = [n for n in names if n not in keys]
        head = (
            f"INSERT INTO {self.q(table)} AS t ({self.cols(names)}) "
            f"SELECT {self.cols(names)} FROM {self.staging_name(stg)} WHERE 1 = 1 "
            f"ON CONFLICT ({self.cols(keys)}) DO "
        )
        if not update:
            return head + "NOTHING"
        sets = ", ".join(f"{self.q(n)} = excluded.{self.q(n)}" for n in update)
        return head + f"UPDATE SET {sets} WHERE {self.any_differs(update, 't', 'excluded')}"

    def update_from(self, table: str, stg: str, sets: Sequence[str], keys: Sequence[str], where: str) -> str:
        """UPDATE target t from staging s; ``sets`` are columns copied from s."""
        assign = ", ".join(f"{self.q(n)} = s.{self.q(n)}" for n in sets)
        return (
            f"UPDATE {self.q(table)} AS t SET {assign} FROM {self.staging_name(stg)} AS s "
            f"WHERE {self.join(keys)} AND {where}"
        )

    def set_status(self, table: str, stg: str, status: str, keys: Sequence[str]) -> str:
        """Set a status flag (value parameter ``?``) on the rows listed in staging."""
        col = self.q(status)
        return (
            f"UPDATE {self.q(table)} SET {col} = ? WHERE ({col} IS NULL OR {col} <> ?) AND EXISTS "
            f"(SELECT 1 FROM {self.staging_name(stg)} s WHERE {self.join(keys, self.q(table), 's')})"
        )

    def delete_listed(self, table: str, stg: str, keys: Sequence[str]) -> str:
        return (
            f"DELETE FROM {self.q(table)} WHERE EXISTS "
            f"(SELECT 1 FROM {self.staging_name(stg)} s WHERE {self.join(keys, self.q(table), 's')})"
        )

    def lock_rows(self, table: str, stg: str, keys: Sequence[str]) -> str | None:
        """Lock the target rows named in staging, so a version check and its update are atomic."""
        return (
            f"SELECT t.{self.q(keys[0])} FROM {self.q(table)} t "
            f"JOIN {self.staging_name(stg)} s ON {self.join(keys)}{self.lock_suffix}"
        )


class SqliteDialect(Dialect):
    """SQLite ≥ 3.33 (UPDATE … FROM). The database lock makes row locks unnecessary."""

    name = "sqlite"
    max_params = 32766
    decimal_as_text = True  # fast paths in the driver lose precision on Decimal binding

    def differs(self, left: str, right: str) -> str:
        return f"{left} IS NOT {right}"

    def create_staging(self, name: str, columns: Sequence[Column], flag: bool = False) -> str:
        return super().create_staging(name, columns, flag).replace("TEMPORARY", "TEMP", 1)

    def lock_rows(self, table: str, stg: str, keys: Sequence[str]) -> str | None:
        return None  # a concurrent writer makes our write fail with "database is locked"


class PostgresDialect(Dialect):
    name = "postgresql"
    max_params = 32767
    timestamp_type = "TIMESTAMP(0)"  # legacy second precision
    fast_executemany = True  # psqlODBC accepts parameter arrays

    def create_staging(self, name: str, columns: Sequence[Column], flag: bool = False) -> str:
        return super().create_staging(name, columns, flag).replace("TEMPORARY", "TEMP", 1)

    def lock_rows(self, table: str, stg: str, keys: Sequence[str]) -> str | None:
        return super().lock_rows(table, stg, keys) + " OF t"


class MariaDbDialect(Dialect):
    """MariaDB / MySQL. Connector/ODBC fails on parameter arrays, so no fast_executemany."""

    name = "mariadb"
    open_quote, close_quote = "`", "`"
    # Connector/ODBC 3.1 corrupts or rejects text sent as data-at-execution (SQLPutData), which
    # pyodbc uses beyond ~127 characters; binding every value directly avoids that path.
    maxwrite = 1 << 20
    max_params = 65535
    timestamp_type = "DATETIME"

    def differs(self, left: str, right: str) -> str:
        return f"NOT ({left} <=> {right})"

    def upsert(self, table: str, stg: str, names: Sequence[str], keys: Sequence[str]) -> str:
        """ON DUPLICATE KEY UPDATE fed only with new or changed rows, so triggers see no no-ops."""
        update = [n for n in names if n not in keys] or list(keys[:1])
        sets = ", ".join(f"{self.q(n)} = VALUES({self.q(n)})" for n in update)
        changed = self.any_differs([n for n in names if n not in keys])
        return (
            f"INSERT INTO {self.q(table)} ({self.cols(names)}) "
            f"SELECT {self.cols(names, 's')} FROM {self.staging_name(stg)} s "
            f"LEFT JOIN {self.q(table)} t ON {self.join(keys)} "
            f"WHERE t.{self.q(keys[0])} IS NULL OR {changed} "
            f"ON DUPLICATE KEY UPDATE {sets}"
        )

    def update_from(self, table: str, stg: str, sets: Sequence[str], keys: Sequence[str], where: str) -> str:
        assign = ", ".join(f"t.{self.q(n)} = s.{self.q(n)}" for n in sets)
        return (
            f"UPDATE {self.q(table)} t JOIN {self.staging_name(stg)} s ON {self.join(keys)} "
            f"SET {assign} WHERE {where}"
        )


class MsSqlDialect(Dialect):
    """SQL Server via Microsoft ODBC Driver 17/18 (MERGE … WITH (HOLDLOCK); #temp staging)."""

    name = "mssql"
    open_quote, close_quote = "[", "]"
    max_params = 2000  # the server allows 2100 per request
    fast_executemany = True
    timestamp_type = "DATETIME2(0)"
    lock_suffix = ""

    def text_length(self, value: str) -> int:
        return len(value.encode("utf-16-le")) // 2  # NVARCHAR(n) counts UTF-16 code units

    def column_type(self, col: Column) -> str:
        base = super().column_type(col)
        return "N" + base if col.type in (ColumnType.CHAR, ColumnType.VARCHAR) else base

    def select_page(self, table: str, names: Sequence[str], where: str, order: Sequence[str], n: int) -> str:
        clause = f" WHERE {where}" if where else ""
        return (
            f"SELECT TOP ({int(n)}) {self.cols(names)} FROM {self.q(table)}{clause} "
            f"ORDER BY {self.cols(order)}"
        )

    def differs(self, left: str, right: str) -> str:
        return f"EXISTS (SELECT {left} EXCEPT SELECT {right})"

    def staging_name(self, name: str) -> str:
        return self.q("#" + name)

    def create_staging(self, name: str, columns: Sequence[Column], flag: bool = False) -> str:
        body = Dialect.create_staging(self, name, columns, flag).split(" (", 1)[1]
        stg = self.staging_name(name)
        return f"IF OBJECT_ID('tempdb..#{name}') IS NULL CREATE TABLE {stg} ({body}"

    def upsert(self, table: str, stg: str, names: Sequence[str], keys: Sequence[str]) -> str:
        update = [n for n in names if n not in keys]
        merge = (
            f"MERGE INTO {self.q(table)} WITH (HOLDLOCK) AS t USING {self.staging_name(stg)} AS s "
            f"ON {self.join(keys)} "
        )
        if update:
            sets = ", ".join(f"t.{self.q(n)} = s.{self.q(n)}" for n in update)
            merge += f"WHEN MATCHED AND {self.any_differs(update)} THEN UPDATE SET {sets} "
        return (
            merge
            + f"WHEN NOT MATCHED BY TARGET THEN INSERT ({self.cols(names)}) VALUES ({self.cols(names, 's')});"
        )

    def update_from(self, table: str, stg: str, sets: Sequence[str], keys: Sequence[str], where: str) -> str:
        assign = ", ".join(f"t.{self.q(n)} = s.{self.q(n)}" for n in sets)
        return (
            f"UPDATE t SET {assign} FROM {self.q(table)} t "
            f"JOIN {self.staging_name(stg)} s ON {self.join(keys)} WHERE {where}"
        )

    def lock_rows(self, table: str, stg: str, keys: Sequence[str]) -> str | None:
        return (
            f"SELECT t.{self.q(keys[0])} FROM {self.q(table)} t WITH (UPDLOCK, HOLDLOCK) "
            f"JOIN {self.staging_name(stg)} s ON {self.join(keys)}"
        )


DIALECTS: dict[str, type[Dialect]] = {
    d.name: d for d in (SqliteDialect, PostgresDialect, MariaDbDialect, MsSqlDialect)
}

# SQL_DBMS_NAME as reported by each driver → dialect name.
_DBMS_NAMES = {"sqlite": "sqlite", "postgresql": "postgresql", "mariadb": "mariadb", "mysql": "mariadb"}


def dialect_for(name: str) -> Dialect:
    """A dialect by its configured name (``sqlite``, ``postgresql``, ``mariadb``, ``mssql``)."""
    try:
        return DIALECTS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown ERP dialect {name!r}; choose one of {sorted(DIALECTS)}") from None


def detect_dialect(dbms_name: str) -> Dialect:
    """Map the driver's SQL_DBMS_NAME to a dialect; unknown databases are refused, not guessed."""
    lowered = dbms_name.strip().lower()
    if "sql server" in lowered:
        return MsSqlDialect()
    if lowered in _DBMS_NAMES:
        return dialect_for(_DBMS_NAMES[lowered])
    raise ValueError(f"cannot detect an ERP dialect for DBMS {dbms_name!r}; configure one explicitly")
