"""Config validation and OData literal/URL encoding: pure functions, no I/O."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from d365sync.dynamics import DynamicsConfig, DynamicsConfigError, RetrySettings
from d365sync.dynamics.odata import (
    IN_FILTER_BUDGET,
    dumps_json,
    entity_id,
    entity_path,
    in_filters,
    key_of,
    literal,
    query_string,
)

GUID = "6f9619ff-8b86-d011-b42d-00c04fc964ff"


def _config(**overrides: object) -> DynamicsConfig:
    base: dict[str, object] = {
        "environment_url": "https://org.crm4.dynamics.com/",
        "tenant_id": "contoso",
        "client_id": "app",
        "client_secret": "s3cret",
    }
    return DynamicsConfig(**{**base, **overrides})  # type: ignore[arg-type]


def test_config_derives_urls_and_hides_the_secret() -> None:
    config = _config()
    assert config.api_url == "https://org.crm4.dynamics.com/api/data/v9.2"
    assert config.scope == "https://org.crm4.dynamics.com/.default"
    assert config.authority == "https://login.microsoftonline.com/contoso"
    assert config.is_microsoft_authority
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"environment_url": "org.crm.dynamics.com"}, "environment_url must be an http"),
        ({"tenant_id": ""}, "tenant_id is required"),
        ({"client_secret": ""}, "client_secret is required"),
        ({"page_size": 5001}, "page_size must be 1..5000"),
        ({"batch_size": 0}, "batch_size must be 1..1000"),
        ({"max_concurrency": 100}, "max_concurrency"),
        ({"api_version": "9.2"}, "api_version"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(DynamicsConfigError, match=message):
        _config(**overrides)


def test_retry_settings_validate() -> None:
    with pytest.raises(DynamicsConfigError, match="backoff_cap"):
        RetrySettings(backoff_base=10, backoff_cap=1)


def test_sandbox_authority_is_not_microsoft() -> None:
    assert not _config(authority_host="http://127.0.0.1:8000").is_microsoft_authority


def test_literals_double_quotes_and_render_types() -> None:
    assert literal("O'Brien") == "'O''Brien'"
    assert literal(True) == "true"
    assert literal(42) == "42"
    assert literal(uuid.UUID(GUID)) == GUID
    plus_two = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert literal(plus_two) == "2024-05-01T10:00:00Z"


def test_entity_path_encodes_alternate_keys() -> None:
    assert entity_path("accounts", {"accountnumber": "O'Brien"}) == "accounts(accountnumber='O''Brien')"
    assert entity_path("accounts", {"accountnumber": "A/B #1?%"}) == (
        "accounts(accountnumber='A%2FB%20%231%3F%25')"
    )
    assert entity_path("contacts", {"firstname": "Joe", "n": 1}) == "contacts(firstname='Joe',n=1)"
    assert entity_path("accounts", GUID) == f"accounts({GUID})"
    assert entity_id("accounts", {"accountnumber": "O'B a/b"}) == "accounts(accountnumber='O''B a/b')"
    with pytest.raises(ValueError):
        entity_path("accounts", "not-a-guid")


def test_key_of_requires_every_key_part() -> None:
    assert key_of({"a": 1, "b": "x", "c": 3}, ["a", "b"]) == {"a": 1, "b": "x"}
    with pytest.raises(ValueError, match="b"):
        key_of({"a": 1, "b": None}, ["a", "b"])


def test_query_string_keeps_odata_options_readable() -> None:
    qs = query_string({"$select": "name,accountnumber", "$filter": "name eq 'A&B'", "$orderby": None})
    assert qs == "$select=name,accountnumber&$filter=name%20eq%20'A%26B'"


def test_dumps_json_handles_sync_value_types() -> None:
    payload = {"d": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "m": Decimal("12.50"), "g": uuid.UUID(GUID)}
    assert dumps_json(payload) == (f'{{"d":"2024-01-02T03:04:05Z","m":12.5,"g":"{GUID}"}}').encode()


# --- Microsoft.Dynamics.CRM.In filters for reads by many keys (issue 12) ---------------------------


def _encoded(text: str) -> int:
    return len(query_string({"f": text})) - len("f=")


def test_in_filter_writes_values_as_json_strings() -> None:
    values = [
        "A-1",
        "O'Brien",
        'say "hi"',
        "back\\slash",
        uuid.UUID(GUID),
        42,
        True,
        datetime(2024, 5, 1, 12),
    ]
    (where,) = in_filters("accountnumber", values)
    assert where == (
        'Microsoft.Dynamics.CRM.In(PropertyName=\'accountnumber\',PropertyValues=["A-1","O\'Brien",'
        '"say \\"hi\\"","back\\\\slash",'
        f'"{GUID}","42","true","2024-05-01T12:00:00Z"])'
    )


def test_in_filter_sends_each_value_once_in_first_seen_order() -> None:
    (where,) = in_filters("accountnumber", ["b", "A", "a", "B", "c", "b"])
    assert where.endswith('PropertyValues=["b","A","c"])')
    assert in_filters("accountnumber", []) == []


def test_in_filters_are_cut_to_the_url_budget() -> None:
    keys = [f"ACC-{i:06d}" for i in range(5000)] + ["Zoë & Co/#1?"] * 3
    filters = in_filters("accountnumber", keys)
    assert len(filters) > 1
    assert all(_encoded(where) <= IN_FILTER_BUDGET for where in filters)
    assert max(_encoded(where) for where in filters) > IN_FILTER_BUDGET - 100  # chunks are filled
    sent = [value for where in filters for value in json.loads(where.split("PropertyValues=")[1][:-1])]
    assert sent == [*keys[:5000], "Zoë & Co/#1?"]


def test_a_value_longer_than_the_budget_gets_a_filter_of_its_own() -> None:
    filters = in_filters("name", ["x" * 100, "y", "z"], budget=90)
    assert [json.loads(where.split("PropertyValues=")[1][:-1]) for where in filters] == [
        ["x" * 100],
        ["y", "z"],
    ]
