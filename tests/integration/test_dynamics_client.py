"""DynamicsClient against the real Dataverse sandbox over HTTP (acceptance items of the client).

Every test writes rows under its own ``accountnumber`` prefix, so tests stay independent of the
seed data and of each other. Retry backoff is shortened for 5xx; 429 waits are the sandbox's
real Retry-After values.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests

from d365sync.dynamics import (
    ConcurrencyConflict,
    DynamicsAuthError,
    DynamicsClient,
    DynamicsConfig,
    RetrySettings,
)

try:
    from tests.sandbox_fixtures import dataverse_sandbox, dataverse_sandbox_factory
except ImportError:  # pragma: no cover - the sandbox fixture module is written in parallel
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        raise
    pytest.skip("tests/sandbox_fixtures.py is not available yet", allow_module_level=True)

__all__ = ["dataverse_sandbox", "dataverse_sandbox_factory"]  # re-exported for pytest discovery

ACCOUNT_SELECT = ["accountid", "accountnumber", "name"]
FAST_RETRY = RetrySettings(max_attempts=10, max_total_seconds=120, backoff_base=0.05, backoff_cap=0.5)


def client_for(sandbox: Any, **overrides: Any) -> DynamicsClient:
    """A client configured the way the Airflow hook would, pointed at a sandbox."""
    settings: dict[str, Any] = {
        "environment_url": str(sandbox.base_url),
        "tenant_id": sandbox.tenant,
        "client_id": sandbox.client_id,
        "client_secret": sandbox.client_secret,
        "authority_host": _authority_host(sandbox),
        "retry": FAST_RETRY,
    }
    if str(sandbox.base_url).startswith("https://"):
        settings["verify"] = str(sandbox.ca_bundle)
    return DynamicsClient(DynamicsConfig(**{**settings, **overrides}))


def _authority_host(sandbox: Any) -> str:
    authority = str(sandbox.authority).rstrip("/")
    suffix = f"/{sandbox.tenant}"
    return authority[: -len(suffix)] if authority.endswith(suffix) else authority


def _prefix(tag: str) -> str:
    return f"{tag}{uuid.uuid4().hex[:6]}-"  # accountnumber holds 20 characters


def _accounts(prefix: str, count: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"accountnumber": f"{prefix}{i:05d}", "name": f"Account {prefix}{i}", **extra} for i in range(count)
    ]


def _numbers_with_prefix(client: DynamicsClient, prefix: str) -> list[str]:
    rows = client.iter_rows("accounts", ["accountnumber"], filter=f"startswith(accountnumber,'{prefix}')")
    return [row["accountnumber"] for row in rows]


def _rows_with_prefix(client: DynamicsClient, prefix: str) -> list[dict[str, Any]]:
    where = f"startswith(accountnumber,'{prefix}')"
    return list(client.iter_rows("accounts", ["accountid", "accountnumber"], filter=where))


@pytest.fixture
def client(dataverse_sandbox: Any) -> Iterator[DynamicsClient]:
    with client_for(dataverse_sandbox) as dynamics:
        yield dynamics


@pytest.fixture(scope="module")
def private_sandbox(dataverse_sandbox_factory: Any) -> Any:
    """A sandbox of our own: knob changes and 12k-row tables must not leak into shared tests."""
    return dataverse_sandbox_factory()


@pytest.fixture
def private_client(private_sandbox: Any) -> Iterator[DynamicsClient]:
    private_sandbox.set_knobs(throttle_next=0, error_rate=0.0)
    with client_for(private_sandbox) as dynamics:
        yield dynamics


def test_whoami_and_metadata_lookups(client: DynamicsClient) -> None:
    who = client.whoami()
    assert uuid.UUID(who["UserId"]) and uuid.UUID(who["OrganizationId"])
    assert client.entity_set_name("account") == "accounts"
    assert client.logical_name("salesorders") == "salesorder"


def test_paging_over_more_than_12000_rows(private_client: DynamicsClient) -> None:
    client = private_client
    prefix, total, page = _prefix("pg"), 12_345, 1000
    outcomes = client.upsert_many("accounts", "accountnumber", _accounts(prefix, total))
    assert all(o.ok for o in outcomes)
    before = client.counters.requests
    rows = client.iter_rows(
        "accounts",
        ACCOUNT_SELECT,
        filter=f"startswith(accountnumber,'{prefix}')",
        page_size=page,
    )
    first = next(rows)
    assert client.counters.requests == before + 1  # lazy: one page fetched so far
    numbers = [first["accountnumber"], *(row["accountnumber"] for row in rows)]
    assert len(numbers) == total and len(set(numbers)) == total
    assert set(first) <= {*ACCOUNT_SELECT, "@odata.etag"}  # only the selected columns
    assert client.counters.requests - before == math.ceil(total / page)


def test_delta_shows_exactly_the_creates_updates_and_deletes(private_client: DynamicsClient) -> None:
    client = private_client
    prefix = _prefix("dl")
    client.upsert_many("accounts", "accountnumber", _accounts(prefix, 3))
    baseline = client.iter_changes("accounts", ACCOUNT_SELECT, id_attribute="accountid")
    assert sum(1 for _ in baseline) >= 3 and not baseline.full_resync
    existing = {r["accountnumber"]: r["accountid"] for r in _rows_with_prefix(client, prefix)}

    created = client.upsert_many("accounts", "accountnumber", _accounts(f"{prefix}n", 2), strategy="batch")
    updated = client.upsert_many(
        "accounts",
        "accountnumber",
        [{"accountnumber": f"{prefix}00000", "name": "renamed"}],
        strategy="batch",
    )
    assert {o.status for o in created} == {"created"} and updated[0].status == "updated"
    assert client.delete("accounts", existing[f"{prefix}00002"])

    feed = client.iter_changes("accounts", ACCOUNT_SELECT, baseline.delta_token, id_attribute="accountid")
    changes = list(feed)
    upserts = {c.row["accountnumber"]: c.row["name"] for c in changes if c.kind == "upsert"}
    assert upserts == {
        f"{prefix}n00000": f"Account {prefix}n0",
        f"{prefix}n00001": f"Account {prefix}n1",
        f"{prefix}00000": "renamed",
    }
    assert [c.id for c in changes if c.kind == "delete"] == [existing[f"{prefix}00002"]]
    assert [c.kind for c in changes][-1] == "delete"  # upserts first, then deletes
    quiet = client.iter_changes("accounts", ACCOUNT_SELECT, feed.delta_token)
    assert list(quiet) == [] and quiet.delta_token


def _rows_with_prefix(client: DynamicsClient, prefix: str) -> list[dict[str, Any]]:
    return list(client.iter_rows("accounts", ACCOUNT_SELECT, filter=f"startswith(accountnumber,'{prefix}')"))


def test_expired_delta_token_falls_back_to_a_full_read(dataverse_sandbox_factory: Any) -> None:
    sandbox = dataverse_sandbox_factory(retention_seconds=1)
    with client_for(sandbox) as dynamics:
        prefix = _prefix("ex")
        dynamics.upsert_many("accounts", "accountnumber", _accounts(prefix, 5))
        first = dynamics.iter_changes("accounts", ACCOUNT_SELECT)
        total = sum(1 for _ in first)
        time.sleep(1.5)
        dynamics.upsert_many("accounts", "accountnumber", _accounts(f"{prefix}x", 1))
        time.sleep(1.5)
        feed = dynamics.iter_changes("accounts", ACCOUNT_SELECT, first.delta_token)
        rows = [c for c in feed]
        assert feed.full_resync
        assert len(rows) == total + 1 and all(c.kind == "upsert" for c in rows)
        assert feed.delta_token != first.delta_token


def test_iter_window_is_half_open_and_ordered(client: DynamicsClient) -> None:
    prefix = _prefix("wn")
    client.upsert_many("accounts", "accountnumber", _accounts(prefix, 3))
    mine = f"startswith(accountnumber,'{prefix}')"
    stamps = sorted(r["modifiedon"] for r in client.iter_rows("accounts", ["modifiedon"], filter=mine))
    start = datetime.fromisoformat(stamps[0].replace("Z", "+00:00"))
    end = datetime.fromisoformat(stamps[-1].replace("Z", "+00:00")) + timedelta(seconds=1)
    rows = list(
        client.iter_window("accounts", ["accountnumber", "modifiedon"], start, end, extra_filter=mine)
    )
    assert len(rows) == 3 and [r["modifiedon"] for r in rows] == stamps
    assert (
        list(client.iter_window("accounts", ["accountnumber"], start - timedelta(hours=1), start, mine)) == []
    )
    with pytest.raises(ValueError):
        list(client.iter_window("accounts", ["accountnumber"], end, start))


def test_batch_upsert_of_1000_isolates_three_bad_records(client: DynamicsClient) -> None:
    prefix = _prefix("bt")
    records = _accounts(prefix, 1000)
    records[10]["name"] = "x" * 161  # name holds 160 characters
    records[500]["transactioncurrencyid@odata.bind"] = f"/transactioncurrencies({uuid.uuid4()})"
    records[999]["paymenttermscode"] = 99  # not an option of the picklist
    started = time.perf_counter()
    outcomes = client.upsert_many("accounts", "accountnumber", records, strategy="batch")
    elapsed = time.perf_counter() - started
    failed = {o.index: o for o in outcomes if not o.ok}
    assert sorted(failed) == [10, 500, 999]
    assert all(o.code.startswith("0x") and o.http_status and o.http_status >= 400 for o in failed.values())
    assert failed[10].key == {"accountnumber": f"{prefix}00010"}
    assert [o.index for o in outcomes] == list(range(1000))
    assert sum(o.status == "created" for o in outcomes) == 997
    assert len(_numbers_with_prefix(client, prefix)) == 997
    print(f"\n$batch upsert of 1000 (3 bad): {elapsed:.2f}s; codes {[f.code for f in failed.values()]}")


def test_upsert_multiple_fast_path_falls_back_to_isolation(client: DynamicsClient) -> None:
    prefix = _prefix("um")
    good = _accounts(prefix, 1000)
    started = time.perf_counter()
    outcomes = client.upsert_many("accounts", "accountnumber", good)
    fast = time.perf_counter() - started
    assert {o.status for o in outcomes} == {"upserted"}

    bad = [dict(r, name=f"v2 {r['name']}") for r in good[:50]]
    bad[7]["name"] = "y" * 200
    outcomes = client.upsert_many("accounts", "accountnumber", bad)
    assert [o.index for o in outcomes if not o.ok] == [7]
    assert {o.status for o in outcomes if o.ok} == {"updated"}  # learned from the isolating $batch
    assert client.get("accounts", {"accountnumber": f"{prefix}00008"}, ["name"])["name"].startswith("v2 ")
    print(f"\nUpsertMultiple of 1000: {fast:.2f}s")


def test_create_strategy_returns_guids_and_never_overwrites_an_existing_key(client: DynamicsClient) -> None:
    prefix = _prefix("cm")
    records = _accounts(prefix, 300)
    outcomes = client.upsert_many("accounts", "accountnumber", records, strategy="create")
    assert {o.status for o in outcomes} == {"created"}
    rows = {r["accountnumber"]: r["accountid"] for r in _rows_with_prefix(client, prefix)}
    assert [o.id for o in outcomes] == [rows[r["accountnumber"]].lower() for r in records]

    again = [dict(r, name=f"v2 {r['name']}") for r in records[:3]] + _accounts(prefix + "n", 2)
    again[3]["name"] = "z" * 200  # a bad row among new ones
    outcomes = client.upsert_many("accounts", "accountnumber", again, strategy="create")
    by_index = {o.index: o for o in outcomes}
    # existing keys fail alone (duplicate), the bad row fails alone, the good new row is created
    assert [i for i, o in by_index.items() if not o.ok] == [0, 1, 2, 3]
    assert {by_index[i].http_status for i in (0, 1, 2)} == {412}
    assert by_index[4].status == "created" and by_index[4].id
    existing = client.get("accounts", {"accountnumber": records[0]["accountnumber"]}, ["name"])
    assert existing is not None and not existing["name"].startswith("v2 ")  # not overwritten


def test_batch_upsert_returns_guids_when_asked(client: DynamicsClient) -> None:
    prefix = _prefix("ub")
    records = _accounts(prefix, 5)
    outcomes = client.upsert_many(
        "accounts", "accountnumber", records, strategy="batch", id_attribute="accountid"
    )
    rows = {r["accountnumber"]: r["accountid"] for r in _rows_with_prefix(client, prefix)}
    assert [o.id for o in outcomes] == [rows[r["accountnumber"]].lower() for r in records]


SPECIAL_KEYS = ("O'B", "a/b#?", "50% &")


@pytest.mark.parametrize("strategy", ["multiple", "batch"])
def test_keys_with_quotes_and_url_characters_round_trip(client: DynamicsClient, strategy: str) -> None:
    prefix = _prefix("q")
    numbers = [f"{prefix}{suffix}" for suffix in SPECIAL_KEYS]
    records = [{"accountnumber": n, "name": f"v1 {n}"} for n in numbers]
    assert all(o.ok for o in client.upsert_many("accounts", "accountnumber", records, strategy=strategy))
    records = [{"accountnumber": n, "name": f"v2 {n}"} for n in numbers]  # same keys: updates
    assert all(o.ok for o in client.upsert_many("accounts", "accountnumber", records, strategy=strategy))
    assert sorted(_numbers_with_prefix(client, prefix)) == sorted(numbers)
    for number in numbers:
        row = client.get("accounts", {"accountnumber": number}, ["accountnumber", "name"])
        assert row is not None and row["name"] == f"v2 {number}"


def test_iter_in_reads_many_keys_and_ids_in_few_requests(private_client: DynamicsClient) -> None:
    prefix = _prefix("in")
    records = _accounts(prefix, 1200) + [{"accountnumber": f"{prefix}{s}", "name": s} for s in SPECIAL_KEYS]
    assert all(o.ok for o in private_client.upsert_many("accounts", "accountnumber", records))
    numbers = [r["accountnumber"] for r in records]
    before = private_client.counters.requests
    rows = list(
        private_client.iter_in("accounts", ACCOUNT_SELECT, "accountnumber", [*numbers, f"{prefix}none"])
    )
    assert sorted(r["accountnumber"] for r in rows) == sorted(numbers)
    assert private_client.counters.requests - before == 2  # an eq/or chain of 20 terms: 61 requests
    ids = [uuid.UUID(r["accountid"]) for r in rows[:500]] + [r["accountid"].upper() for r in rows[500:]]
    by_id = list(private_client.iter_in("accounts", ACCOUNT_SELECT, "accountid", ids, page_size=700))
    assert sorted(r["accountid"] for r in by_id) == sorted(r["accountid"] for r in rows)


def test_stale_etag_gives_a_concurrency_conflict(client: DynamicsClient) -> None:
    key = {"accountnumber": f"{_prefix('et')}1"}
    client.upsert_many("accounts", "accountnumber", [{**key, "name": "v1"}])
    row = client.get("accounts", key, ["name"])
    assert row is not None
    etag = row["@odata.etag"]
    new_etag = client.update_if_match("accounts", key, {"name": "v2"}, etag)
    assert new_etag and new_etag != etag
    with pytest.raises(ConcurrencyConflict) as info:
        client.update_if_match("accounts", key, {"name": "v3"}, etag)
    assert info.value.status == 412 and info.value.code == "0x80060882"
    assert client.get("accounts", key, ["name"])["name"] == "v2"  # type: ignore[index]


def test_deactivate_and_delete(client: DynamicsClient) -> None:
    key = {"accountnumber": f"{_prefix('st')}1"}
    client.upsert_many("accounts", "accountnumber", [{**key, "name": "active"}])
    client.deactivate("accounts", key)
    state = client.get("accounts", key, ["statecode", "statuscode"])
    assert state is not None and (state["statecode"], state["statuscode"]) == (1, 2)
    assert client.delete("accounts", key) is True
    assert client.get("accounts", key, ["name"]) is None
    assert client.delete("accounts", key) is False


def test_forced_429_burst_is_waited_out_without_losing_operations(private_sandbox: Any) -> None:
    dataverse_sandbox = private_sandbox
    prefix, burst, retry_after = _prefix("th"), 6, 1
    with client_for(dataverse_sandbox, max_concurrency=4, batch_size=25) as dynamics:
        dataverse_sandbox.reset_counters()
        dataverse_sandbox.set_knobs(throttle_next=burst, throttle_retry_after=retry_after)
        started = time.perf_counter()
        outcomes = dynamics.upsert_many("accounts", "accountnumber", _accounts(prefix, 300))
        elapsed = time.perf_counter() - started
        assert all(o.ok for o in outcomes)
        assert len(set(_numbers_with_prefix(dynamics, prefix))) == 300
        counters = dynamics.counters.snapshot()
        assert counters["throttles"] == burst and counters["wait_seconds"] >= burst * retry_after
        assert dataverse_sandbox.counters()["throttled"] == burst
        print(f"\n429 burst of {burst}: {elapsed:.2f}s, client counters {counters}")


def test_injected_5xx_are_retried_transparently(private_sandbox: Any) -> None:
    dataverse_sandbox = private_sandbox
    with client_for(dataverse_sandbox) as dynamics:
        prefix = _prefix("5x")
        dynamics.upsert_many("accounts", "accountnumber", _accounts(prefix, 40))
        dataverse_sandbox.set_knobs(error_rate=0.3, error_status=503)
        try:
            rows = list(
                dynamics.iter_rows(
                    "accounts", ["accountnumber"], filter=f"startswith(accountnumber,'{prefix}')", page_size=4
                )
            )
        finally:
            dataverse_sandbox.set_knobs(error_rate=0.0)
        assert len(rows) == 40 and dynamics.counters.retries > 0


def test_expired_token_is_refreshed_transparently(private_sandbox: Any) -> None:
    dataverse_sandbox = private_sandbox
    with client_for(dataverse_sandbox) as dynamics:
        dynamics.whoami()
        assert dynamics.counters.token_acquisitions == 1
        dataverse_sandbox.set_knobs(expire_tokens_now=True)
        assert dynamics.whoami()["UserId"]
        assert dynamics.counters.token_acquisitions == 2
        assert dynamics.counters.requests == 3  # whoami, the 401, the retried whoami


def test_tokens_are_renewed_before_they_expire(dataverse_sandbox_factory: Any) -> None:
    sandbox = dataverse_sandbox_factory(token_lifetime=4)
    with client_for(sandbox) as dynamics:
        dynamics.whoami()
        time.sleep(2.5)  # past half of the 4 s lifetime: renew proactively, no 401 round trip
        dynamics.whoami()
        assert dynamics.counters.token_acquisitions == 2 and dynamics.counters.requests == 2
    assert sandbox.counters()["auth_failures"] == 0


def test_wrong_secret_is_a_clear_auth_error(dataverse_sandbox: Any) -> None:
    wrong = "definitely-not-the-secret"
    with (
        client_for(dataverse_sandbox, client_secret=wrong) as dynamics,
        pytest.raises(DynamicsAuthError) as info,
    ):
        dynamics.whoami()
    message = str(info.value)
    assert dataverse_sandbox.client_id in message and dataverse_sandbox.tenant in message
    assert "AADSTS" in message and wrong not in message


def test_unauthenticated_requests_are_rejected(dataverse_sandbox: Any) -> None:
    """Sanity check that the sandbox enforces auth, so the token tests above mean something."""
    response = requests.get(f"{dataverse_sandbox.api_url}/WhoAmI", timeout=10)
    response.close()
    assert response.status_code == 401
