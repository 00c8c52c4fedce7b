"""Parallel requests against the sandbox: no lost update or duplicate, versions and change tracking
stay consistent, parallel bulk requests overlap on the server, and the execution-time limit.

One sandbox for the module, started with the per-record cost knob set (through the CLI option),
so every write below spends simulated server time outside the write lock.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from d365sync.dynamics.multipart import BatchPart, Changeset, build_batch_request, parse_batch_response
from d365sync.sandbox.dataverse.config import Limits
from d365sync.sandbox.dataverse.errors import DataverseError
from d365sync.sandbox.dataverse.limits import ServiceProtection
from tests.sandbox_fixtures import DataverseSandbox

RECORD_COST_MS = 1.0
EXECUTION_TIME_LIMIT = "0x80072321"
WRITER_COLUMNS = ("telephone1", "address1_city", "emailaddress1", "description", "address1_line1")
ROUNDS = 4
TRACKERS = 2
SHARED_KEYS = [f"CC-S-{i:03d}" for i in range(60)]


@pytest.fixture(scope="module")
def sandbox(dataverse_sandbox_factory: Callable[..., DataverseSandbox]) -> DataverseSandbox:
    return dataverse_sandbox_factory(record_cost_ms=RECORD_COST_MS)


def _upsert_many(sandbox: DataverseSandbox, targets: list[dict[str, Any]]) -> requests.Response:
    body = {"Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.account", **t} for t in targets]}
    return requests.post(
        f"{sandbox.api_url}/accounts/Microsoft.Dynamics.CRM.UpsertMultiple",
        json=body,
        headers=sandbox.headers(),
        timeout=120,
    )


def _in_parallel(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run the jobs in threads released together by a barrier; their results in order."""
    barrier = threading.Barrier(len(jobs))

    def run(job: Callable[[], Any]) -> Any:
        barrier.wait(timeout=60)
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


def _pages(sandbox: DataverseSandbox, url: str, **headers: str) -> tuple[list[dict[str, Any]], str | None]:
    """All rows of a read, following nextLinks; plus the deltaLink when change tracking."""
    values: list[dict[str, Any]] = []
    while True:
        full = url if url.startswith("http") else f"{sandbox.api_url}/{url}"
        response = requests.get(full, headers=sandbox.headers(**headers), timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        values += body["value"]
        if "@odata.nextLink" not in body:
            return values, body.get("@odata.deltaLink")
        url = body["@odata.nextLink"]


def _version(row: dict[str, Any]) -> int:
    return int(row["@odata.etag"].split('"')[1])


class _Tracker:
    """Follows delta links in a loop while writers run; remembers every version it saw per key."""

    def __init__(self, sandbox: DataverseSandbox) -> None:
        self.sandbox = sandbox
        _, self.link = _pages(sandbox, "accounts?$select=accountnumber", Prefer="odata.track-changes")
        self.seen: dict[str, list[int]] = {}
        self.stop = threading.Event()

    def poll(self) -> None:
        assert self.link is not None
        changes, self.link = _pages(self.sandbox, self.link, Prefer="odata.track-changes")
        for row in changes:
            if "reason" not in row and (row.get("accountnumber") or "").startswith("CC-"):
                self.seen.setdefault(row["accountnumber"], []).append(_version(row))

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
        self.poll()  # one last delta after every writer finished


def test_concurrent_upserts_lose_no_update_duplicate_no_key_and_track_every_change(sandbox):
    trackers = [_Tracker(sandbox) for _ in range(TRACKERS)]
    tracking = [threading.Thread(target=t.run) for t in trackers]
    for thread in tracking:
        thread.start()

    def writer(index: int) -> list[int]:
        column = WRITER_COLUMNS[index]
        statuses = []
        for round_ in range(ROUNDS):
            shared = [
                {"accountnumber": k, "name": f"Shared {k}", column: f"w{index}-r{round_}"}
                for k in SHARED_KEYS
            ]
            own = [
                {"accountnumber": f"CC-W{index}-{round_}-{i:02d}", "name": f"Own {index}", column: "mine"}
                for i in range(20)
            ]
            statuses.append(_upsert_many(sandbox, shared + own).status_code)
        return statuses

    try:
        results = _in_parallel([lambda i=i: writer(i) for i in range(len(WRITER_COLUMNS))])
    finally:
        for tracker, thread in zip(trackers, tracking, strict=True):
            tracker.stop.set()
            thread.join(timeout=120)
    assert results == [[204] * ROUNDS] * len(WRITER_COLUMNS)

    select = ",".join(("accountnumber", *WRITER_COLUMNS))
    rows, _ = _pages(sandbox, f"accounts?$select={select}&$filter=startswith(accountnumber,'CC-')")
    counts = Counter(r["accountnumber"] for r in rows)
    own_keys = {
        f"CC-W{w}-{r}-{i:02d}" for w in range(len(WRITER_COLUMNS)) for r in range(ROUNDS) for i in range(20)
    }
    assert set(counts) == set(SHARED_KEYS) | own_keys
    assert max(counts.values()) == 1, "an alternate key was inserted twice"

    # No lost update: each writer owns one column of the shared rows; its last round must stand.
    for row in rows:
        if row["accountnumber"] in SHARED_KEYS:
            assert [row[c] for c in WRITER_COLUMNS] == [
                f"w{i}-r{ROUNDS - 1}" for i in range(len(WRITER_COLUMNS))
            ]

    # Versions: unique, never above the committed watermark, increasing per row as seen by deltas.
    final = {r["accountnumber"]: _version(r) for r in rows}
    assert len(set(final.values())) == len(final)
    health = requests.get(f"{sandbox.base_url}/_sandbox/health", timeout=30).json()
    assert max(final.values()) <= health["version"]
    for tracker in trackers:
        for key, versions in tracker.seen.items():
            assert versions == sorted(set(versions)), (key, versions)

    # Change tracking: each chain of deltas taken during the writes saw every row's final version.
    for tracker in trackers:
        assert {key: versions[-1] for key, versions in tracker.seen.items()} == final


def test_parallel_bulk_requests_overlap_on_the_server(sandbox):
    sandbox.set_knobs(record_cost_ms=4)
    try:
        sandbox.reset_counters()
        chunks = [
            [{"accountnumber": f"OV-{c}-{i:03d}", "name": "Overlap"} for i in range(250)] for c in range(4)
        ]
        statuses = _in_parallel(
            [lambda chunk=chunk: _upsert_many(sandbox, chunk).status_code for chunk in chunks]
        )
        counters = sandbox.counters()
    finally:
        sandbox.set_knobs(record_cost_ms=RECORD_COST_MS)
    assert statuses == [204] * 4
    assert counters["max_in_flight"] > 1
    assert counters["max_parallel_cost"] > 1, "the per-record cost was not spent in parallel"
    assert counters["operations"] == 1000
    assert counters["execution_ms"] >= 4 * 250 * 4  # every record's cost is charged as server time


def test_changeset_with_record_cost_stays_atomic(sandbox):
    def create(body: dict[str, Any], content_id: str) -> BatchPart:
        return BatchPart(
            method="POST",
            url="accounts",
            headers={"Content-Type": "application/json"},
            body=json.dumps(body).encode(),
            content_id=content_id,
        )

    good = Changeset([create({"name": "CS ok", "accountnumber": f"CSC-{i}"}, str(i)) for i in range(3)])
    bad = Changeset(
        [create({"name": "CS rolled back", "accountnumber": "CSC-9"}, "9"), create({"name": "x" * 200}, "10")]
    )
    content_type, body = build_batch_request([good, bad])
    response = requests.post(
        f"{sandbox.api_url}/$batch",
        data=body,
        headers=sandbox.headers(**{"Content-Type": content_type, "Prefer": "odata.continue-on-error"}),
        timeout=60,
    )
    assert response.status_code == 200
    items = parse_batch_response(response.headers["Content-Type"], response.content)
    assert isinstance(items[0], Changeset) and [p.status for p in items[0].parts] == [204, 204, 204]
    assert isinstance(items[1], BatchPart) and items[1].status == 400
    rows, _ = _pages(sandbox, "accounts?$select=accountnumber&$filter=startswith(accountnumber,'CSC-')")
    assert sorted(r["accountnumber"] for r in rows) == ["CSC-0", "CSC-1", "CSC-2"]


def test_execution_time_limit_gives_429_with_retry_after(sandbox):
    def who() -> requests.Response:
        return requests.get(f"{sandbox.api_url}/WhoAmI", headers=sandbox.headers(), timeout=30)

    user_id = who().json()["UserId"]
    sandbox.set_knobs(
        limits={"execution_time_ms": 40, "execution_window_seconds": 60},
        request_cost_ms=50,
        reset_limits=True,
    )
    try:
        assert who().status_code == 200  # the request that crosses the budget still runs
        throttled = who()
        assert throttled.status_code == 429
        assert 1 <= int(throttled.headers["Retry-After"]) <= 60
        assert throttled.json()["error"] == {
            "code": EXECUTION_TIME_LIMIT,
            "message": "Combined execution time of incoming requests exceeded limit of 40 milliseconds over "
            "time window of 60 seconds. Decrease number of concurrent requests or reduce the duration of "
            "requests and try again later.",
        }
        batch = requests.post(
            f"{sandbox.api_url}/$batch",
            data=b"",
            headers=sandbox.headers(**{"Content-Type": "multipart/mixed; boundary=batch_x"}),
            timeout=30,
        )
        assert batch.status_code == 429 and batch.json()["error"]["code"] == EXECUTION_TIME_LIMIT
        counters = sandbox.counters()
        assert counters["throttled_codes"][EXECUTION_TIME_LIMIT] >= 2
        assert counters["execution_time_window_ms"][user_id] >= 50
        sandbox.set_knobs(reset_limits=True)
        assert who().status_code == 200
    finally:
        state = sandbox.set_knobs(
            limits={"execution_time_ms": 1_200_000, "execution_window_seconds": 300},
            request_cost_ms=0,
            reset_limits=True,
        )
    assert state["limits"]["execution_time_ms"] == 1_200_000
    assert state["record_cost_ms"] == RECORD_COST_MS


def test_execution_time_limit_defaults_and_retry_after():
    limiter = ServiceProtection(Limits())
    assert limiter.check_execution_time("u") == 1_200_000
    limiter.spend("u", 700_000)
    limiter.spend("u", 600_000)
    with pytest.raises(DataverseError) as raised:
        limiter.check_execution_time("u")
    error = raised.value
    assert (error.status, error.code) == (429, EXECUTION_TIME_LIMIT)
    assert error.message == (
        "Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds over time "
        "window of 300 seconds. Decrease number of concurrent requests or reduce the duration of requests "
        "and try again later."
    )
    assert 299 <= int(error.headers["Retry-After"]) <= 300  # once the first request leaves the window
    assert limiter.check_execution_time("other") == 1_200_000  # per user
    limiter.reset()
    assert limiter.check_execution_time("u") == 1_200_000


def test_bulk_deep_insert_only_when_the_upsert_creates(sandbox):
    """Targets are parsed before the write lock, when an upsert does not yet know whether it
    creates: a deep insert is written for a new row and refused for an existing one."""
    target = {"accountnumber": "DI-DEEP", "name": "Deep", "primarycontactid": {"lastname": "Deep CC"}}
    assert _upsert_many(sandbox, [target]).status_code == 204
    rows, _ = _pages(sandbox, "accounts?$select=_primarycontactid_value&$filter=accountnumber eq 'DI-DEEP'")
    contact_id = rows[0]["_primarycontactid_value"]
    contact = requests.get(
        f"{sandbox.api_url}/contacts({contact_id})?$select=lastname", headers=sandbox.headers(), timeout=30
    )
    assert contact.json()["lastname"] == "Deep CC"
    again = _upsert_many(sandbox, [target])
    assert again.status_code == 400
    assert "Deep insert of 'primarycontactid'" in again.json()["error"]["message"]
