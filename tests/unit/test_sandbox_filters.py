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
