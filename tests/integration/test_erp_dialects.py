"""Acceptance tests of the ERP client and sandbox through the real ODBC drivers.

Every test runs for SQLite (always), PostgreSQL and MariaDB (``postgres`` / ``mariadb``
markers: skipped locally when the server is down, failing in CI). Each session gets its own
PostgreSQL schema / MariaDB database, dropped at the end, so parallel runs never collide.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pyodbc
import pytest

from d365sync.erp import (
    NO_RETRY,
    Column,
    ColumnType,
    ErpClient,
    ErpConnectionError,
    ErpSpecError,
    ExtractCursor,
    RetryPolicy,
    Row,
    TableSpec,
)
from d365sync.sandbox.erp.seeder import init_sandbox
from d365sync.sandbox.erp.tables import CUST_MASTER, INV_HEADER, ITEM_STOCK, SO_HEADER

DIALECTS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
]
SESSION_TAG = f"erp_t_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def pg_erp_conn_str(pg_odbc_conn_str: str) -> Iterator[str]:
    admin = pyodbc.connect(pg_odbc_conn_str, autocommit=True)
    admin.execute(f'CREATE SCHEMA "{SESSION_TAG}"')
    yield pg_odbc_conn_str + f"ConnSettings=SET search_path TO {SESSION_TAG};"
    admin.execute(f'DROP SCHEMA "{SESSION_TAG}" CASCADE')
    admin.close()


@pytest.fixture(scope="session")
def mariadb_erp_conn_str(mariadb_odbc_conn_str: str) -> Iterator[str]:
    admin = pyodbc.connect(mariadb_odbc_conn_str, autocommit=True)
    admin.execute(f"CREATE DATABASE `{SESSION_TAG}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    yield mariadb_odbc_conn_str.replace("DATABASE=test;", f"DATABASE={SESSION_TAG};")
    admin.execute(f"DROP DATABASE `{SESSION_TAG}`")
    admin.close()


@pytest.fixture(params=DIALECTS)
def conn_str(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"DRIVER={{SQLite3}};Database={tmp_path / 'erp.db'};"
    fixture = "pg_erp_conn_str" if request.param == "postgresql" else "mariadb_erp_conn_str"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def client(conn_str: str) -> Iterator[ErpClient]:
    with ErpClient(conn_str, retry=RetryPolicy(sleep=lambda _: None)) as erp:
        init_sandbox(erp, rows=300, seed=7)
        yield erp


@pytest.fixture
def other(conn_str: str) -> Iterator[pyodbc.Connection]:
    """A second, independent session: the 'other user' of the ERP."""
    conn = pyodbc.connect(conn_str, autocommit=True)
    yield conn
    conn.close()


def q(client: ErpClient, name: str) -> str:
    return client.dialect.q(name)


def customer(n: int, **overrides: Any) -> dict[str, Any]:
    row = {
        "CUST_NO": f"U{n:09d}",
        "CUST_NAME": f"Customer {n}",
        "CUST_EMAIL_ID": f"c{n}@example.com",
        "PHONE": "+44 1234",
        "ADDR_LINE1": f"{n} High Street",
        "ADDR_LINE2": None,
        "CITY": "London",
        "POSTCODE": "N1 9GU",
        "COUNTRY": "GB",
        "CURR_CODE": "STG",
        "CREDIT_LIMIT": Decimal("1000.50"),
        "PAY_TERMS": "N30",
        "STATUS": "A",
        "REMARKS": None,
    }
    return row | overrides


def all_rows(client: ErpClient, spec: TableSpec) -> list[dict[str, Any]]:
    return [row for chunk in client.iter_rows(spec) for row in chunk]


def extract(client: ErpClient, since: ExtractCursor | None) -> tuple[list[dict[str, Any]], ExtractCursor]:
    stream = client.extract_changes(CUST_MASTER, since, overlap=dt.timedelta(seconds=5), chunk_size=64)
    rows = [row for chunk in stream for row in chunk]
    return rows, stream.cursor


# -- schema and seeding --------------------------------------------------------------------
def test_schema_creation_and_deterministic_seed(client: ErpClient) -> None:
    report = init_sandbox(client, rows=2000, seed=11)
    assert report.rows["CUST_MASTER"] == 2000
    assert client.scalar(f"SELECT COUNT(*) FROM {q(client, 'SO_HEADER')}") == report.rows["SO_HEADER"]
    assert set(report.dirty) == {
        "invalid_email",
        "blank_name",
        "duplicate_customer",
        "trailing_spaces",
        "unknown_currency",
        "negative_stock",
        "gross_off_by_cent",
        "orphan_order",
    }
    first = [r for c in client.diff_snapshot(SO_HEADER, {}) for r in c.hashes.items()]
    init_sandbox(client, rows=2000, seed=11)
    assert [r for c in client.diff_snapshot(SO_HEADER, {}) for r in c.hashes.items()] == first


def test_seeded_dirty_data_is_really_there(client: ErpClient) -> None:
    init_sandbox(client, rows=2000, seed=11)
    so, cm, key = q(client, "SO_HEADER"), q(client, "CUST_MASTER"), q(client, "CUST_NO")
    orphans = client.scalar(
        f"SELECT COUNT(*) FROM {so} s WHERE NOT EXISTS (SELECT 1 FROM {cm} c WHERE c.{key} = s.{key})"
    )
    assert 5 <= orphans <= 30
    assert (
        client.scalar(f"SELECT COUNT(*) FROM {q(client, 'ITEM_STOCK')} WHERE {q(client, 'QTY_ON_HAND')} < 0")
        >= 1
    )
    rows = all_rows(client, CUST_MASTER)
    assert any(r["CUST_NAME"] and r["CUST_NAME"].endswith(" ") for r in rows)  # VARCHAR keeps trailing blanks


def test_tidy_fixes_what_would_fail_the_thresholds_and_keeps_the_rest_dirty(client: ErpClient) -> None:
    from d365sync.sandbox.erp.seeder import tidy
    from d365sync.sandbox.erp.tables import CURRENCIES

    init_sandbox(client, rows=2000, seed=11)
    emails_before = [r["CUST_EMAIL_ID"] for r in all_rows(client, CUST_MASTER)]
    tidy(client)
    rows = all_rows(client, CUST_MASTER)
    assert all((r["CUST_NAME"] or "").strip() for r in rows)
    assert {r["CURR_CODE"] for r in rows} <= {legacy for legacy, _iso, _name in CURRENCIES}
    stock = client.scalar(
        f"SELECT COUNT(*) FROM {q(client, 'ITEM_STOCK')} WHERE {q(client, 'QTY_ON_HAND')} < 0"
    )
    assert stock == 0
    assert [r["CUST_EMAIL_ID"] for r in rows] == emails_before  # invalid e-mails stay for quarantine


def test_triggers_maintain_last_upd_and_row_ver(client: ErpClient, other: pyodbc.Connection) -> None:
    before = all_rows(client, CUST_MASTER)[0]
    other.execute(
        f"UPDATE {q(client, 'CUST_MASTER')} SET {q(client, 'CITY')} = ? WHERE {q(client, 'CUST_NO')} = ?",
        "Leeds",
        before["CUST_NO"],
    )
    after = all_rows(client, CUST_MASTER)[0]
    assert after["ROW_VER"] == before["ROW_VER"] + 1
    assert after["LAST_UPD"] > before["LAST_UPD"]


# -- cursor extract ------------------------------------------------------------------------
def test_cursor_extract_catches_update_with_the_watermark_timestamp(
    client: ErpClient, other: pyodbc.Connection
) -> None:
    rows, cursor = extract(client, None)
    assert len(rows) == 300
    cursor = ExtractCursor.from_dict(json.loads(json.dumps(cursor.to_dict())))  # as the caller stores it
    watermark = cursor.value
    assert isinstance(watermark, dt.datetime)
    # The ERP stamps at second precision: a change in the same second gets the same LAST_UPD.
    cm, name, stamp, key = (q(client, n) for n in ("CUST_MASTER", "CUST_NAME", "LAST_UPD", "CUST_NO"))
    other.execute(
        f"UPDATE {cm} SET {name} = ?, {stamp} = ? WHERE {key} = ?",
        "Same Second Ltd",
        watermark,
        rows[10]["CUST_NO"],
    )
    late = watermark - dt.timedelta(seconds=2)  # committed late with an older timestamp
    other.execute(
        f"UPDATE {cm} SET {name} = ?, {stamp} = ? WHERE {key} = ?", "Late Commit", late, rows[5]["CUST_NO"]
    )

    again, cursor2 = extract(client, cursor)
    assert sorted(r["CUST_NAME"] for r in again) == ["Late Commit", "Same Second Ltd"]
    assert cursor2.value == watermark
    assert extract(client, cursor2)[0] == []


# -- snapshot diff ---------------------------------------------------------------------------
def test_snapshot_diff_finds_insert_update_delete_in_item_stock(
    client: ErpClient, other: pyodbc.Connection
) -> None:
    chunks = list(client.diff_snapshot(ITEM_STOCK, {}, chunk_size=7))
    hashes = {k: v for c in chunks for k, v in c.hashes.items()}
    (upd, _), (gone, _) = list(hashes.items())[3], list(hashes.items())[10]
    st, item, whse, qty = (q(client, n) for n in ("ITEM_STOCK", "ITEM_NO", "WHSE", "QTY_ON_HAND"))
    other.execute(f"UPDATE {st} SET {qty} = {qty} + 1 WHERE {item} = ? AND {whse} = ?", *upd)
    other.execute(f"DELETE FROM {st} WHERE {item} = ? AND {whse} = ?", *gone)
    other.execute(f"INSERT INTO {st} ({item}, {whse}, {qty}) VALUES (?, ?, ?)", "NEWITEM", "W09", "-2.500")

    diff = client.diff_snapshot(ITEM_STOCK, hashes.items(), chunk_size=7)
    changes = list(diff)
    inserts = [r for c in changes for r in c.inserts]
    updates = [r for c in changes for r in c.updates]
    assert [(r["ITEM_NO"], r["WHSE"], r["QTY_ON_HAND"]) for r in inserts] == [
        ("NEWITEM", "W09", Decimal("-2.500"))
    ]
    assert [(r["ITEM_NO"], r["WHSE"]) for r in updates] == [upd]
    assert diff.deletes == [gone]


# -- upsert ----------------------------------------------------------------------------------
def test_upsert_10000_rows_is_idempotent(client: ErpClient) -> None:
    rows = [customer(n) for n in range(10_000)]
    first = client.upsert(CUST_MASTER, rows, chunk_size=2500)
    assert (first.inserted, first.updated, first.failures) == (10_000, 0, [])
    snapshot = {r["CUST_NO"]: (r["LAST_UPD"], r["ROW_VER"]) for r in all_rows(client, CUST_MASTER)}

    second = client.upsert(CUST_MASTER, rows, chunk_size=2500)
    assert (second.inserted, second.updated, second.unchanged) == (0, 0, 10_000)
    assert {r["CUST_NO"]: (r["LAST_UPD"], r["ROW_VER"]) for r in all_rows(client, CUST_MASTER)} == snapshot

    rows[42]["CREDIT_LIMIT"] = Decimal("99.99")
    third = client.upsert(CUST_MASTER, rows, chunk_size=2500)
    assert (third.inserted, third.updated) == (0, 1)
    assert client.scalar(f"SELECT COUNT(*) FROM {q(client, 'CUST_MASTER')}") == 10_300


def test_optimistic_update_loses_to_concurrent_change(client: ErpClient, other: pyodbc.Connection) -> None:
    mine, untouched = all_rows(client, CUST_MASTER)[:2]
    cm, name, key = q(client, "CUST_MASTER"), q(client, "CUST_NAME"), q(client, "CUST_NO")
    other.execute(f"UPDATE {cm} SET {name} = ? WHERE {key} = ?", "Changed By Someone Else", mine["CUST_NO"])

    result = client.update_if_unchanged(
        CUST_MASTER,
        [
            {"CUST_NO": mine["CUST_NO"], "CUST_NAME": "Mine", "ROW_VER": mine["ROW_VER"]},
            {"CUST_NO": untouched["CUST_NO"], "CUST_NAME": "Mine Too", "ROW_VER": untouched["ROW_VER"]},
        ],
    )
    assert [(c.key, c.expected_version, c.current_version) for c in result.conflicts] == [
        ((mine["CUST_NO"],), mine["ROW_VER"], mine["ROW_VER"] + 1)
    ]
    assert result.updated == 1
    names = {r["CUST_NO"]: r["CUST_NAME"] for r in all_rows(client, CUST_MASTER)}
    assert names[mine["CUST_NO"]] == "Changed By Someone Else"
    assert names[untouched["CUST_NO"]] == "Mine Too"


def test_plain_update_never_inserts_and_reports_a_row_it_does_not_find(client: ErpClient) -> None:
    found = all_rows(client, CUST_MASTER)[0]
    count = f"SELECT COUNT(*) FROM {q(client, 'CUST_MASTER')}"
    before = client.scalar(count)
    result = client.update(
        CUST_MASTER,
        [
            {"CUST_NO": found["CUST_NO"], "CUST_NAME": "Updated"},
            {"CUST_NO": "C999999999", "CUST_NAME": "Nobody"},
        ],
    )
    assert (result.inserted, result.updated, result.unchanged) == (0, 1, 0)
    assert [(f.key, f.message) for f in result.failures] == [(("C999999999",), "update matched no row")]
    assert client.scalar(count) == before
    again = client.update(CUST_MASTER, [{"CUST_NO": found["CUST_NO"], "CUST_NAME": "Updated"}])
    assert (again.updated, again.unchanged, again.failures) == (0, 1, [])


def test_deactivate_sets_status_and_delete_needs_opt_in(client: ErpClient) -> None:
    rows = all_rows(client, CUST_MASTER)[:3]
    keys = [(r["CUST_NO"],) for r in rows]
    assert client.deactivate(CUST_MASTER, keys).updated == sum(r["STATUS"] != "I" for r in rows)
    statuses = {r["CUST_NO"]: r["STATUS"] for r in all_rows(client, CUST_MASTER)}
    assert all(statuses[k[0]] == "I" for k in keys)
    assert client.deactivate(CUST_MASTER, keys).updated == 0
    with pytest.raises(ErpSpecError, match="CUST_MASTER: hard deletes are not enabled"):
        client.delete(CUST_MASTER, keys)


# -- values that bite ------------------------------------------------------------------------
TRICKY = ["O'Brien", "Robert'); DROP TABLE CUST_MASTER;--", "Zoë 😀 🚀 Ünïcödé", "x" * 200]


def test_tricky_values_round_trip_or_are_rejected_with_the_limit(client: ErpClient) -> None:
    rows = [customer(i, CUST_NAME=v[:60], REMARKS=v) for i, v in enumerate(TRICKY)]
    rows.append(customer(9, CUST_NAME="y" * 200))
    result = client.upsert(CUST_MASTER, rows)
    assert result.inserted == 4
    [failure] = result.failures
    assert (failure.table, failure.key, failure.column) == ("CUST_MASTER", ("U000000009",), "CUST_NAME")
    assert "200 characters" in failure.message and "VARCHAR(60)" in failure.message
    stored = {r["CUST_NO"]: r for r in all_rows(client, CUST_MASTER)}
    for i, value in enumerate(TRICKY):
        assert stored[f"U{i:09d}"]["REMARKS"] == value
        assert stored[f"U{i:09d}"]["CUST_NAME"] == value[:60]
    assert client.scalar(f"SELECT COUNT(*) FROM {q(client, 'CUST_MASTER')}") == 304  # table survived


# -- bad input -------------------------------------------------------------------------------
def test_unknown_column_in_spec_names_table_and_column(client: ErpClient) -> None:
    drifted = CUST_MASTER.model_copy(
        update={"columns": (*CUST_MASTER.columns, Column(name="FAX_NO", type=ColumnType.VARCHAR, length=20))}
    )
    with pytest.raises(ErpSpecError, match=r"table CUST_MASTER: unknown column 'FAX_NO'"):
        client.upsert(drifted, [customer(1)])


def test_value_longer_than_column_fails_that_row_only(client: ErpClient) -> None:
    rows = [customer(n) for n in range(50)]
    rows[17]["CITY"] = "Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch"
    result = client.upsert(CUST_MASTER, rows, chunk_size=20)
    [failure] = result.failures
    assert (failure.key, failure.column) == (("U000000017",), "CITY")
    assert "VARCHAR(40)" in str(failure) and "CUST_MASTER" in str(failure)
    assert result.inserted == 49


def test_database_rejection_is_isolated_to_the_row(client: ErpClient) -> None:
    """The spec is looser than the table (drift): the driver rejects one row, the chunk still loads."""
    loose = tuple(
        c.model_copy(update={"length": 100}) if c.name == "CITY" else c for c in CUST_MASTER.columns
    )
    spec = CUST_MASTER.model_copy(update={"columns": loose})
    rows = [customer(n) for n in range(30)]
    rows[3]["CITY"] = "C" * 90
    result = client.upsert(spec, rows, chunk_size=30)
    [failure] = result.failures
    assert failure.key == ("U000000003",) and failure.table == "CUST_MASTER"
    assert "rejected by the database" in failure.message
    assert result.inserted == 29


def test_non_numeric_amount_fails_that_row_only(client: ErpClient) -> None:
    rows = [customer(n) for n in range(10)]
    rows[4]["CREDIT_LIMIT"] = "12,5O"
    rows[6]["CREDIT_LIMIT"] = Decimal("1.005")  # would round: refused, never silently changed
    result = client.upsert(CUST_MASTER, rows)
    assert [(f.key, f.column) for f in result.failures] == [
        (("U000000004",), "CREDIT_LIMIT"),
        (("U000000006",), "CREDIT_LIMIT"),
    ]
    assert "not a number for DECIMAL(15,2): '12,5O'" in result.failures[0].message
    assert result.inserted == 8


def _killer(dialect: str, conn_str: str) -> tuple[Callable[[], pyodbc.Connection], Callable[[], None]]:
    """A connection factory that remembers the server session, and a way to kill that session."""
    opened: list[tuple[pyodbc.Connection, Any]] = []

    def connect() -> pyodbc.Connection:
        conn = pyodbc.connect(conn_str, autocommit=False)
        ident = {"postgresql": "SELECT pg_backend_pid()", "mariadb": "SELECT CONNECTION_ID()"}.get(dialect)
        opened.append((conn, conn.execute(ident).fetchval() if ident else None))
        conn.commit()
        return conn

    def kill() -> None:
        conn, ident = opened[-1]
        if dialect == "sqlite":
            conn.close()  # the connection disappears under the client
            return
        with pyodbc.connect(conn_str, autocommit=True) as admin:
            sql = (
                "SELECT pg_terminate_backend(?)"
                if dialect == "postgresql"
                else f"KILL CONNECTION {int(ident)}"
            )
            admin.execute(sql, ident) if dialect == "postgresql" else admin.execute(sql)

    return connect, kill


@pytest.mark.parametrize("retry", [False, True], ids=["fails-then-rerun", "retried"])
def test_lost_connection_mid_load(client: ErpClient, conn_str: str, retry: bool) -> None:
    connect, kill = _killer(client.dialect.name, conn_str)
    policy = RetryPolicy(sleep=lambda _: None) if retry else NO_RETRY
    rows = [customer(n) for n in range(1000)]

    def feed() -> Iterator[dict[str, Any]]:
        for n, row in enumerate(rows):
            if n == 450:  # two chunks of 200 committed, the third being collected
                kill()
            yield row

    with ErpClient(connect, retry=policy) as loader:
        if retry:
            assert loader.upsert(CUST_MASTER, feed(), chunk_size=200).inserted == 1000
        else:
            with pytest.raises(ErpConnectionError) as info:
                loader.upsert(CUST_MASTER, feed(), chunk_size=200)
            assert info.value.partial.inserted == 400
            rerun = loader.upsert(CUST_MASTER, rows, chunk_size=200)
            assert (rerun.inserted, rerun.unchanged) == (600, 400)
    cm, key = q(client, "CUST_MASTER"), q(client, "CUST_NO")
    assert client.scalar(f"SELECT COUNT(*) FROM {cm} WHERE {key} LIKE 'U%'") == 1000
    assert client.scalar(f"SELECT COUNT(DISTINCT {key}) FROM {cm}") == 1300


# -- unreadable legacy values (issue 10) -----------------------------------------------------
def _invoices(client: ErpClient, since: ExtractCursor | None) -> tuple[list[Row], ExtractCursor]:
    stream = client.extract_changes(INV_HEADER, since, overlap=dt.timedelta(seconds=5), chunk_size=16)
    return [row for chunk in stream for row in chunk], stream.cursor


def test_bad_char8_date_is_a_row_error_the_cursor_moves_past_until_fixed_at_the_source(
    client: ErpClient, other: pyodbc.Connection
) -> None:
    """One invoice with INV_DATE '20231399' must not abort the read of all the others."""
    rows, cursor = _invoices(client, None)
    assert len(rows) > 40 and not any(r.errors for r in rows)
    bad, garbled = rows[7]["INV_NO"], rows[30]["INV_NO"]
    inv, date, key = (q(client, n) for n in ("INV_HEADER", "INV_DATE", "INV_NO"))
    other.execute(f"UPDATE {inv} SET {date} = ? WHERE {key} = ?", "20231399", bad)
    other.execute(f"UPDATE {inv} SET {date} = ? WHERE {key} = ?", "31.12.23", garbled)

    snapshot = all_rows(client, INV_HEADER)  # iter_rows: the whole table, no exception
    assert len(snapshot) == len(rows)
    flagged = {r["INV_NO"]: r for r in snapshot if r.errors}
    assert set(flagged) == {bad, garbled}
    assert flagged[bad]["INV_DATE"] == "20231399" and isinstance(flagged[bad]["GROSS_AMOUNT"], Decimal)
    assert [(e.table, e.key, e.column, e.rule, e.message, e.value) for e in flagged[bad].errors] == [
        ("INV_HEADER", (bad,), "INV_DATE", "CHAR(8) date YYYYMMDD", "month must be in 1..12", "20231399")
    ]
    assert flagged[garbled].errors[0].message == "not 8 digits YYYYMMDD"

    changed, cursor = _invoices(client, cursor)  # the two updates, delivered once, with their errors
    assert sorted((r["INV_NO"], bool(r.errors)) for r in changed) == sorted([(bad, True), (garbled, True)])
    assert _invoices(client, cursor)[0] == []  # the watermark moved past them: not re-read forever

    other.execute(f"UPDATE {inv} SET {date} = ? WHERE {key} = ?", "20231231", bad)  # fixed at the source
    fixed, _ = _invoices(client, cursor)
    assert [(r["INV_NO"], r["INV_DATE"], r.errors) for r in fixed] == [(bad, dt.date(2023, 12, 31), ())]


def test_text_in_a_decimal_column_is_a_row_error_where_the_database_stores_it(
    client: ErpClient, other: pyodbc.Connection
) -> None:
    """SQLite keeps '', 'abc' and 'N/A' in a DECIMAL column; PostgreSQL and MariaDB refuse them."""
    keys = [r["CUST_NO"] for r in all_rows(client, CUST_MASTER)[:3]]
    cm, limit, key = q(client, "CUST_MASTER"), q(client, "CREDIT_LIMIT"), q(client, "CUST_NO")
    texts = ["N/A", "", "abc"]
    if client.dialect.name != "sqlite":
        for text, customer in zip(texts, keys, strict=True):
            with pytest.raises(pyodbc.Error):
                other.execute(f"UPDATE {cm} SET {limit} = ? WHERE {key} = ?", text, customer)
        assert not any(r.errors for r in all_rows(client, CUST_MASTER))
        return
    for text, customer in zip(texts, keys, strict=True):
        other.execute(f"UPDATE {cm} SET {limit} = ? WHERE {key} = ?", text, customer)
    rows, _ = extract(client, None)
    assert len(rows) == 300
    flagged = [
        (r["CUST_NO"], r["CREDIT_LIMIT"], [(e.column, e.message) for e in r.errors]) for r in rows if r.errors
    ]
    assert sorted(flagged) == sorted(
        (customer, text, [("CREDIT_LIMIT", "not a number")])
        for text, customer in zip(texts, keys, strict=True)
    )


@pytest.mark.parametrize("conn_str", DIALECTS[:1], indirect=True)  # the others refuse the text
def test_unreadable_cursor_value_is_a_row_error_outside_the_watermark(
    client: ErpClient, other: pyodbc.Connection
) -> None:
    """SQLite keeps any text in a TIMESTAMP column; its ODBC driver returns None for it."""
    _, cursor = extract(client, None)
    stray = all_rows(client, CUST_MASTER)[4]["CUST_NO"]
    cm, stamp, key = q(client, "CUST_MASTER"), q(client, "LAST_UPD"), q(client, "CUST_NO")
    other.execute(f"UPDATE {cm} SET {stamp} = 'garbage' WHERE {key} = ?", stray)

    rows, after = extract(client, cursor)
    assert [(r["CUST_NO"], [(e.column, e.rule, e.message) for e in r.errors]) for r in rows] == [
        (stray, [("LAST_UPD", "TIMESTAMP", "the driver returned no value for it")])
    ]
    assert after.value == cursor.value  # it can be placed neither before nor after the watermark


@pytest.mark.parametrize("conn_str", DIALECTS, indirect=True)
def test_the_catalog_describes_a_table_alike_on_every_driver(client: ErpClient) -> None:
    """What onboarding reads (``d365sync entity scaffold``, ``spec check --live``): the same kinds,
    lengths, key, index and defaults whichever driver answers, and only the connection's schema."""
    from d365sync.onboard.metadata import read_erp_table

    table = read_erp_table(client, "CUST_MASTER")
    kinds = {name: col.kind for name, col in table.columns.items()}
    assert list(kinds) == [c.name for c in CUST_MASTER.columns]  # table order, no other schema's copy
    assert (kinds["CUST_NO"], kinds["CUST_NAME"], kinds["CREDIT_LIMIT"]) == ("char", "varchar", "decimal")
    assert (kinds["LAST_UPD"], kinds["ROW_VER"]) == ("timestamp", "integer")
    assert table.columns["CUST_NAME"].size == 60 and table.columns["CREDIT_LIMIT"].digits == (15, 2)
    assert table.primary_key == ("CUST_NO",)
    assert table.leads_an_index("LAST_UPD") and not table.leads_an_index("CITY")
    assert table.columns["LAST_UPD"].has_default and not table.columns["CITY"].has_default
    assert not table.columns["CUST_NO"].nullable and table.columns["CITY"].nullable
    with pytest.raises(ErpSpecError, match="table NO_SUCH_TABLE: not in the database's catalog"):
        read_erp_table(client, "NO_SUCH_TABLE")
