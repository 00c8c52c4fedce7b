"""Each registered transform, its inverse, and the errors it raises."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from d365sync.engine import transforms as t
from d365sync.engine.transforms import (
    BuildEnv,
    DictLookup,
    LookupTarget,
    MissingParent,
    TransformContext,
    TransformError,
    TransformSpecError,
    ValueMapTable,
    compile_chain,
    group_rows,
    invert_chain,
)

CURRENCY = ValueMapTable(
    "currency",
    {"STG": "GBP", "US$": "USD", "USD": "USD", "EURO": "EUR", "BAD": "xx"},
    {"GBP": "STG", "USD": "USD", "EUR": "EURO"},
)
STATUS = ValueMapTable("status", {"O": 0, "X": 2}, {0: "O", 2: "X", 1: "O"})
ENV = BuildEnv(
    field_name="f",
    value_maps={"currency": CURRENCY, "status": STATUS},
    lookups={"customers": LookupTarget("customers", "accounts")},
)


def run(steps: list[Any], value: Any, row: dict[str, Any] | None = None, **ctx: Any) -> Any:
    normalised = [(s, {}) if isinstance(s, str) else next(iter(s.items())) for s in steps]
    chain = compile_chain(normalised, ENV)
    return value if chain is None else chain(value, row or {}, TransformContext(**ctx))


def back(steps: list[Any], value: Any, row: dict[str, Any] | None = None, **ctx: Any) -> Any:
    normalised = [(s, {}) if isinstance(s, str) else next(iter(s.items())) for s in steps]
    return run([{n: a} for n, a in invert_chain(normalised)], value, row, **ctx)


def test_registry_has_the_documented_transforms() -> None:
    documented = {"direct", "trim", "pad", "case", "email", "decimal", "currency", "tax", "date"}
    assert documented | {"value_map", "lookup", "aggregate", "custom"} <= set(t.REGISTRY)


def test_direct_compiles_away() -> None:
    assert compile_chain([("direct", {})], ENV) is None
    assert run(["direct"], "x") == "x"


def test_none_passes_through_ordinary_steps() -> None:
    assert run(["trim", {"case": {"to": "upper"}}], None) is None


@pytest.mark.parametrize(
    ("args", "value", "expected"),
    [({}, "  a b  ", "a b"), ({"side": "right"}, "  a ", "  a"), ({"blank_as_null": True}, "   ", None)],
)
def test_trim(args: dict[str, Any], value: str, expected: str | None) -> None:
    assert run([{"trim": args}], value) == expected


def test_pad_pads_and_refuses_overflow() -> None:
    assert run([{"pad": {"width": 5}}], "ab") == "ab   "
    assert run([{"pad": {"width": 5, "fill": "0", "align": "right"}}], "42") == "00042"
    with pytest.raises(TransformError, match=r"longer than CHAR\(3\)") as err:
        run([{"pad": {"width": 3}}], "abcd")
    assert err.value.rule == "pad" and err.value.value == "abcd"


def test_pad_inverse_is_trim() -> None:
    assert back([{"pad": {"width": 6}}], "ab    ") == "ab"
    assert back([{"pad": {"width": 6, "fill": "0", "align": "right"}}], "   42") == "42"


@pytest.mark.parametrize(
    ("to", "expected"), [("upper", "ACME LTD"), ("lower", "acme ltd"), ("title", "Acme Ltd")]
)
def test_case(to: str, expected: str) -> None:
    assert run([{"case": {"to": to}}], "aCme ltd") == expected


def test_non_text_is_a_transform_error() -> None:
    with pytest.raises(TransformError, match="expected text, got int"):
        run(["trim"], 5)


def test_email_normalises() -> None:
    assert run(["email"], "  Anna.Smith@Example.COM ") == "anna.smith@example.com"
    assert run([{"email": {"lower": False}}], "Anna@Example.com") == "Anna@Example.com"
    assert run(["email"], "   ") is None


@pytest.mark.parametrize(
    "address", ["renée.dupont.7@exemple.fr", "josé@bücher.de", "o'brien+tag@sub.example.co.uk"]
)
def test_email_accepts_internationalised_and_quoted_style_addresses(address: str) -> None:
    assert run(["email"], address) == address.lower()


@pytest.mark.parametrize(
    "bad",
    ["anna@@example.com", "no-at-sign.example.com", "x@", "@1.example", "a b@c.de", "a@b_c.de", "a@-b.de"],
)
def test_email_rejects_the_seeds_dirty_addresses(bad: str) -> None:
    with pytest.raises(TransformError, match="not a valid e-mail") as err:
        run(["email"], bad)
    assert err.value.rule == "email"


def test_email_max_length() -> None:
    with pytest.raises(TransformError, match="longer than 10"):
        run([{"email": {"max_length": 10}}], "abcdef@example.com")


def test_decimal_is_exact_and_half_even() -> None:
    assert run([{"decimal": {"scale": 2}}], 0.125) == Decimal("0.12")
    assert run([{"decimal": {"scale": 2}}], "0.135") == Decimal("0.14")
    assert run([{"decimal": {"scale": 2}}], 2500.5) == Decimal("2500.50")
    with pytest.raises(TransformError, match="not a number"):
        run(["decimal"], "12,5")


def test_currency_both_ways() -> None:
    assert run([{"currency": {"to": "iso"}}], "STG ") == "GBP"
    assert run([{"currency": {"to": "legacy"}}], "usd") == "USD"
    assert back([{"currency": {"to": "legacy"}}], "EURO") == "EUR"


def test_unknown_currency_names_the_value() -> None:
    with pytest.raises(TransformError, match="unknown legacy currency code 'DM'") as err:
        run([{"currency": {"to": "iso"}}], "DM")
    assert err.value.value == "DM" and err.value.rule == "currency"
    with pytest.raises(TransformError, match="unknown ISO 4217 currency 'XAU'"):
        run([{"currency": {"to": "legacy"}}], "XAU")


def test_currency_refuses_a_table_entry_that_is_not_iso() -> None:
    with pytest.raises(TransformError, match="not an ISO 4217 code"):
        run([{"currency": {"to": "iso"}}], "BAD")


def test_currency_table_passed_at_run_time_wins() -> None:
    live = {"DM": "DEM", "US$": "USD", "USD": "USD"}
    assert run([{"currency": {"to": "iso"}}], "DM", code_tables={"currency": live}) == "DEM"
    assert run([{"currency": {"to": "legacy"}}], "DEM", code_tables={"currency": live}) == "DM"
    assert run([{"currency": {"to": "legacy"}}], "USD", code_tables={"currency": live}) == "USD"  # preferred


def test_tax_by_field_is_exact() -> None:
    assert run(
        [{"tax": {"to": "net", "tax_field": "tax"}}], Decimal("119.00"), {"tax": Decimal("19.00")}
    ) == Decimal("100.00")
    assert back([{"tax": {"to": "net", "tax_field": "tax"}}], "100.00", {"tax": "19.00"}) == Decimal("119.00")
    assert run([{"tax": {"to": "gross", "tax_field": "tax"}}], 100, {"tax": None}) == Decimal("100.00")


def test_tax_by_rate_rounds_half_even_to_scale() -> None:
    assert run([{"tax": {"to": "net", "rate": "0.19"}}], "119.00") == Decimal("100.00")
    assert run([{"tax": {"to": "gross", "rate": "0.19"}}], "0.50") == Decimal("0.60")  # 0.595 → 0.60
    assert run([{"tax": {"to": "gross", "rate": "0.25", "scale": 2}}], "0.10") == Decimal(
        "0.12"
    )  # 0.125 → 0.12


def test_tax_needs_exactly_one_source() -> None:
    with pytest.raises(TransformSpecError, match="exactly one of rate or tax_field"):
        run([{"tax": {"to": "net"}}], 1)


def test_tax_field_resolves_through_the_env() -> None:
    env = BuildEnv(inbound=True, column=lambda name: {"tax": "TAX_AMOUNT"}[name])
    chain = compile_chain([("tax", {"to": "gross", "tax_field": "tax"})], env)
    assert chain is not None
    assert chain(Decimal("10.00"), {"TAX_AMOUNT": Decimal("1.90")}, TransformContext()) == Decimal("11.90")


def test_legacy_dates() -> None:
    assert run([{"date": {"format": "yyyymmdd", "parse": True}}], "20240131") == date(2024, 1, 31)
    assert run([{"date": {"format": "yyyymmdd", "parse": True}}], "00000000") is None
    assert run([{"date": {"format": "yyyymmdd"}}], date(2024, 2, 29)) == "20240229"
    assert run([{"date": {"format": "iso_datetime_utc"}}], "20240131") == "2024-01-31T00:00:00Z"
    assert run([{"date": {"format": "iso_date"}}], date(2024, 1, 31)) == "2024-01-31"


def test_iso_datetimes_parse_in_utc() -> None:
    parse = [{"date": {"format": "iso_datetime_utc", "parse": True}}]
    assert run(parse, "2024-01-31T23:30:00-02:00") == date(2024, 2, 1)
    assert run(parse, datetime(2024, 1, 31, 12, tzinfo=UTC)) == date(2024, 1, 31)
    assert back([{"date": {"format": "iso_datetime_utc"}}], "2024-01-31T00:00:00Z") == date(2024, 1, 31)


@pytest.mark.parametrize("bad", ["20241301", "2024-1-1", "yesterday"])
def test_bad_dates(bad: str) -> None:
    with pytest.raises(TransformError, match="not a date"):
        run([{"date": {"format": "yyyymmdd", "parse": True}}], bad)


def test_value_map_forward_inverse_and_policy() -> None:
    assert run([{"value_map": {"map": "status"}}], "X") == 2
    assert back([{"value_map": {"map": "status"}}], 1) == "O"
    with pytest.raises(TransformError, match="no entry in value map 'status'") as err:
        run([{"value_map": {"map": "status"}}], "Q")
    assert err.value.disposition == "quarantine"


def test_value_map_unmapped_default_and_review() -> None:
    env = BuildEnv(
        value_maps={
            "d": ValueMapTable("d", {"A": 1}, {1: "A"}, "default", default=0, inverse_default="?"),
            "r": ValueMapTable("r", {"A": 1}, {1: "A"}, "manual_review"),
        }
    )
    ctx = TransformContext()
    assert compile_chain([("value_map", {"map": "d"})], env)("B", {}, ctx) == 0  # type: ignore[misc]
    assert compile_chain([("value_map", {"map": "d", "inverse": True})], env)(7, {}, ctx) == "?"  # type: ignore[misc]
    with pytest.raises(TransformError) as err:
        compile_chain([("value_map", {"map": "r"})], env)("B", {}, ctx)  # type: ignore[misc]
    assert err.value.disposition == "manual_review"


def test_value_map_must_be_declared() -> None:
    with pytest.raises(TransformSpecError, match="value map 'nope' is not declared"):
        run([{"value_map": {"map": "nope"}}], 1)


def test_lookup_through_the_key_map() -> None:
    keys = DictLookup({"customers": {"C1": "guid-1"}})
    assert run([{"lookup": {"target": "customers", "to": "bind"}}], "C1", lookup=keys) == "/accounts(guid-1)"
    assert run([{"lookup": {"target": "customers", "to": "id"}}], "C1", lookup=keys) == "guid-1"
    assert back([{"lookup": {"target": "customers", "to": "bind"}}], "guid-1", lookup=keys) == "C1"
    assert back([{"lookup": {"target": "customers", "to": "bind"}}], "/accounts(guid-1)", lookup=keys) == "C1"


def test_lookup_of_an_unsynced_parent_parks() -> None:
    with pytest.raises(MissingParent) as err:
        run([{"lookup": {"target": "customers", "to": "key"}}], "guid-9", lookup=DictLookup())
    assert err.value.disposition == "park" and err.value.target == "customers"
    soft = [{"lookup": {"target": "customers", "to": "bind", "missing": "null"}}]
    assert run(soft, "C9", lookup=DictLookup()) is None


def test_lookup_without_a_key_map_is_a_clear_error() -> None:
    with pytest.raises(TransformError, match="no key map is configured for lookups to customers"):
        run([{"lookup": {"target": "customers", "to": "id"}}], "C1")


def test_lookup_target_must_be_declared() -> None:
    with pytest.raises(TransformSpecError, match="lookup target 'vendors' is not declared"):
        run([{"lookup": {"target": "vendors", "to": "id"}}], "x")


def test_aggregate() -> None:
    values = [Decimal("1.5"), None, Decimal("2.25")]
    assert run([{"aggregate": {"fn": "sum"}}], values) == Decimal("3.75")
    assert run([{"aggregate": {"fn": "min"}}], values) == Decimal("1.5")
    assert run([{"aggregate": {"fn": "max"}}], values) == Decimal("2.25")
    assert run([{"aggregate": {"fn": "count"}}], values) == 2
    assert run([{"aggregate": {"fn": "sum"}}], Decimal("4")) == Decimal("4")
    assert run([{"aggregate": {"fn": "sum"}}], None) == Decimal("0")


def test_aggregate_has_no_inverse() -> None:
    with pytest.raises(TransformSpecError, match="'aggregate' has no inverse"):
        invert_chain([("aggregate", {"fn": "sum"})])


def test_group_rows_collects_non_key_columns() -> None:
    rows = [
        {"ITEM_NO": "A", "WHSE": "W1", "QTY": 1},
        {"ITEM_NO": "A", "WHSE": "W2", "QTY": 2},
        {"ITEM_NO": "B", "WHSE": "W1", "QTY": 5},
    ]
    assert list(group_rows(rows, ["ITEM_NO"])) == [
        {"ITEM_NO": "A", "WHSE": ["W1", "W2"], "QTY": [1, 2]},
        {"ITEM_NO": "B", "WHSE": ["W1"], "QTY": [5]},
    ]


def shout(value: str, suffix: str = "!") -> str:
    return value.upper() + suffix


def unshout(value: str, suffix: str = "!") -> str:
    return value.removesuffix(suffix).lower()


@pytest.fixture
def allow_this_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Custom transforms come only from declared modules: declare this one (and a missing one)."""
    monkeypatch.setenv(t.TRANSFORM_MODULES_ENV, f"{__name__}, no_such_mod")


@pytest.mark.usefixtures("allow_this_module")
def test_custom_escape_hatch() -> None:
    step = {
        "custom": {"function": f"{__name__}:shout", "inverse": f"{__name__}:unshout", "args": {"suffix": "?"}}
    }
    assert run([step], "hi") == "HI?"
    assert back([step], "HI?") == "hi"


@pytest.mark.usefixtures("allow_this_module")
def test_custom_import_failure_is_a_spec_error() -> None:
    with pytest.raises(TransformSpecError, match="cannot import custom transform 'no_such_mod:fn'"):
        run([{"custom": {"function": "no_such_mod:fn"}}], 1)
    with pytest.raises(TransformSpecError, match="function"):
        run([{"custom": {"function": "not a path"}}], 1)


@pytest.mark.usefixtures("allow_this_module")
def test_custom_without_inverse_cannot_be_inverted() -> None:
    with pytest.raises(TransformSpecError, match="'custom' has no inverse"):
        invert_chain([("custom", {"function": f"{__name__}:shout"})])


@pytest.mark.usefixtures("allow_this_module")
def test_custom_function_errors_become_transform_errors() -> None:
    with pytest.raises(TransformError) as err:
        run([{"custom": {"function": f"{__name__}:shout"}}], 5)
    assert err.value.rule == "custom"


@pytest.mark.usefixtures("allow_this_module")
def test_custom_functions_come_only_from_allowed_modules() -> None:
    with pytest.raises(TransformSpecError, match="'os:system' is not from an allowed module"):
        run([{"custom": {"function": "os:system"}}], "echo pwned")
    # a prefix matches whole module names only
    with pytest.raises(TransformSpecError, match="not from an allowed module"):
        run([{"custom": {"function": f"{__name__}x:shout"}}], "hi")
    # an allowed module passes on only what it defines, not what it imports
    with pytest.raises(TransformSpecError, match="is defined in 'decimal', not in an allowed module"):
        run([{"custom": {"function": f"{__name__}:Decimal"}}], "1")
    # the built-in module's import helper cannot be turned into an importer of anything
    with pytest.raises(TransformError, match="'os:system' is not from an allowed module"):
        run([{"custom": {"function": "d365sync.engine.transforms:import_function"}}], "os:system")


def test_unknown_transform_lists_the_known_ones() -> None:
    with pytest.raises(TransformSpecError, match=r"unknown transform 'shout' \(known: aggregate, case"):
        run(["shout"], "x")


def test_bad_arguments_name_the_transform() -> None:
    with pytest.raises(TransformSpecError, match="transform 'pad': width: Field required"):
        run(["pad"], "x")
    with pytest.raises(TransformSpecError, match="transform 'trim': colour"):
        run([{"trim": {"colour": "red"}}], "x")


def test_error_text_names_record_field_rule_and_value() -> None:
    err = TransformError("bad", value="v", rule="trim").located(key="C1", field="name")
    assert str(err) == "record 'C1': field 'name': rule 'trim': bad (value 'v')"


def test_a_personal_field_shows_a_letter_and_the_length_only() -> None:
    err = TransformError("longer than CHAR(10)", value="Maria Schneider-Hofmann", rule="pad")
    err.located(key="C1", field="name").personal = frozenset({"name"})
    assert str(err) == "record 'C1': field 'name': rule 'pad': longer than CHAR(10) (value 'M*** (23 chars)')"


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        ("anna.smith@@example.com", "a***@e***.com"),
        ('"john doe"@example.com', "j***@e***.com"),
        ("'a b'@x.org", "a***@x***.org"),
        ("a b@c.de", "a***@c***.de"),
    ],
)
def test_an_error_text_carries_the_value_masked(address: str, shown: str) -> None:
    """Issue 11, finding 4: the text reaches dead letters, the CLI, task logs and XCom."""
    with pytest.raises(TransformError) as err:
        run(["email"], address)
    text = str(err.value.located(key="C000000042", field="email"))
    assert (
        text
        == f"record 'C000000042': field 'email': rule 'email': not a valid e-mail address (value {shown!r})"
    )
    assert err.value.value == address  # the raw value stays on the exception, for the replay payload


def test_an_error_text_masks_personal_data_inside_other_fields_and_messages() -> None:
    err = TransformError(
        "acme.fn failed: ValueError: cannot parse 'Call +44 20 7946 0958, PWD=hunter2'",
        value="Anna <anna.smith@example.com>, +44 20 7946 0958",
        rule="custom",
    ).located(key="C1", field="name")
    text = str(err)
    assert text.startswith(
        "record 'C1': field 'name': rule 'custom': acme.fn failed: ValueError: cannot parse"
    )
    for leak in ("anna.smith@example.com", "7946 0958", "hunter2"):
        assert leak not in text, text
