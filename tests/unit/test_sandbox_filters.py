"""Unit tests for the $filter → SQL translation and skip-token round trip."""

from __future__ import annotations

import pytest

from d365sync.sandbox.dataverse.errors import DataverseError
from d365sync.sandbox.dataverse.filters import FilterCompiler
from d365sync.sandbox.dataverse.query import decode_skiptoken, encode_skiptoken
from d365sync.sandbox.dataverse.schema import TABLES


def compile_account(text: str) -> tuple[str, list]:
    return FilterCompiler(TABLES["account"]).compile(text)


def test_comparisons_and_boolean_logic():
    sql, params = compile_account("name eq 'O''Bryan' and (creditlimit gt 5 or not contains(name,'x%'))")
    assert sql == '((t."name" = ?) AND ((t."creditlimit" > ?) OR (NOT (t."name" LIKE ? ESCAPE \'\\\'))))'
    assert params == ["O'Bryan", 5, "%x\\%%"]


def test_lookup_guid_and_dates_are_normalised():
    sql, params = compile_account("_transactioncurrencyid_value eq 'ABCDEF00-0000-0000-0000-000000000001'")
    assert sql == '(t."transactioncurrencyid" = ?)' and params == ["abcdef00-0000-0000-0000-000000000001"]
    _, params = compile_account("modifiedon ge 2024-01-01T01:00:00+01:00")
    assert params == ["2024-01-01T00:00:00Z"]


def test_null_and_navigation():
    assert compile_account("emailaddress1 ne null")[0] == '(t."emailaddress1" IS NOT NULL)'
    sql, _ = compile_account("transactioncurrencyid/isocurrencycode eq 'USD'")
    assert 'FROM "transactioncurrency" n' in sql


@pytest.mark.parametrize("text", ["name eq", "foo eq 1", "creditlimit eq 'x'", "name", "name add 1 eq 2"])
def test_bad_filters_raise_dataverse_errors(text: str):
    with pytest.raises(DataverseError) as info:
        compile_account(text)
    assert info.value.status == 400


def test_skiptoken_round_trip():
    token = encode_skiptoken(3, {"k": ["a"], "id": "x"}, False)
    assert token.startswith('<cookie pagenumber="3" pagingcookie="')
    assert decode_skiptoken(token) == (3, {"k": ["a"], "id": "x"}, False)


# --- Microsoft.Dynamics.CRM query functions (issue 12) ------------------------------------------


def test_query_functions_are_parameterised_sql():
    sql, params = compile_account(
        "Microsoft.Dynamics.CRM.In(PropertyName='accountnumber',"
        "PropertyValues=[\"A'); DROP TABLE account; --\",'b']) and not "
        "Microsoft.Dynamics.CRM.NotBetween(PropertyName='creditlimit',PropertyValues=['1','2.5'])"
    )
    assert sql == '((t."accountnumber" IN (?, ?)) AND (NOT (t."creditlimit" NOT BETWEEN ? AND ?)))'
    assert params == ["A'); DROP TABLE account; --", "b", 1.0, 2.5]


def test_property_values_take_the_comparison_normalisation():
    guid = "ABCDEF00-0000-0000-0000-000000000001"
    in_currencies = "Microsoft.Dynamics.CRM.In(PropertyName='transactioncurrencyid',PropertyValues="
    assert compile_account(f"{in_currencies}['{{{guid}}}','{guid}'])")[1] == [guid.lower()] * 2
    _, params = compile_account(
        "Microsoft.Dynamics.CRM.Between(PropertyName='modifiedon',"
        "PropertyValues=['2024-01-01','2024-01-01T01:00:00+01:00'])"
    )
    assert params == ["2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z"]
    _, params = compile_account("Microsoft.Dynamics.CRM.In(PropertyName='statecode',PropertyValues=[0,'1'])")
    assert params == [0, 1]
    _, params = compile_account(
        "Microsoft.Dynamics.CRM.In(PropertyName='creditonhold',PropertyValues=[true,'0'])"
    )
    assert params == [1, 0]


@pytest.mark.parametrize(
    ("array", "values"),
    [
        ("[]", []),
        ("[ 'a' , \"b\" ]", ["a", "b"]),
        (
            '["say \\"hi\\"", "tab\\there", "\\u00e9", "a\\/b", "back\\\\slash"]',
            ['say "hi"', "tab\there", "é", "a/b", "back\\slash"],
        ),
        ("['it\\'s', \"it's\"]", ["it's", "it's"]),
        ("['[x]', ']']", ["[x]", "]"]),
        ("[1, -2.5, 3e2, true, false]", ["1", "-2.5", "3e2", "true", "false"]),
        ('["\\ud83d\\ude00"]', ["\U0001f600"]),
    ],
)
def test_json_arrays_are_read_like_odata_json(array: str, values: list[str]):
    from d365sync.sandbox.dataverse.functions import Collection, read_collection

    text = f"x{array}y"
    collection, end = read_collection(text, 1)
    assert isinstance(collection, Collection) and collection.source == array and text[end] == "y"
    assert [item.val for item in collection.val] == values


def test_brackets_inside_string_literals_stay_strings():
    assert compile_account("name eq '[not, an, array]'")[1] == ["[not, an, array]"]


def test_an_unpaired_surrogate_escape_is_invalid_json_not_a_crash():
    with pytest.raises(DataverseError) as info:
        compile_account("Microsoft.Dynamics.CRM.In(PropertyName='name',PropertyValues=[\"\\ud800x\"])")
    assert info.value.status == 400 and info.value.message.startswith("Invalid JSON.")


def test_three_named_parameters_are_a_400_not_a_crash():
    with pytest.raises(DataverseError) as info:
        compile_account("Microsoft.Dynamics.CRM.In(PropertyName='name',PropertyValues=['a'],X=1)")
    assert info.value.status == 400 and "at most two named parameters" in info.value.message
