"""Issue 10: a legacy value that cannot be converted is reported on its row, never aborts a read.

``RowReader`` is the one place where driver rows become typed values (change streams, snapshot
diffs and ``iter_rows`` all go through it), so its per-row contract is tested here on plain
tuples shaped like what pyodbc returns; the ODBC paths are in tests/integration.
"""

from __future__ import annotations

import datetime as dt
import pickle
from decimal import Decimal
from pathlib import Path

import pytest

from d365sync.erp import Column, ColumnType, Row, RowReader, TableSpec, UnreadableValue
from d365sync.sandbox.erp.tables import CUST_MASTER, INV_HEADER

STAMP = dt.datetime(2024, 5, 1, 12, 0, 0)


def invoice(no: str, date: str, gross: object = "119.00") -> tuple[object, ...]:
    """A raw INV_HEADER row as the SQLite driver returns it (DECIMAL as text)."""
    return (f"{no}", "S000000001", "C000000042", date, "100.00", "19.00", gross, "EURO", "Y", STAMP)


def test_bad_legacy_date_stays_raw_on_its_row_and_names_table_key_column_and_rule() -> None:
    reader = RowReader(INV_HEADER, INV_HEADER.columns)
    row = reader.as_dict(reader.values(invoice("I000000001", "20231399")))

    assert row["INV_DATE"] == "20231399"  # kept as read
    assert row["GROSS_AMOUNT"] == Decimal("119.00") and row["LAST_UPD"] == STAMP  # the rest is converted
    [error] = row.errors
    assert error == UnreadableValue(
        "INV_HEADER",
        ("I000000001",),
        "INV_DATE",
        "CHAR(8) date YYYYMMDD",
        "month must be in 1..12",
        "20231399",
    )
    assert str(error) == (
        "INV_HEADER key=I000000001 column INV_DATE (CHAR(8) date YYYYMMDD): month must be in 1..12"
    )


def test_rows_around_a_bad_one_are_read_normally() -> None:
    reader = RowReader(INV_HEADER, INV_HEADER.columns)
    rows = [
        reader.as_dict(reader.values(invoice(f"I00000000{n}", date)))
        for n, date in enumerate(["20240131", "20231399", "00000000"])
    ]
    assert [r.errors == () for r in rows] == [True, False, True]
    assert [r["INV_DATE"] for r in rows] == [dt.date(2024, 1, 31), "20231399", None]


@pytest.mark.parametrize(
    ("raw", "message"),
    [("N/A", "not a number"), ("", "not a number"), ("abc", "not a number"), ("NaN", "not a finite number")],
)
def test_text_in_a_decimal_column_is_a_row_error_without_the_value_in_the_message(
    raw: str, message: str
) -> None:
    reader = RowReader(CUST_MASTER, CUST_MASTER.columns)
    customer = ["C000000001", "Anna", "a@example.com", "+44 1", None, None, "London", "N1", "GB", "STG"]
    customer += [raw, "N30", "A", None, STAMP, 3]
    values = reader.values(customer)
    [error] = values.errors
    assert (error.table, error.key, error.column, error.rule) == (
        "CUST_MASTER",
        ("C000000001",),
        "CREDIT_LIMIT",
        "DECIMAL(15,2)",
    )
    assert (error.message, error.value) == (message, raw)
    assert values[10] == raw and values[15] == 3


def test_key_columns_are_converted_first_and_an_unconvertible_key_keeps_its_raw_text() -> None:
    spec = TableSpec(
        name="LEGACY",
        columns=(
            Column(name="AMT", type=ColumnType.DECIMAL, precision=9, scale=2),
            Column(name="DUE", type=ColumnType.DATE8),
            Column(name="NO", type=ColumnType.INTEGER, nullable=False),
        ),
        key=("NO",),
    )
    reader = RowReader(spec, spec.columns)

    values = reader.values(("N/A", "2024ab01", " 42"))
    assert [(e.key, e.column, e.message) for e in values.errors] == [
        ((42,), "AMT", "not a number"),  # the key was converted before AMT failed
        ((42,), "DUE", "not 8 digits YYYYMMDD"),
    ]

    values = reader.values(("1.5", "20240101", "X42"))
    assert values == [Decimal("1.50"), dt.date(2024, 1, 1), "X42"]
    assert [(e.key, e.column, e.message, e.value) for e in values.errors] == [
        (("X42",), "NO", "not an integer", "X42")
    ]


def test_a_row_is_a_dict_that_keeps_its_errors_through_pickle() -> None:
    reader = RowReader(INV_HEADER, INV_HEADER.columns)
    good = reader.as_dict(reader.values(invoice("I000000001", "20240131")))
    bad = reader.as_dict(reader.values(invoice("I000000002", "2024")))
    assert isinstance(good, Row) and good.errors == () and good == dict(good)
    back = pickle.loads(pickle.dumps(bad))
    assert back == bad and back.errors == bad.errors
    assert bad.errors[0].message == "not 8 digits YYYYMMDD"


def test_check_finds_text_left_in_typed_columns_of_a_row_read_earlier() -> None:
    reader = RowReader(INV_HEADER, INV_HEADER.columns)
    good = reader.as_dict(reader.values(invoice("I000000001", "20240131")))
    assert reader.check(good) == []
    stored = dict(reader.as_dict(reader.values(invoice("I000000002", "20231399", gross="n/a"))))
    assert [(e.key, e.column, e.message) for e in reader.check(stored)] == [
        (("I000000002",), "INV_DATE", "month must be in 1..12"),
        (("I000000002",), "GROSS_AMOUNT", "not a number"),
    ]


def test_unreadable_value_as_dict_is_json_ready() -> None:
    problem = UnreadableValue(
        "ITEM_STOCK", ("P1", "W01"), "QTY_ON_HAND", "DECIMAL(13,3)", "not a number", "?"
    )
    assert problem.as_dict() == {
        "table": "ITEM_STOCK",
        "key": "P1/W01",
        "column": "QTY_ON_HAND",
        "rule": "DECIMAL(13,3)",
        "message": "not a number",
        "value": "?",
    }
    assert UnreadableValue("T", (1,), "C", "INTEGER", "m", b"\x01").as_dict()["value"] == "b'\\x01'"


def test_dead_letter_reason_shows_dates_and_amounts_but_masks_personal_columns() -> None:
    from d365sync.engine.stages.prepare import _unreadable_reason

    date = UnreadableValue("INV_HEADER", ("I1",), "INV_DATE", "CHAR(8) date YYYYMMDD", "m", "20231399")
    phone = UnreadableValue("CUST", ("C1",), "PHONE_NO", "INTEGER", "not an integer", "+44 20 7946 0958")
    assert _unreadable_reason(date.as_dict()) == (
        "INV_HEADER key=I1 column INV_DATE: unreadable CHAR(8) date YYYYMMDD: m (value '20231399')"
    )
    assert _unreadable_reason(phone.as_dict()) == (
        "CUST key=C1 column PHONE_NO: unreadable INTEGER: not an integer (value '+44 *** *** 58')"
    )


# GX 1.24.1 imports the deprecated sre_constants/sre_parse modules on Python 3.11 (see test_validation.py)
@pytest.mark.filterwarnings(r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning")
def test_validate_quarantines_unreadable_rows_before_gx_and_holds_their_keys(tmp_path: Path) -> None:
    from d365sync.engine.stages import RunContext, validate
    from d365sync.engine.state import StateStore
    from d365sync.engine.validation import validate as gx_validate
    from d365sync.spec import load_entities

    spec = load_entities(Path(__file__).resolve().parents[2] / "include" / "entities")["invoices"]
    reader = RowReader(INV_HEADER, INV_HEADER.columns)

    def entry(no: str, date: str, *, replay: list[str] | None = None) -> dict[str, object]:
        """An ERP extract entry as extract writes it; a retried row (re-read for a dead letter
        elsewhere than the change stream) carries no ``error`` field."""
        row = reader.as_dict(reader.values(invoice(no, date)))
        base = {"key": no, "row": dict(row), "deleted": False, "id": None, "replay": replay, "repair": False}
        return base if replay else {**base, "error": [p.as_dict() for p in row.errors] or None}

    good = [entry(f"I{n:09d}", "20240131") for n in range(200)]
    bad = entry("I000000901", "20231399")
    replayed = entry("I000000902", "2024ab01", replay=["dead_letter", "validate", "I000000902"])  # no error
    shown: list[dict[str, object]] = []

    def recording_gx(*args: object, **kwargs: object) -> object:
        shown.extend(args[2])  # type: ignore[arg-type]
        return gx_validate(*args, **kwargs)  # type: ignore[arg-type]

    with StateStore.open(f"sqlite:///{tmp_path / 'state.db'}") as store:
        ctx = RunContext(spec, None, None, store, tmp_path / "staging", run_id="r1", validator=recording_gx)
        files = {
            "erp": [ctx.staging.write("extract/erp/00000.parquet", [*good[:100], bad, replayed, *good[100:]])]
        }
        out = validate(ctx, {"dynamics": {"files": []}, "erp": {"files": files["erp"]}})
        letters = {d.record_key: d for d in store.dead_letters("invoices")}

    assert len(shown) == 200 and all(r["INV_NO"] != "I000000901" for r in shown)  # GX never saw them
    assert out["quarantined"]["erp"] == 2 and out["rows"]["erp"] == 202
    assert [r["key"] for r in ctx.staging.read(out["held"][0])] == ["I000000901", "I000000902"]
    assert sum(len(ctx.staging.read(f)) for f in out["files"]["erp"]) == 200
    assert {k: (d.stage, d.error) for k, d in letters.items()} == {
        "I000000901": (
            "validate",
            "validation: INV_HEADER key=I000000901 column INV_DATE: unreadable CHAR(8) date YYYYMMDD: "
            "month must be in 1..12 (value '20231399')",
        ),
        "I000000902": (
            "validate",
            "validation: INV_HEADER key=I000000902 column INV_DATE: unreadable CHAR(8) date YYYYMMDD: "
            "not 8 digits YYYYMMDD (value '2024ab01')",
        ),
    }
    assert letters["I000000901"].payload == {"rows": [{"side": "erp", "row": bad["row"]}]}
