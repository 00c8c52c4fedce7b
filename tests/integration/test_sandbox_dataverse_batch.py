"""$batch against the sandbox, built and parsed with the project's multipart codec."""

from __future__ import annotations

import json

import requests

from d365sync.dynamics.multipart import BatchPart, Changeset, build_batch_request, parse_batch_response
from tests.sandbox_fixtures import DataverseSandbox

JSON = {"Content-Type": "application/json"}


def _post_batch(sandbox: DataverseSandbox, items, prefer: str | None = None) -> requests.Response:
    content_type, body = build_batch_request(items)
    headers = sandbox.headers(**{"Content-Type": content_type})
    if prefer:
        headers["Prefer"] = prefer
    return requests.post(f"{sandbox.api_url}/$batch", data=body, headers=headers, timeout=120)


def _create(url: str, body: dict, content_id: str | None = None) -> BatchPart:
    return BatchPart(
        method="POST", url=url, headers=dict(JSON), body=json.dumps(body).encode(), content_id=content_id
    )


def test_batch_of_1000_with_continue_on_error(dataverse_sandbox_factory):
    sandbox = dataverse_sandbox_factory()
    sandbox.reset_counters()
    items = []
    for i in range(1000):
        name = "x" * 200 if i in (10, 500, 999) else f"Batch {i}"
        items.append(_create("/api/data/v9.2/accounts", {"name": name, "accountnumber": f"B-{i}"}))
    response = _post_batch(sandbox, items, prefer="odata.continue-on-error")
    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "odata.continue-on-error"
    parts = parse_batch_response(response.headers["Content-Type"], response.content)
    statuses = [p.status for p in parts]
    assert len(parts) == 1000
    assert [i for i, s in enumerate(statuses) if s != 204] == [10, 500, 999]
    assert json.loads(parts[10].body)["error"]["code"] == "0x80044331"
    count = requests.get(f"{sandbox.api_url}/accounts/$count", headers=sandbox.headers(), timeout=30).text
    assert count == "997"
    counters = sandbox.counters()
    assert counters["operations"] >= 1000 and counters["routes"].get("POST $batch") == 1


def test_batch_stops_at_first_error_without_preference(dataverse_sandbox_factory):
    sandbox = dataverse_sandbox_factory()
    items = [
        _create("accounts", {"name": "ok 1"}),
        _create("accounts", {"name": "x" * 200}),
        _create("accounts", {"name": "never"}),
    ]
    response = _post_batch(sandbox, items)
    assert response.status_code == 400
    parts = parse_batch_response(response.headers["Content-Type"], response.content)
    assert [p.status for p in parts] == [204, 400]


def test_changeset_is_atomic_and_supports_content_id(dataverse_sandbox_factory):
    sandbox = dataverse_sandbox_factory(seed=3)
    good = Changeset(
        [
            _create("accounts", {"name": "Parent", "accountnumber": "CS-1"}, content_id="1"),
            _create(
                "contacts", {"lastname": "Child", "parentcustomerid_account@odata.bind": "$1"}, content_id="2"
            ),
            BatchPart(
                method="PATCH", url="$1", headers=dict(JSON), body=b'{"telephone1": "123"}', content_id="3"
            ),
        ]
    )
    bad = Changeset(
        [
            _create("accounts", {"name": "Rolled back", "accountnumber": "CS-2"}, content_id="4"),
            _create("accounts", {"name": "dup", "accountnumber": "CS-1"}, content_id="5"),
        ]
    )
    read = BatchPart(
        method="GET",
        url="accounts?$select=name,telephone1&$filter=startswith(accountnumber,'CS-')",
        headers={},
    )
    response = _post_batch(sandbox, [good, bad, read], prefer="odata.continue-on-error")
    assert response.status_code == 200
    items = parse_batch_response(response.headers["Content-Type"], response.content)
    assert isinstance(items[0], Changeset) and [p.status for p in items[0].parts] == [204, 204, 204]
    assert items[1].status == 412
    rows = json.loads(items[2].body)["value"]
    assert [(r["name"], r["telephone1"]) for r in rows] == [("Parent", "123")]
    contact = requests.get(
        f"{sandbox.api_url}/contacts?$filter=lastname eq 'Child'&$select=_parentcustomerid_value",
        headers=sandbox.headers(),
        timeout=30,
    ).json()["value"][0]
    assert contact["_parentcustomerid_value"] == rows[0]["accountid"]


def test_batch_limits_and_malformed_bodies(dataverse_sandbox: DataverseSandbox):
    too_many = [_create("accounts", {"name": f"n{i}"}) for i in range(1001)]
    response = _post_batch(dataverse_sandbox, too_many)
    assert response.status_code == 400 and "1000" in response.json()["error"]["message"]
    for content_type, body in (
        ("multipart/mixed; boundary=batch_x", b"garbage without boundaries"),
        ("multipart/mixed", b"--batch_x\r\n\r\n--batch_x--"),
        ("application/json", b"{}"),
        (
            "multipart/mixed; boundary=batch_x",
            b"--batch_x\r\nContent-Type: application/http\r\n\r\nNOT HTTP\r\n--batch_x--\r\n",
        ),
    ):
        bad = requests.post(
            f"{dataverse_sandbox.api_url}/$batch",
            data=body,
            headers=dataverse_sandbox.headers(**{"Content-Type": content_type}),
            timeout=30,
        )
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["message"]
