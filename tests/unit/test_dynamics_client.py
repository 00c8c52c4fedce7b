"""DynamicsClient against an in-process requests adapter: headers, paging, retries, delta, upsert.

The adapter answers at the transport layer, so the real session, retry loop, limiter and
counters run; only the network and MSAL are replaced. Sleeps are recorded, never slept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from d365sync.dynamics import (
    ConcurrencyConflict,
    DynamicsApiError,
    DynamicsAuthError,
    DynamicsClient,
    DynamicsConfig,
    PagingLoopError,
    RetrySettings,
)
from d365sync.dynamics import multipart as mp

API = "https://org.crm.dynamics.com/api/data/v9.2"
Reply = tuple[int, dict[str, str], Any]
Handler = Callable[[requests.PreparedRequest], Reply]


class StubAdapter(BaseAdapter):
    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.calls: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.calls.append(request)
        self.verify = kwargs.get("verify")
        status, headers, body = self.handler(request)
        response = requests.Response()
        response.status_code, response.request, response.url = status, request, request.url or ""
        response.headers = CaseInsensitiveDict(headers)
        raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
        response._content, response._content_consumed = raw, True
        return response

    def close(self) -> None:
        pass


class FakeTokens:
    def __init__(self) -> None:
        self.issued = 0
        self.invalidated = 0

    def token(self) -> str:
        return f"tok{self.issued}"

    def invalidate(self, rejected: str | None = None) -> None:
        self.invalidated += 1
        self.issued += 1


def _replies(*replies: Reply) -> Handler:
    queue = list(replies)
    return lambda request: queue.pop(0)


@pytest.fixture
def make_client() -> Iterator[Callable[..., tuple[DynamicsClient, StubAdapter, list[float]]]]:
    clients: list[DynamicsClient] = []

    def build(handler: Handler, **overrides: Any) -> tuple[DynamicsClient, StubAdapter, list[float]]:
        config = DynamicsConfig(
            environment_url="https://org.crm.dynamics.com",
            tenant_id="t",
            client_id="c",
            client_secret="s",
            **{"retry": RetrySettings(max_attempts=4), **overrides},
        )
        sleeps: list[float] = []
        client = DynamicsClient(config, sleep=sleeps.append)
        adapter = StubAdapter(handler)
        client._session.mount("https://", adapter)
        client.transport.tokens = FakeTokens()  # type: ignore[assignment]
        clients.append(client)
        return client, adapter, sleeps

    yield build
    for client in clients:
        client.close()


def test_iter_rows_sends_standard_headers_and_follows_next_links_verbatim(make_client: Any) -> None:
    next_link = f"{API}/accounts?$select=name&$skiptoken=%3Ccookie%20pagenumber=%222%22%20/%3E"
    client, adapter, _ = make_client(
        _replies(
            (200, {}, {"value": [{"name": "a"}, {"name": "b"}], "@odata.nextLink": next_link}),
            (200, {}, {"value": [{"name": "c"}]}),
        )
    )
    rows = list(client.iter_rows("accounts", ["name", "accountnumber"], filter="statecode eq 0", page_size=2))
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    first, second = adapter.calls
    assert unquote(first.url or "") == f"{API}/accounts?$select=name,accountnumber&$filter=statecode eq 0"
    assert second.url == next_link
    for header, value in {
        "Accept": "application/json",
        "OData-MaxVersion": "4.0",
        "OData-Version": "4.0",
        "If-None-Match": "null",
        "Prefer": "odata.maxpagesize=2",
        "Authorization": "Bearer tok0",
    }.items():
        assert first.headers[header] == value
    assert client.counters.requests == 2


def test_iter_in_reads_many_keys_with_in_filters_and_pages(make_client: Any) -> None:
    next_link = f"{API}/accounts?$skiptoken=2"
    client, adapter, _ = make_client(
        _replies(
            (200, {}, {"value": [{"accountnumber": "A"}], "@odata.nextLink": next_link}),
            (200, {}, {"value": [{"accountnumber": "B"}]}),
            (200, {}, {"value": [{"accountnumber": "K-01999"}]}),
        )
    )
    keys = ["A", "B", *(f"K-{i:05d}" for i in range(2000))]
    rows = list(client.iter_in("accounts", ["accountnumber"], "accountnumber", keys, page_size=100))
    assert [r["accountnumber"] for r in rows] == ["A", "B", "K-01999"]
    first, second, third = (unquote(call.url or "") for call in adapter.calls)
    assert first.startswith(
        f"{API}/accounts?$select=accountnumber&$filter=Microsoft.Dynamics.CRM.In("
        """PropertyName='accountnumber',PropertyValues=["A","B","K-00000","""
    )
    assert second == unquote(next_link) and third.endswith(""","K-01999"])""")
    assert all(len(call.url or "") < 32 * 1024 for call in adapter.calls)
    assert adapter.calls[0].headers["Prefer"] == "odata.maxpagesize=100"


def test_iter_in_without_values_sends_nothing(make_client: Any) -> None:
    client, adapter, _ = make_client(_replies())
    assert list(client.iter_in("accounts", ["name"], "accountid", [])) == []
    assert adapter.calls == []


def test_a_repeated_next_link_raises_instead_of_looping(make_client: Any) -> None:
    page = {"value": [{"name": "a"}], "@odata.nextLink": f"{API}/accounts?$skiptoken=x"}
    client, _, _ = make_client(lambda request: (200, {}, page))
    with pytest.raises(PagingLoopError):
        list(client.iter_rows("accounts", ["name"]))


def test_429_waits_retry_after_and_halves_concurrency(make_client: Any) -> None:
    client, _, sleeps = make_client(
        _replies(
            (429, {"Retry-After": "3"}, {"error": {"code": "0x80072322", "message": "limit"}}),
            (200, {}, {"UserId": "u"}),
        ),
        max_concurrency=8,
    )
    assert client.whoami() == {"UserId": "u"}
    assert sleeps == [pytest.approx(3.0, abs=0.05)]
    assert client.limiter.limit == 4
    snap = client.counters.snapshot()
    assert (snap["throttles"], snap["retries"], snap["requests"], snap["wait_seconds"]) == (1, 1, 2, 3.0)


def test_5xx_and_connection_errors_back_off_then_succeed(make_client: Any) -> None:
    replies: list[Any] = [requests.ConnectionError("reset"), (503, {}, None), (200, {}, {"UserId": "u"})]

    def handler(request: requests.PreparedRequest) -> Reply:
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    client, _, sleeps = make_client(handler)
    client.whoami()
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1 and 1 <= sleeps[1] <= 2


def test_retries_stop_at_the_attempt_budget(make_client: Any) -> None:
    client, adapter, sleeps = make_client(lambda request: (503, {}, None))
    with pytest.raises(DynamicsApiError) as info:
        client.whoami()
    assert info.value.status == 503 and len(adapter.calls) == 4 and len(sleeps) == 3


def test_other_4xx_is_reported_once_with_code_and_no_query(make_client: Any) -> None:
    error = {"error": {"code": "0x80060888", "message": "Could not find a property named 'nme'."}}
    client, adapter, sleeps = make_client(lambda request: (400, {}, error))
    with pytest.raises(DynamicsApiError) as info:
        list(client.iter_rows("accounts", ["nme"], filter="emailaddress1 eq 'pii@example.com'"))
    exc = info.value
    assert (exc.status, exc.code, exc.method) == (400, "0x80060888", "GET")
    assert "pii@example.com" not in str(exc) and "0x80060888" in str(exc)
    assert len(adapter.calls) == 1 and sleeps == []


def test_401_refreshes_the_token_once(make_client: Any) -> None:
    client, adapter, _ = make_client(_replies((401, {}, None), (200, {}, {"UserId": "u"})))
    client.whoami()
    assert [c.headers["Authorization"] for c in adapter.calls] == ["Bearer tok0", "Bearer tok1"]
    assert client.transport.tokens.invalidated == 1  # type: ignore[attr-defined]


def test_a_second_401_is_an_auth_error(make_client: Any) -> None:
    client, adapter, _ = make_client(lambda request: (401, {}, None))
    with pytest.raises(DynamicsAuthError, match="401 even with a fresh token"):
        client.whoami()
    assert len(adapter.calls) == 2


def test_change_feed_yields_upserts_then_deletes_and_the_next_token(make_client: Any) -> None:
    deleted = {"@odata.context": f"{API}/$metadata#accounts/$deletedEntity", "id": "g2", "reason": "deleted"}
    client, adapter, _ = make_client(
        _replies(
            (
                200,
                {},
                {"value": [{"accountid": "g1", "name": "a"}], "@odata.nextLink": f"{API}/accounts?p=2"},
            ),
            (200, {}, {"value": [deleted], "@odata.deltaLink": f"{API}/accounts?$deltatoken=12%2101%2f02"}),
        )
    )
    feed = client.iter_changes("accounts", ["name"], delta_token="11!01/01", id_attribute="accountid")
    with pytest.raises(Exception, match="fully consumed"):
        _ = feed.delta_token
    changes = list(feed)
    assert [(c.kind, c.id) for c in changes] == [("upsert", "g1"), ("delete", "g2")]
    assert feed.delta_token == "12!01/02" and not feed.full_resync
    assert adapter.calls[0].url.endswith("$deltatoken=11%2101%2F01")  # type: ignore[union-attr]
    assert "odata.track-changes" in adapter.calls[0].headers["Prefer"]


def test_expired_delta_token_falls_back_to_a_full_read(make_client: Any) -> None:
    expired = {
        "error": {
            "code": "0x80044352",
            "message": "Version stamp associated with the client has expired. Please perform a full sync.",
        }
    }
    client, adapter, _ = make_client(
        _replies(
            (400, {}, expired),
            (200, {}, {"value": [{"name": "a"}], "@odata.deltaLink": f"{API}/accounts?$deltatoken=99"}),
        )
    )
    feed = client.iter_changes("accounts", ["name"], delta_token="1")
    assert [c.row["name"] for c in feed] == ["a"]
    assert feed.full_resync and feed.delta_token == "99"
    assert "deltatoken" not in (adapter.calls[1].url or "")


def _batch_reply(statuses: list[int], error_code: str = "0x80044331") -> Reply:
    parts = [
        mp.BatchPart(
            status=s,
            headers={"Content-Type": "application/json"},
            body=json.dumps({"error": {"code": error_code, "message": f"bad {i}"}}).encode()
            if s >= 400
            else b"",
        )
        for i, s in enumerate(statuses)
    ]
    content_type, body = mp.build_batch_response(parts)
    return 200, {"Content-Type": content_type}, body


def test_upsert_fast_path_reports_upserted_in_input_order(make_client: Any) -> None:
    client, adapter, _ = make_client(lambda request: (204, {}, None), batch_size=2)
    records = [{"accountnumber": f"A{i}", "name": f"n{i}"} for i in range(5)]
    outcomes = client.upsert_many("accounts", "accountnumber", records, logical_name="account")
    assert [(o.index, o.key["accountnumber"], o.status) for o in outcomes] == [
        (i, f"A{i}", "upserted") for i in range(5)
    ]
    bodies = [json.loads(c.body) for c in adapter.calls]  # type: ignore[arg-type]
    assert sorted(len(b["Targets"]) for b in bodies) == [1, 2, 2]
    target = next(t for b in bodies for t in b["Targets"] if t["name"] == "n0")
    assert target == {
        "@odata.type": "Microsoft.Dynamics.CRM.account",
        "@odata.id": "accounts(accountnumber='A0')",
        "name": "n0",
    }
    assert client.counters.operations == 5


def test_failed_upsert_multiple_is_isolated_through_a_continue_on_error_batch(make_client: Any) -> None:
    def handler(request: requests.PreparedRequest) -> Reply:
        if "UpsertMultiple" in (request.url or ""):
            return 400, {}, {"error": {"code": "0x80044331", "message": "too long"}}
        return _batch_reply([201, 400, 200, 204])

    client, adapter, _ = make_client(handler)
    records = [{"accountnumber": f"O'B{i}", "name": "x"} for i in range(4)] + [{"name": "no key"}]
    outcomes = client.upsert_many("accounts", ["accountnumber"], records, logical_name="account")
    assert [o.status for o in outcomes] == ["created", "failed", "updated", "upserted", "failed"]
    assert (outcomes[1].code, outcomes[1].http_status, outcomes[1].key) == (
        "0x80044331",
        400,
        {"accountnumber": "O'B1"},
    )
    assert "accountnumber" in outcomes[4].message
    batch = adapter.calls[1]
    assert batch.url == f"{API}/$batch" and batch.headers["Prefer"] == "odata.continue-on-error"
    parts = mp.parse_batch_request(batch.headers["Content-Type"], batch.body)  # type: ignore[arg-type]
    first = parts[0]
    assert isinstance(first, mp.BatchPart) and first.method == "PATCH"
    assert first.url == "/api/data/v9.2/accounts(accountnumber='O''B0')?$select=accountnumber"
    assert json.loads(first.body) == {"name": "x"}


def test_throttled_batch_parts_are_resent(make_client: Any) -> None:
    client, _, sleeps = make_client(_replies(_batch_reply([201, 429, 503]), _batch_reply([200, 201])))
    records = [{"accountnumber": f"A{i}"} for i in range(3)]
    outcomes = client.upsert_many(
        "accounts", "accountnumber", records, logical_name="account", strategy="batch"
    )
    assert [o.status for o in outcomes] == ["created", "updated", "created"]
    assert len(sleeps) == 1 and client.counters.throttles == 1 and client.counters.operations == 5


def test_update_if_match_raises_concurrency_conflict_on_412(make_client: Any) -> None:
    error = {"error": {"code": "0x80060882", "message": "The version of the existing record doesn't match"}}
    client, adapter, _ = make_client(lambda request: (412, {}, error))
    with pytest.raises(ConcurrencyConflict) as info:
        client.update_if_match("accounts", {"accountnumber": "A1"}, {"name": "n"}, 'W/"41"')
    assert info.value.code == "0x80060882"
    assert adapter.calls[0].headers["If-Match"] == 'W/"41"'


def test_deactivate_never_creates_and_delete_is_idempotent(make_client: Any) -> None:
    client, adapter, _ = make_client(_replies((204, {}, None), (404, {}, None)))
    client.deactivate("accounts", {"accountnumber": "A1"})
    assert adapter.calls[0].headers["If-Match"] == "*"
    assert json.loads(adapter.calls[0].body) == {"statecode": 1, "statuscode": 2}  # type: ignore[arg-type]
    assert client.delete("accounts", "6f9619ff-8b86-d011-b42d-00c04fc964ff") is False


def test_a_configured_ca_bundle_beats_requests_environment_variables(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    client, adapter, _ = make_client(lambda request: (200, {}, {"UserId": "u"}), verify="/private/ca.pem")
    client.whoami()
    assert adapter.verify == "/private/ca.pem"


def test_a_chunk_that_keeps_failing_reports_its_rows_and_spares_the_others(make_client: Any) -> None:
    def handler(request: requests.PreparedRequest) -> Reply:
        return (503, {}, None) if b"A0" in (request.body or b"") else (204, {}, None)

    client, _, _ = make_client(handler, batch_size=2, max_concurrency=1)
    records = [{"accountnumber": f"A{i}", "name": "n"} for i in range(4)]
    outcomes = client.upsert_many("accounts", "accountnumber", records, logical_name="account")
    assert [(o.status, o.http_status) for o in outcomes] == [
        ("failed", 503),
        ("failed", 503),
        ("upserted", 204),
        ("upserted", 204),
    ]


def test_an_unreachable_authority_is_retried_like_the_api(make_client: Any) -> None:
    client, _, sleeps = make_client(lambda request: (200, {}, {"UserId": "u"}))
    tokens = client.transport.tokens
    failures = [requests.ConnectionError("authority down")]

    def flaky_token() -> str:
        if failures:
            raise failures.pop()
        return "tok"

    tokens.token = flaky_token  # type: ignore[method-assign]
    assert client.whoami() == {"UserId": "u"} and len(sleeps) == 1
