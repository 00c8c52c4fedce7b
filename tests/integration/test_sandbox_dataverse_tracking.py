"""Change tracking: delta links, deletes, expiry, paging, and persistence across restarts."""

from __future__ import annotations

import time
from urllib.parse import unquote

import requests

from tests.sandbox_fixtures import DataverseSandbox


def _get(sandbox: DataverseSandbox, url: str, **headers: str) -> requests.Response:
    full = url if url.startswith("http") else f"{sandbox.api_url}/{url}"
    return requests.get(full, headers=sandbox.headers(**headers), timeout=60)


def _call(sandbox: DataverseSandbox, method: str, path: str, body: object = None) -> requests.Response:
    return requests.request(
        method, f"{sandbox.api_url}/{path}", json=body, headers=sandbox.headers(), timeout=30
    )


def _drain(sandbox: DataverseSandbox, url: str) -> tuple[list[dict], str]:
    values: list[dict] = []
    while True:
        body = _get(sandbox, url, Prefer="odata.track-changes").json()
        values += body["value"]
        if "@odata.nextLink" in body:
            url = body["@odata.nextLink"]
            continue
        return values, body["@odata.deltaLink"]


def test_delta_with_creates_updates_and_deletes(dataverse_sandbox_factory):
    sandbox = dataverse_sandbox_factory(seed=30)
    first = _get(sandbox, "accounts?$select=name,accountnumber", Prefer="odata.track-changes")
    assert first.headers["Preference-Applied"] == "odata.track-changes"
    assert len(first.json()["value"]) == 30
    delta_link = first.json()["@odata.deltaLink"]
    token = unquote(delta_link.split("$deltatoken=")[1])
    assert "!" in token and "/" in token.split("!")[1]

    rows = first.json()["value"]
    _call(sandbox, "PATCH", f"accounts({rows[0]['accountid']})", {"name": "Changed"})
    _call(sandbox, "DELETE", f"accounts({rows[1]['accountid']})")
    created = _call(sandbox, "POST", "accounts", {"name": "Fresh"}).headers["OData-EntityId"]
    transient = _call(sandbox, "POST", "accounts", {"name": "Gone soon"}).headers["OData-EntityId"]
    _call(sandbox, "DELETE", transient.split("/v9.2/")[1])

    delta = _get(sandbox, delta_link, Prefer="odata.track-changes").json()
    assert delta["@odata.context"].endswith("/$delta")
    changed = [v for v in delta["value"] if "reason" not in v]
    deleted = [v for v in delta["value"] if v.get("reason") == "deleted"]
    assert [v["name"] for v in changed] == ["Changed", "Fresh"]
    assert {d["id"] for d in deleted} == {rows[1]["accountid"], transient.rsplit("(", 1)[1].rstrip(")")}
    assert all(d["@odata.context"].endswith("$metadata#accounts/$deletedEntity") for d in deleted)
    assert delta["value"].index(deleted[0]) > delta["value"].index(changed[-1])
    assert created
    empty = _get(sandbox, delta["@odata.deltaLink"], Prefer="odata.track-changes").json()
    assert empty["value"] == []


def test_tracking_rejects_unsupported_options(dataverse_sandbox: DataverseSandbox):
    for option in ("$filter=name eq 'x'", "$orderby=name", "$expand=transactioncurrencyid", "$top=5"):
        response = _get(dataverse_sandbox, f"accounts?$select=name&{option}", Prefer="odata.track-changes")
        assert response.status_code == 400
        name = option.split("=")[0]
        assert response.json()["error"]["message"] == (
            f'The "{name}" query parameter isn\'t supported when Change Tracking is enabled.'
        )


def test_large_delta_is_paged(dataverse_sandbox_factory):
    sandbox = dataverse_sandbox_factory(seed=6000)
    initial, delta_link = _drain(sandbox, "accounts?$select=name")
    assert len(initial) == 6000
    targets = [{"accountid": row["accountid"], "telephone1": "1"} for row in initial[:5200]]
    for start in range(0, len(targets), 1000):
        batch = {"Targets": targets[start : start + 1000]}
        assert (
            _call(sandbox, "POST", "accounts/Microsoft.Dynamics.CRM.UpdateMultiple", batch).status_code == 204
        )
    for row in initial[-3:]:
        _call(sandbox, "DELETE", f"accounts({row['accountid']})")
    changes, _ = _drain(sandbox, delta_link)
    assert len([c for c in changes if "reason" not in c]) == 5200
    assert len([c for c in changes if c.get("reason") == "deleted"]) == 3


def test_expired_delta_token_and_restart_persistence(dataverse_sandbox_factory):
    # long enough for a restart on a loaded machine, short enough to wait out
    sandbox = dataverse_sandbox_factory(seed=5, retention_seconds=15)
    first = _get(sandbox, "accounts?$select=name", Prefer="odata.track-changes").json()
    issued = time.monotonic()
    _call(sandbox, "POST", "accounts", {"name": "Before restart", "accountnumber": "R-1"})
    sandbox.restart()
    assert _get(sandbox, "accounts(accountnumber='R-1')").json()["name"] == "Before restart"
    delta = _get(sandbox, first["@odata.deltaLink"], Prefer="odata.track-changes")
    assert delta.status_code == 200
    assert [v["name"] for v in delta.json()["value"]] == ["Before restart"]
    time.sleep(max(0.0, issued + 16 - time.monotonic()))
    expired = _get(sandbox, first["@odata.deltaLink"], Prefer="odata.track-changes")
    assert expired.status_code == 400
    assert expired.json()["error"]["message"] == (
        "Version stamp associated with the client has expired. Please perform a full sync."
    )
