"""Writes against the sandbox: create/update/upsert, concurrency, validation, bulk actions."""

from __future__ import annotations

import uuid

import pytest
import requests

from tests.sandbox_fixtures import DataverseSandbox


@pytest.fixture(scope="module")
def sandbox(dataverse_sandbox_factory) -> DataverseSandbox:
    return dataverse_sandbox_factory(seed=10)


def _call(sandbox: DataverseSandbox, method: str, path: str, body: object = None, **headers: str):
    return requests.request(
        method, f"{sandbox.api_url}/{path}", json=body, headers=sandbox.headers(**headers), timeout=30
    )


def _currency(sandbox: DataverseSandbox, code: str = "EUR") -> str:
    rows = _call(sandbox, "GET", f"transactioncurrencies?$filter=isocurrencycode eq '{code}'").json()["value"]
    return rows[0]["transactioncurrencyid"]


def test_create_update_and_read_back(sandbox: DataverseSandbox):
    eur = _currency(sandbox)
    created = _call(
        sandbox,
        "POST",
        "accounts",
        {
            "name": "Create Co",
            "accountnumber": "W-1",
            "transactioncurrencyid@odata.bind": f"/transactioncurrencies({eur})",
        },
    )
    assert created.status_code == 204
    entity_url = created.headers["OData-EntityId"]
    record_id = entity_url.rsplit("(", 1)[1].rstrip(")")
    row = _call(sandbox, "GET", f"accounts({record_id})").json()
    assert row["_transactioncurrencyid_value"] == eur
    assert row["createdon"].endswith("Z") and row["@odata.etag"] == f'W/"{row["versionnumber"]}"'
    me = _call(sandbox, "GET", "WhoAmI").json()["UserId"]
    assert row["_modifiedby_value"] == me == row["_ownerid_value"]
    updated = _call(
        sandbox, "PATCH", f"accounts({record_id})", {"telephone1": "555"}, Prefer="return=representation"
    )
    assert updated.status_code == 200
    assert updated.json()["telephone1"] == "555" and updated.json()["versionnumber"] > row["versionnumber"]
    rep = _call(sandbox, "POST", "accounts", {"name": "Rep"}, Prefer="return=representation")
    assert rep.status_code == 201 and rep.json()["@odata.etag"].startswith('W/"')


def test_upsert_by_alternate_key(sandbox: DataverseSandbox):
    first = _call(
        sandbox,
        "PATCH",
        "accounts(accountnumber='UP-1')",
        {"name": "Upserted"},
        Prefer="return=representation",
    )
    assert first.status_code == 201 and first.json()["accountnumber"] == "UP-1"
    second = _call(sandbox, "PATCH", "accounts(accountnumber='UP-1')", {"name": "Renamed"})
    assert second.status_code == 204
    row = _call(sandbox, "GET", "accounts(accountnumber='UP-1')").json()
    assert row["name"] == "Renamed" and row["accountid"] == first.json()["accountid"]


def test_conditional_writes(sandbox: DataverseSandbox):
    missing = _call(sandbox, "PATCH", f"accounts({uuid.uuid4()})", {"name": "x"}, **{"If-Match": "*"})
    assert missing.status_code == 404 and "Does Not Exist" in missing.json()["error"]["message"]
    _call(sandbox, "PATCH", "accounts(accountnumber='CW-1')", {"name": "cw"})
    no_update = _call(
        sandbox, "PATCH", "accounts(accountnumber='CW-1')", {"name": "x"}, **{"If-None-Match": "*"}
    )
    assert no_update.status_code == 412
    assert no_update.json()["error"] == {
        "code": "0x80040237",
        "message": "A record with matching key values already exists.",
    }
    row = _call(sandbox, "GET", "accounts(accountnumber='CW-1')").json()
    stale = 'W/"1"'
    conflict = _call(sandbox, "PATCH", f"accounts({row['accountid']})", {"name": "y"}, **{"If-Match": stale})
    assert conflict.status_code == 412 and conflict.json()["error"]["code"] == "0x80060882"
    ok = _call(
        sandbox, "PATCH", f"accounts({row['accountid']})", {"name": "y"}, **{"If-Match": row["@odata.etag"]}
    )
    assert ok.status_code == 204
    stale_delete = _call(
        sandbox, "DELETE", f"accounts({row['accountid']})", **{"If-Match": row["@odata.etag"]}
    )
    assert stale_delete.status_code == 412
    assert _call(sandbox, "DELETE", f"accounts({row['accountid']})").status_code == 204
    assert _call(sandbox, "DELETE", f"accounts({row['accountid']})").status_code == 404


def test_duplicate_alternate_key_is_412(sandbox: DataverseSandbox):
    assert _call(sandbox, "POST", "accounts", {"name": "a", "accountnumber": "DUP-1"}).status_code == 204
    duplicate = _call(sandbox, "POST", "accounts", {"name": "b", "accountnumber": "dup-1"})
    assert duplicate.status_code == 412 and duplicate.json()["error"]["code"] == "0x80060892"


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        ({"name": "x" * 161}, "0x80044331", "exceeded the maximum allowed length of '160'"),
        (
            {"name": "ok", "foo": 1},
            "0x80060888",
            "The property 'foo' does not exist on type 'Microsoft.Dynamics.CRM.account'",
        ),
        ({"accountnumber": "NN-1"}, "0x80040203", "'name'"),
        ({"name": "ok", "creditlimit": "lots"}, "0x80048d19", "Edm.Decimal"),
        ({"name": "ok", "paymenttermscode": 99}, "0x8004431a", "outside the valid range"),
        (
            {"name": "ok", "transactioncurrencyid@odata.bind": "/foos(1)"},
            "0x80060888",
            "not a valid entity reference",
        ),
        (
            {"name": "ok", "transactioncurrencyid@odata.bind": "garbage"},
            "0x80060888",
            "not a valid entity reference",
        ),
        (
            {"name": "ok", "transactioncurrencyid@odata.bind": f"/accounts({uuid.UUID(int=5)})"},
            "0x80060888",
            "expects 'transactioncurrencies'",
        ),
        ({"name": "ok", "nothing@odata.bind": "/accounts(x)"}, "0x80060888", "undeclared property 'nothing'"),
    ],
)
def test_validation_errors(sandbox: DataverseSandbox, body: dict, code: str, fragment: str):
    response = _call(sandbox, "POST", "accounts", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert fragment in response.json()["error"]["message"]


def test_bind_to_a_missing_record_is_404(sandbox: DataverseSandbox):
    missing = uuid.UUID(int=5)
    body = {"name": "ok", "transactioncurrencyid@odata.bind": f"/transactioncurrencies({missing})"}
    response = _call(sandbox, "POST", "accounts", body)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == {
        "code": "0x80040217",
        "message": f"transactioncurrency With Id = {missing} Does Not Exist",
    }


def test_lookup_bind_to_wrong_table(sandbox: DataverseSandbox):
    account = _call(sandbox, "GET", "accounts?$top=1&$select=name").json()["value"][0]["accountid"]
    response = _call(
        sandbox, "POST", "accounts", {"name": "x", "transactioncurrencyid@odata.bind": f"accounts({account})"}
    )
    assert (
        response.status_code == 400
        and "expects 'transactioncurrencies'" in response.json()["error"]["message"]
    )
    order = _call(
        sandbox,
        "POST",
        "salesorders",
        {"name": "SO", "ordernumber": "SO-1", "customerid_account@odata.bind": f"/accounts({account})"},
        Prefer="return=representation",
    )
    assert order.status_code == 201 and order.json()["_customerid_value"] == account


def test_bad_bodies_never_500(sandbox: DataverseSandbox):
    for raw in (b"{", b"[]", b"null", b"\xff\xfe", b'{"name": {"nested": 1}}', b""):
        response = requests.post(
            f"{sandbox.api_url}/accounts",
            data=raw,
            headers=sandbox.headers(**{"Content-Type": "application/json"}),
            timeout=30,
        )
        assert response.status_code == 400, (raw, response.text)
        assert response.json()["error"]["message"]
    for path in (
        "accounts(",
        "accounts(''')",
        "accounts(name=)",
        "accounts?$orderby=name sideways",
        "accounts?$top=-1",
        "accounts?$expand=nothing",
        "accounts?$skiptoken=bogus",
        "accounts?$deltatoken=bogus",
    ):
        response = _call(sandbox, "GET", path)
        assert 400 <= response.status_code < 500, (path, response.text)
        assert "error" in response.json()


def test_upsert_multiple_is_atomic(sandbox: DataverseSandbox):
    targets = [
        {
            "@odata.type": "Microsoft.Dynamics.CRM.account",
            "@odata.id": f"accounts(accountnumber='BULK-{i}')",
            "name": f"Bulk {i}",
        }
        for i in range(5)
    ]
    targets[3]["name"] = "x" * 200
    failed = _call(sandbox, "POST", "accounts/Microsoft.Dynamics.CRM.UpsertMultiple", {"Targets": targets})
    assert failed.status_code == 400 and "maximum allowed length" in failed.json()["error"]["message"]
    assert _call(sandbox, "GET", "accounts?$filter=startswith(accountnumber,'BULK-')").json()["value"] == []
    targets[3]["name"] = "Bulk 3"
    targets.append(
        {"@odata.type": "Microsoft.Dynamics.CRM.account", "accountnumber": "BULK-9", "name": "By column"}
    )
    ok = _call(sandbox, "POST", "accounts/Microsoft.Dynamics.CRM.UpsertMultiple", {"Targets": targets})
    assert ok.status_code == 204
    rows = _call(sandbox, "GET", "accounts?$filter=startswith(accountnumber,'BULK-')").json()["value"]
    assert len(rows) == 6
    created = _call(
        sandbox,
        "POST",
        "accounts/Microsoft.Dynamics.CRM.CreateMultiple",
        {"Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.account", "name": f"CM {i}"} for i in range(3)]},
    )
    assert created.status_code == 200 and len(created.json()["Ids"]) == 3
    updates = [{"accountid": i, "telephone1": "42"} for i in created.json()["Ids"]]
    assert (
        _call(
            sandbox, "POST", "accounts/Microsoft.Dynamics.CRM.UpdateMultiple", {"Targets": updates}
        ).status_code
        == 204
    )
