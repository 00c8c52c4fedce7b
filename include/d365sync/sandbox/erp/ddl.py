"""DDL of the sandbox ERP for SQLite, PostgreSQL and MariaDB, generated from the table specs.

Tables get legacy column types from the dialect; the ERP-maintained columns get triggers the
way an old system would keep them: ``LAST_UPD`` is stamped (second precision) on insert and on
every update that does not set it itself, and ``ROW_VER`` goes up by one on every update.
SQLite has no length enforcement, so CHECK constraints make it reject over-long text like a
real server would.
"""

from __future__ import annotations

from d365sync.erp.dialects import Dialect, MariaDbDialect, PostgresDialect, SqliteDialect
from d365sync.erp.spec import Column, ColumnType, TableSpec
from d365sync.sandbox.erp.tables import TABLES

_SQLITE_NOW = "(strftime('%Y-%m-%d %H:%M:%S','now') || '.000')"  # same text form the driver binds
_PG_NOW = "date_trunc('second', clock_timestamp())::timestamp(0)"


def schema_statements(dialect: Dialect) -> list[str]:
    """CREATE statements for every sandbox table, its indexes and triggers."""
    statements = list(_functions(dialect))
    for spec in TABLES:
        statements.append(create_table(dialect, spec))
        statements.extend(_indexes(dialect, spec))
        statements.extend(_triggers(dialect, spec))
    return statements


def drop_statements(dialect: Dialect) -> list[str]:
    """Drop everything :func:`schema_statements` creates, so ``init`` can start over."""
    drops = [f"DROP TABLE IF EXISTS {dialect.q(spec.name)}" for spec in reversed(TABLES)]
    if isinstance(dialect, PostgresDialect):
        drops += [f'DROP FUNCTION IF EXISTS "{fn}"() CASCADE' for fn in ("ERP_TOUCH", "ERP_TOUCH_VER")]
    return drops


def create_table(dialect: Dialect, spec: TableSpec) -> str:
    parts = [_column_ddl(dialect, spec, col) for col in spec.columns]
    parts.append(f"PRIMARY KEY ({dialect.cols(spec.key)})")
    return f"CREATE TABLE {dialect.q(spec.name)} ({', '.join(parts)})"


def _column_ddl(dialect: Dialect, spec: TableSpec, col: Column) -> str:
    ddl = f"{dialect.q(col.name)} {dialect.column_type(col)}"
    if col.name == spec.cursor_column:
        ddl += f" NOT NULL DEFAULT {_now(dialect)}"
    elif col.name == spec.version_column:
        ddl += " NOT NULL DEFAULT 1"
    elif not col.nullable:
        ddl += " NOT NULL"
    if isinstance(dialect, SqliteDialect) and col.type in (ColumnType.CHAR, ColumnType.VARCHAR):
        ddl += f" CHECK (length({dialect.q(col.name)}) <= {col.length})"
    return ddl


def _now(dialect: Dialect) -> str:
    if isinstance(dialect, SqliteDialect):
        return _SQLITE_NOW
    if isinstance(dialect, PostgresDialect):
        return "date_trunc('second', LOCALTIMESTAMP)"
    return "CURRENT_TIMESTAMP"


def _indexes(dialect: Dialect, spec: TableSpec) -> list[str]:
    """The cursor index matches the extract's keyset order (cursor, key)."""
    if spec.cursor_column is None:
        return []
    name = dialect.q(f"IX_{spec.name}_{spec.cursor_column}")
    return [
        f"CREATE INDEX {name} ON {dialect.q(spec.name)} ({dialect.cols((spec.cursor_column, *spec.key))})"
    ]


def _functions(dialect: Dialect) -> list[str]:
    if not isinstance(dialect, PostgresDialect):
        return []
    stamp = f'IF NEW."LAST_UPD" IS NOT DISTINCT FROM OLD."LAST_UPD" THEN NEW."LAST_UPD" := {_PG_NOW}; END IF;'
    bump = 'NEW."ROW_VER" := OLD."ROW_VER" + 1;'
    return [
        f'CREATE OR REPLACE FUNCTION "{name}"() RETURNS trigger LANGUAGE plpgsql AS $$ '
        f"BEGIN {body} RETURN NEW; END $$"
        for name, body in (("ERP_TOUCH", stamp), ("ERP_TOUCH_VER", stamp + " " + bump))
    ]


def _triggers(dialect: Dialect, spec: TableSpec) -> list[str]:
    if spec.cursor_column is None:
        return []
    versioned = spec.version_column is not None
    trigger, table = dialect.q(f"TRG_{spec.name}_UPD"), dialect.q(spec.name)
    if isinstance(dialect, PostgresDialect):
        fn = "ERP_TOUCH_VER" if versioned else "ERP_TOUCH"
        return [f'CREATE TRIGGER {trigger} BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION "{fn}"()']
    if isinstance(dialect, MariaDbDialect):
        bump = " SET NEW.`ROW_VER` = OLD.`ROW_VER` + 1;" if versioned else ""
        return [
            f"CREATE TRIGGER {trigger} BEFORE UPDATE ON {table} FOR EACH ROW BEGIN "
            f"IF NEW.`LAST_UPD` <=> OLD.`LAST_UPD` THEN SET NEW.`LAST_UPD` = NOW(); END IF;{bump} END"
        ]
    return [_sqlite_trigger(dialect, spec, trigger, table)]


def _sqlite_trigger(dialect: Dialect, spec: TableSpec, trigger: str, table: str) -> str:
    """AFTER UPDATE re-stamps the row; recursive triggers are off, so it fires once."""
    stamp = (
        f'"LAST_UPD" = CASE WHEN NEW."LAST_UPD" IS OLD."LAST_UPD" THEN {_SQLITE_NOW} ELSE NEW."LAST_UPD" END'
    )
    sets = stamp + (', "ROW_VER" = OLD."ROW_VER" + 1' if spec.version_column else "")
    return (
        f"CREATE TRIGGER {trigger} AFTER UPDATE ON {table} FOR EACH ROW BEGIN "
        f"UPDATE {table} SET {sets} WHERE rowid = NEW.rowid; END"
    )
