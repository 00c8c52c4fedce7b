"""Security issue 11, finding 10: the sandbox answers abusive input like Dataverse, with a 4xx and
a Dataverse error body, never a 500; its admin writes cannot be forged by a web page; its start-up
output does not print the client secret.  Real HTTP against a private sandbox process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.sandbox_fixtures import DataverseSandbox

TIMEOUT = 60


@pytest.fixture(scope="module")
def sandbox(dataverse_sandbox_factory) -> DataverseSandbox:
    return dataverse_sandbox_factory(seed=12, client_secret="s3cr3t-value-for-hardening-tests")


def _get(sandbox: DataverseSandbox, query: str) -> requests.Response:
    """``query`` as typed, spaces as ``+`` (keeps long filters under the 32 KB URL limit)."""
    url = f"{sandbox.api_url}/accounts?{query.replace(' ', '+')}"
    return requests.get(url, headers=sandbox.headers(), timeout=TIMEOUT)


def _dataverse_error(response: requests.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"code", "message"} and error["code"].startswith("0x"), error
    return error


# --- queries ------------------------------------------------------------------------------------


def test_filter_with_1500_terms_is_a_400(sandbox: DataverseSandbox) -> None:
    text = " or ".join("statecode eq 1" for _ in range(1500))
    error = _dataverse_error(_get(sandbox, f"$filter={text}"), 400)
    assert error["code"] == "0x80060888" and "800" in error["message"]


def test_filter_just_under_the_limit_still_works(sandbox: DataverseSandbox) -> None:
    text = " or ".join(f"statecode eq {i}" for i in range(790))
    response = _get(sandbox, f"$filter={text} and (not (statecode eq 5) or name eq 'x')")
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["value"]) >= 12


def test_startswith_with_a_50000_character_literal_is_4xx(sandbox: DataverseSandbox) -> None:
    """Over a plain GET the URL passes the documented 32 KB limit."""
    error = _dataverse_error(_get(sandbox, f"$filter=startswith(name,'{'x' * 50_000}')"), 414)
    assert "32 KB" in error["message"]


def test_a_50000_character_literal_inside_a_batch_is_a_400(sandbox: DataverseSandbox) -> None:
    """Inside $batch (64 KB URLs) the literal itself is over the limit (and over SQLite's LIKE limit)."""
    url = f"{sandbox.api_url}/accounts?$filter=startswith(name,'{'x' * 50_000}')"
    body = (
        "--batch_x\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        f"GET {url} HTTP/1.1\r\nAccept: application/json\r\n\r\n\r\n--batch_x--\r\n"
    )
    headers = sandbox.headers(**{"Content-Type": 'multipart/mixed; boundary="batch_x"'})
    response = requests.post(f"{sandbox.api_url}/$batch", data=body, headers=headers, timeout=TIMEOUT)
    assert response.status_code in (200, 400), response.text[:300]
    assert "HTTP/1.1 400" in response.text and "0x80060888" in response.text
    assert "32768" in response.text


def test_orderby_with_2000_terms_is_a_400(sandbox: DataverseSandbox) -> None:
    text = ",".join(["name"] * 2000)
    error = _dataverse_error(_get(sandbox, f"$orderby={text}"), 400)
    assert error["code"] == "0x80060888" and "800" in error["message"]


def test_orderby_repeating_a_column_pages_like_once(sandbox: DataverseSandbox) -> None:
    headers = sandbox.headers(Prefer="odata.maxpagesize=5")
    query = "$select=name&$orderby=" + ",".join(["name desc"] * 700)
    first = requests.get(f"{sandbox.api_url}/accounts?{query}", headers=headers, timeout=TIMEOUT)
    assert first.status_code == 200, first.text[:300]
    second = requests.get(first.json()["@odata.nextLink"], headers=headers, timeout=TIMEOUT)
    assert second.status_code == 200, second.text[:300]
    names = [r["name"] for r in first.json()["value"] + second.json()["value"]]
    assert names == sorted(names, key=str.lower, reverse=True)


def test_top_zero_returns_no_rows(sandbox: DataverseSandbox) -> None:
    response = _get(sandbox, "$top=0&$count=true")
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert body["value"] == [] and "@odata.nextLink" not in body and body["@odata.count"] >= 12


# --- write bodies -------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400(sandbox: DataverseSandbox) -> None:
    body = '{"name": "deep", "description": ' + "[" * 50_000 + "]" * 50_000 + "}"
    headers = sandbox.headers(**{"Content-Type": "application/json"})
    response = requests.post(f"{sandbox.api_url}/accounts", data=body, headers=headers, timeout=TIMEOUT)
    error = _dataverse_error(response, 400)
    assert error["code"] == "0x80048d19" and "100" in error["message"]


def test_brackets_inside_strings_are_not_nesting(sandbox: DataverseSandbox) -> None:
    body = '{"name": "brackets", "description": "' + "[{" * 300 + '"}'
    headers = sandbox.headers(**{"Content-Type": "application/json"})
    response = requests.post(f"{sandbox.api_url}/accounts", data=body, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 204, response.text[:300]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_writes_without_a_json_content_type_are_415(sandbox: DataverseSandbox, content_type) -> None:
    headers = sandbox.headers(**({"Content-Type": content_type} if content_type else {}))
    body = b'{"name": "not json by type"}'
    for method, url in (("POST", "accounts"), ("PATCH", "accounts(00000000-0000-0000-0000-00000000abcd)")):
        response = requests.request(
            method, f"{sandbox.api_url}/{url}", data=body, headers=headers, timeout=TIMEOUT
        )
        error = _dataverse_error(response, 415)
        assert error["code"] == "0x80048d19"
    found = _get(sandbox, "$filter=name eq 'not json by type'")
    assert found.json()["value"] == []


# --- admin endpoints --------------------------------------------------------------------------


def test_knobs_refuse_a_cross_site_text_plain_post(sandbox: DataverseSandbox) -> None:
    """What any web page can send: a simple (no-preflight) POST with a text/plain body."""
    url = f"{sandbox.base_url}/_sandbox/knobs"
    before = requests.get(url, timeout=TIMEOUT).json()
    forged = requests.post(
        url, data='{"error_rate": 1.0}', headers={"Content-Type": "text/plain"}, timeout=TIMEOUT
    )
    assert forged.status_code == 415
    unauthenticated = requests.post(url, json={"error_rate": 1.0}, timeout=TIMEOUT)
    assert unauthenticated.status_code == 401
    wrong = requests.post(
        url, json={"error_rate": 1.0}, headers={"X-Sandbox-Admin-Secret": "guess"}, timeout=TIMEOUT
    )
    assert wrong.status_code == 401
    reset = requests.post(f"{sandbox.base_url}/_sandbox/counters/reset", timeout=TIMEOUT)
    assert reset.status_code == 415
    assert requests.get(url, timeout=TIMEOUT).json() == before


def test_knobs_accept_the_admin_secret_or_a_bearer_token(sandbox: DataverseSandbox) -> None:
    assert sandbox.set_knobs(latency_ms=1)["latency_ms"] == 1  # the fixture's way: the header
    response = requests.post(
        f"{sandbox.base_url}/_sandbox/knobs",
        json={"latency_ms": 0},
        headers={"Authorization": f"Bearer {sandbox.token()}"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200 and response.json()["latency_ms"] == 0
    sandbox.reset_counters()
    assert sandbox.counters()["requests"] == 0


def test_start_up_output_does_not_print_the_client_secret(sandbox: DataverseSandbox) -> None:
    log = sandbox.log()
    assert "client secret:" in log and sandbox.client_secret not in log
    assert "(--client-secret or $D365SYNC_SANDBOX_CLIENT_SECRET)" in log


def test_help_still_mentions_the_secret_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "d365sync.cli", "sandbox", "dataverse", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "--client-secret" in result.stdout
