"""Service protection limits, fault knobs and counters."""

from __future__ import annotations

import requests

from tests.sandbox_fixtures import DataverseSandbox


def _who(sandbox: DataverseSandbox) -> requests.Response:
    return requests.get(f"{sandbox.api_url}/WhoAmI", headers=sandbox.headers(), timeout=30)


def test_request_limit_gives_429_with_retry_after(dataverse_sandbox_factory):
    sandbox = dataverse_sandbox_factory(limits={"requests": 5, "window_seconds": 30})
    statuses = [_who(sandbox).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    throttled = _who(sandbox)
    assert throttled.status_code == 429
    assert 1 <= int(throttled.headers["Retry-After"]) <= 30
    assert throttled.json()["error"] == {
        "code": "0x80072322",
        "message": "Number of requests exceeded the limit of 5 over time window of 30 seconds.",
    }
    assert sandbox.counters()["throttled"] >= 2
    sandbox.set_knobs(reset_limits=True)
    assert _who(sandbox).status_code == 200


def test_forced_throttle_burst_and_injected_errors(dataverse_sandbox_factory):
    sandbox = dataverse_sandbox_factory()
    sandbox.set_knobs(throttle_next=2, throttle_retry_after=7)
    first, second, third = (_who(sandbox) for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (429, 429, 200)
    assert first.headers["Retry-After"] == "7"
    sandbox.set_knobs(error_rate=1.0, error_status=503)
    assert _who(sandbox).status_code == 503
    sandbox.set_knobs(error_rate=0.0)
    assert _who(sandbox).status_code == 200


def test_counters(dataverse_sandbox_factory):
    sandbox = dataverse_sandbox_factory(seed=3)
    sandbox.token()
    sandbox.reset_counters()
    sandbox.token(fresh=True)
    requests.get(f"{sandbox.api_url}/accounts?$top=1", headers=sandbox.headers(), timeout=30)
    requests.get(f"{sandbox.api_url}/foos", headers=sandbox.headers(), timeout=30)
    targets = [{"@odata.type": "Microsoft.Dynamics.CRM.account", "name": f"C{i}"} for i in range(4)]
    requests.post(
        f"{sandbox.api_url}/accounts/Microsoft.Dynamics.CRM.CreateMultiple",
        json={"Targets": targets},
        headers=sandbox.headers(),
        timeout=30,
    )
    counters = sandbox.counters()
    assert counters["requests"] == 3
    assert counters["operations"] == 6
    assert counters["statuses"] == {"200": 2, "404": 1}
    assert counters["routes"]["GET accounts"] == 1
    assert counters["tokens_issued"] == 1
    health = requests.get(f"{sandbox.base_url}/_sandbox/health", timeout=30).json()
    assert health["status"] == "ok"
