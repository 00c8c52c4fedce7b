"""Conversions, spec validation, dialect SQL and retry classification — no database needed."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from decimal import Decimal

import pyodbc
import pytest
from pydantic import ValidationError

from d365sync.erp import Column, ColumnType, RetryPolicy, TableSpec, dialect_for, is_transient
from d365sync.erp.convert import parse_date8, read_converter, to_db
from d365sync.erp.dialects import detect_dialect
from d365sync.erp.errors import RowRejected

AMOUNT = Column(name="AMT", type=ColumnType.DECIMAL, precision=7, scale=2)
NAME = Column(name="NAME", type=ColumnType.VARCHAR, length=5)
CODE = Column(name="CODE", type=ColumnType.CHAR, length=4)
DATE = Column(name="D8", type=ColumnType.DATE8)
PG, MSSQL, SQLITE = dialect_for("postgresql"), dialect_for("mssql"), dialect_for("sqlite")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12.5", Decimal("12.50")),
        (3, Decimal("3.00")),
        (0.1, Decimal("0.10")),
        (Decimal("-99999.99"), Decimal("-99999.99")),
    ],
)
def test_decimal_write_is_exact(value: object, expected: Decimal) -> None:
    assert to_db(AMOUNT, value, PG) == expected
    assert to_db(AMOUNT, value, SQLITE) == str(expected)  # SQLite binds DECIMAL as text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("12,5O", "not a number for DECIMAL(7,2): '12,5O'"),
        ("1.005", "more than 2 decimals"),
        ("100000.00", "does not fit DECIMAL(7,2)"),
        (True, "not a number"),
        ("NaN", "not a finite number"),
    ],
)
def test_decimal_write_rejects(value: object, message: str) -> None:
    with pytest.raises(RowRejected, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        to_db(AMOUNT, value, PG)
    assert info.value.column == "AMT"


def test_decimal_read_from_text_and_float_is_exact() -> None:
    read = read_converter(AMOUNT)
    assert read is not None
    assert read("1.1") == Decimal("1.10") and read(0.1) == Decimal("0.10") and read(None) is None


def test_char_padding_is_stripped_on_read_only() -> None:
    read = read_converter(CODE)
    assert read is not None and read("AB  ") == "AB"
    assert read_converter(NAME) is None  # VARCHAR trailing blanks are data (dirty, but data)
    assert to_db(CODE, "AB  ", PG) == "AB  "


def test_text_length_counts_like_the_database() -> None:
    assert to_db(NAME, "😀😀😀😀😀", PG) == "😀😀😀😀😀"  # 5 code points
    with pytest.raises(RowRejected, match=r"10 characters; the column limit is VARCHAR\(5\)"):
        to_db(NAME, "😀😀😀😀😀", MSSQL)  # NVARCHAR counts UTF-16 units
    with pytest.raises(RowRejected, match="expected text"):
        to_db(NAME, 12, PG)


def test_legacy_dates_both_ways() -> None:
    assert parse_date8("20240229") == dt.date(2024, 2, 29)
    assert parse_date8("        ") is None and parse_date8("00000000") is None
    assert to_db(DATE, dt.date(2024, 1, 31), PG) == "20240131"
    assert to_db(DATE, "20240131", PG) == "20240131"
    with pytest.raises(ValueError):
        parse_date8("20241341")
    with pytest.raises(RowRejected, match="not a date"):
        to_db(DATE, "31.01.2024", PG)


def test_not_null_and_integers() -> None:
    key = Column(name="K", type=ColumnType.INTEGER, nullable=False)
    with pytest.raises(RowRejected, match="must not be empty"):
        to_db(key, None, PG)
    with pytest.raises(RowRejected, match="out of INTEGER range"):
        to_db(key, 2**40, PG)


def test_spec_rejects_unknown_and_unsafe_names() -> None:
    with pytest.raises(ValidationError, match="table T: unknown column 'NOPE'"):
        TableSpec(name="T", columns=(NAME,), key=("NOPE",))
    with pytest.raises(ValidationError):
        TableSpec(name="T; DROP TABLE X", columns=(NAME,), key=("NAME",))
    with pytest.raises(ValidationError, match="needs a length"):
        Column(name="C", type=ColumnType.VARCHAR)


def test_quoting_refuses_anything_but_plain_identifiers() -> None:
    assert PG.q("CUST_NO") == '"CUST_NO"' and dialect_for("mariadb").q("A") == "`A`" and MSSQL.q("A") == "[A]"
    with pytest.raises(ValueError):
        PG.q('A"; DROP TABLE X; --')


def test_dialect_detection() -> None:
    assert detect_dialect("Microsoft SQL Server").name == "mssql"
    assert detect_dialect("MySQL").name == "mariadb" and detect_dialect("PostgreSQL").name == "postgresql"
    with pytest.raises(ValueError, match="configure one explicitly"):
        detect_dialect("Informix")


def test_upsert_statements_per_dialect() -> None:
    names, keys = ("K", "V"), ("K",)
    assert 'ON CONFLICT ("K") DO UPDATE SET "V" = excluded."V" WHERE (t."V" IS DISTINCT FROM' in PG.upsert(
        "T", "S", names, keys
    )
    assert "ON DUPLICATE KEY UPDATE `V` = VALUES(`V`)" in dialect_for("mariadb").upsert("T", "S", names, keys)
    merge = MSSQL.upsert("T", "S", names, keys)
    assert (
        merge.startswith("MERGE INTO [T] WITH (HOLDLOCK) AS t USING [#S] AS s")
        and "WHEN NOT MATCHED BY TARGET" in merge
    )


def test_transient_classification() -> None:
    assert is_transient(pyodbc.OperationalError("08S01", "Communication link failure"))
    assert is_transient(pyodbc.Error("HY000", "server closed the connection unexpectedly"))
    assert is_transient(pyodbc.ProgrammingError("Attempt to use a closed connection."))
    assert not is_transient(pyodbc.IntegrityError("23505", "duplicate key value"))
    assert not is_transient(ValueError("08S01"))


def test_backoff_is_capped_and_counted() -> None:
    delays = list(RetryPolicy(attempts=6, base_delay=1, max_delay=4, jitter=0).delays())
    assert delays == [1, 2, 4, 4, 4]


@pytest.mark.parametrize(
    "module", ["d365sync.erp", "d365sync.sandbox.erp.seeder", "d365sync.sandbox.erp_cli"]
)
def test_erp_and_sandbox_never_import_airflow(module: str) -> None:
    leaked = "any(m == 'airflow' or m.startswith('airflow.') for m in sys.modules)"
    code = f"import sys, {module}; sys.exit({leaked})"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
