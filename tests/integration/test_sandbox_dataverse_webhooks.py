"""Webhooks in the Dataverse sandbox, registered and received as against a real environment.

One sandbox serves the module; a small ``http.server`` receiver on loopback records what the
sandbox POSTs.  Registrations go through plain Web API calls (``sdkmessages``,
``sdkmessagefilters``, ``serviceendpoints``, ``sdkmessageprocessingsteps``) or through the
product's :func:`~d365sync.dynamics.webhooks.register_webhook`.  Deliveries are awaited by polling
with a deadline; absence is asserted on the sandbox's delivery log, which a write fills in the
same transaction as the row (so it is complete when the write's answer arrives).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from d365sync.dynamics.multipart import BatchPart, Changeset, build_batch_request, parse_batch_response
from d365sync.dynamics.webhooks import TableEvents, register_webhook, unregister_webhook, webhook_steps
from d365sync.sandbox.dataverse.config import SandboxConfig
from d365sync.sandbox.dataverse.delivery import SIZE_LIMIT, http_request
from d365sync.sandbox.dataverse.process import DataverseSandbox
from d365sync.sandbox.dataverse.webhooks import Delivery
from tests.sandbox_fixtures import SandboxFactory

XRM = "http://schemas.microsoft.com/xrm/2011/Contracts"
DEADLINE = 20.0


# -- the receiver -------------------------------------------------------------------------------
@dataclass
class Received:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def record_id(self) -> str:
        return self.body["PrimaryEntityId"]

    @property
    def message(self) -> str:
        return self.body["MessageName"]


class Receiver:
    """Records every POST; can answer the next N with an error, or hold answers until released."""

    def __init__(self, port: int = 0) -> None:
        self.received: list[Received] = []
        self.fail_next = 0
        self.fail_status = 503
        self.open = threading.Event()
        self.open.set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the sandbox's senders use it

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.open.wait(DEADLINE)
                status = receiver._answer(self, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bytes) -> int:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return self.fail_status
            split = urlsplit(handler.path)
            headers = {k.lower(): v for k, v in handler.headers.items()}
            self.received.append(
                Received(split.path, dict(parse_qsl(split.query)), headers, json.loads(body))
            )
            return 200

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def wait(self, path: str, count: int) -> list[Received]:
        """The first ``count`` notifications to ``path``, once they are all in."""
        found = wait_until(
            lambda: len(self.at(path)) >= count and self.at(path), f"{count} deliveries to {path}"
        )
        return found[:count]

    def close(self) -> None:
        self.open.set()
        self.server.shutdown()
        self.server.server_close()


def wait_until(probe: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandbox(dataverse_sandbox_factory: SandboxFactory) -> Iterator[DataverseSandbox]:
    box = dataverse_sandbox_factory(knobs={"webhook_backoff_ms": 20, "webhook_max_attempts": 1000})
    yield box
    box.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


class Api:
    """Plain Web API calls, as any Dataverse client makes them; deletes its registrations after
    the test."""

    def __init__(self, sandbox: DataverseSandbox) -> None:
        self.sandbox = sandbox
        self.endpoints: list[str] = []

    def call(self, method: str, path: str, body: Any = None, **headers: str) -> requests.Response:
        merged = self.sandbox.headers(**{"Content-Type": "application/json", **headers})
        return requests.request(
            method, f"{self.sandbox.api_url}/{path}", json=body, headers=merged, timeout=30
        )

    def ok(self, method: str, path: str, body: Any = None, **headers: str) -> requests.Response:
        response = self.call(method, path, body, **headers)
        assert response.status_code < 300, response.text
        return response

    def rows(self, path: str) -> list[dict[str, Any]]:
        return self.ok("GET", path).json()["value"]

    def create(self, entity_set: str, body: dict[str, Any], query: str = "") -> str:
        response = self.ok("POST", f"{entity_set}{query}", body)
        return response.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")

    def message_id(self, name: str) -> str:
        (row,) = self.rows(f"sdkmessages?$filter=name eq '{name}'&$select=sdkmessageid")
        return row["sdkmessageid"]

    def filter_id(self, table: str, message_id: str) -> str:
        query = f"primaryobjecttypecode eq '{table}' and _sdkmessageid_value eq {message_id}"
        (row,) = self.rows(f"sdkmessagefilters?$filter={query}&$select=sdkmessagefilterid")
        return row["sdkmessagefilterid"]

    def endpoint(self, url: str, *, authtype: int = 4, authvalue: str = "k3y") -> str:
        body = {"name": f"hook {uuid.uuid4()}", "contract": 8, "url": url, "authtype": authtype}
        endpoint_id = self.create("serviceendpoints", body | {"authvalue": authvalue, "messageformat": 2})
        self.endpoints.append(endpoint_id)
        return endpoint_id

    def step(
        self, endpoint_id: str, message: str, table: str = "account", attributes: str | None = None
    ) -> str:
        message_id = self.message_id(message)
        return self.create(
            "sdkmessageprocessingsteps",
            {
                "name": f"{message} of {table}",
                "mode": 1,
                "stage": 40,
                "rank": 1,
                "asyncautodelete": True,
                "filteringattributes": attributes,
                "sdkmessageid@odata.bind": f"/sdkmessages({message_id})",
                "sdkmessagefilterid@odata.bind": f"/sdkmessagefilters({self.filter_id(table, message_id)})",
                "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({endpoint_id})",
            },
        )

    def webhook(
        self, url: str, messages: tuple[str, ...] = ("Create", "Update", "Delete"), **kw: Any
    ) -> dict[str, str]:
        endpoint_id = self.endpoint(url, **kw)
        return {m: self.step(endpoint_id, m) for m in messages}

    def cleanup(self) -> None:
        for endpoint_id in self.endpoints:
            for step in self.rows(f"sdkmessageprocessingsteps?$filter=_eventhandler_value eq {endpoint_id}"):
                self.call("DELETE", f"sdkmessageprocessingsteps({step['sdkmessageprocessingstepid']})")
            self.call("DELETE", f"serviceendpoints({endpoint_id})")


@pytest.fixture
def api(sandbox: DataverseSandbox) -> Iterator[Api]:
    client = Api(sandbox)
    yield client
    client.cleanup()


def logged(sandbox: DataverseSandbox, record_id: str) -> list[dict[str, Any]]:
    return [d for d in sandbox.webhooks(limit=1000)["deliveries"] if d["record_id"] == record_id]


def attributes(target: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: a["value"] for a in target["Attributes"]}


def target_of(received: Received) -> dict[str, Any]:
    (parameter,) = received.body["InputParameters"]
    assert parameter["key"] == "Target"
    return parameter["value"]


# -- registration ---------------------------------------------------------------------------------
def test_messages_and_filters_are_found_as_in_dataverse(api: Api) -> None:
    update = api.message_id("Update")
    assert {r["name"] for r in api.rows("sdkmessages?$select=name")} >= {"Create", "Update", "Delete"}
    query = f"primaryobjecttypecode eq 'salesorder' and _sdkmessageid_value eq {update}"
    (row,) = api.rows(f"sdkmessagefilters?$filter={query}&$select=sdkmessagefilterid,secondaryobjecttypecode")
    assert row["secondaryobjecttypecode"] == "none"
    assert api.rows("sdkmessagefilters?$filter=primaryobjecttypecode eq 'serviceendpoint'") == []
    refused = api.call("POST", "sdkmessages", {"name": "Merge"})
    assert refused.status_code == 400


def test_authvalue_is_write_only(api: Api, receiver: Receiver) -> None:
    endpoint_id = api.endpoint(receiver.url(), authvalue="top-secret")
    row = api.ok("GET", f"serviceendpoints({endpoint_id})").json()
    assert "authvalue" not in row and row["url"] == receiver.url() and row["contract"] == 8
    assert "top-secret" not in json.dumps(api.rows("serviceendpoints"))
    assert api.call("GET", f"serviceendpoints({endpoint_id})?$select=authvalue").status_code == 400
    assert api.call("GET", "serviceendpoints?$filter=authvalue eq 'top-secret'").status_code == 400
    assert api.call("GET", f"serviceendpoints({endpoint_id})/authvalue").status_code == 404
    attribute = api.ok(
        "GET", "EntityDefinitions(LogicalName='serviceendpoint')/Attributes(LogicalName='authvalue')"
    )
    assert attribute.json()["IsValidForRead"] is False
    api.ok("PATCH", f"serviceendpoints({endpoint_id})", {"authvalue": "rotated"})  # still writable


@pytest.mark.parametrize(
    ("body", "wording"),
    [
        ({"mode": 0, "stage": 40}, "asynchronously only"),
        ({"mode": 1, "stage": 20}, "PostOperation stage (40)"),
        ({"mode": 1, "stage": 40, "filteringattributes": "name,nosuchcolumn"}, "'nosuchcolumn'"),
    ],
)
def test_steps_the_sandbox_cannot_run_are_refused(
    api: Api, receiver: Receiver, body: dict[str, Any], wording: str
) -> None:
    endpoint_id = api.endpoint(receiver.url())
    update = api.message_id("Update")
    response = api.call(
        "POST",
        "sdkmessageprocessingsteps",
        {
            "name": "refused",
            **body,
            "sdkmessageid@odata.bind": f"/sdkmessages({update})",
            "sdkmessagefilterid@odata.bind": f"/sdkmessagefilters({api.filter_id('account', update)})",
            "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({endpoint_id})",
        },
    )
    assert response.status_code == 400 and wording in response.json()["error"]["message"]
    assert api.rows("sdkmessageprocessingsteps?$filter=name eq 'refused'") == []


@pytest.mark.parametrize(
    "body",
    [
        {"contract": 1, "url": "http://127.0.0.1/x", "authtype": 4, "authvalue": "k"},  # a queue
        {"contract": 8, "url": "not a url", "authtype": 4, "authvalue": "k"},
        {"contract": 8, "url": "http://127.0.0.1/x", "authtype": 5, "authvalue": "x-api-key: k"},
    ],
)
def test_endpoints_the_sandbox_cannot_call_are_refused(api: Api, body: dict[str, Any]) -> None:
    response = api.call("POST", "serviceendpoints", {"name": "refused", **body})
    assert response.status_code == 400, response.text


# -- delivery -------------------------------------------------------------------------------------
def test_create_update_delete_are_each_delivered_once(
    api: Api, receiver: Receiver, sandbox: DataverseSandbox
) -> None:
    steps = api.webhook(receiver.url("/crud"), authvalue="k3y")
    who = api.ok("GET", "WhoAmI").json()
    record = api.create(
        "accounts", {"name": "Hook Ltd", "accountnumber": "WH-1", "creditlimit": 10}, "?tag=erp-sync"
    )
    api.ok("PATCH", f"accounts({record})", {"telephone1": "555", "paymenttermscode": 2})
    api.ok("DELETE", f"accounts({record})")

    created, updated, deleted = receiver.wait("/crud", 3)
    assert [r.message for r in (created, updated, deleted)] == ["Create", "Update", "Delete"]
    for got, message in zip((created, updated, deleted), ("Create", "Update", "Delete"), strict=True):
        assert got.query == {"code": "k3y"}
        assert got.headers["content-type"] == "application/json"
        assert got.headers["x-ms-dynamics-entity-name"] == "account"
        assert got.headers["x-ms-dynamics-request-name"] == message
        assert got.headers["x-ms-dynamics-organization"] == "127.0.0.1"
        assert got.headers["x-ms-correlation-request-id"] == got.body["CorrelationId"]
        assert "x-ms-dynamics-msg-size-exceeded" not in got.headers
        body = got.body
        assert (body["PrimaryEntityName"], body["PrimaryEntityId"]) == ("account", record)
        assert (body["Stage"], body["Mode"], body["Depth"]) == (40, 1, 1)
        assert body["UserId"] == body["InitiatingUserId"] == who["UserId"]
        assert (body["BusinessUnitId"], body["OrganizationId"]) == (
            who["BusinessUnitId"],
            who["OrganizationId"],
        )
        assert body["OwningExtension"]["Id"] == steps[message]
        assert body["OperationCreatedOn"].startswith("/Date(") and body["OperationCreatedOn"].endswith(")/")
        assert (
            body["PreEntityImages"] == [] and body["PostEntityImages"] == [] and body["ParentContext"] is None
        )
    assert len({r.body["OperationId"] for r in (created, updated, deleted)}) == 3

    target = target_of(created)
    assert target["__type"] == f"Entity:{XRM}" and (target["Id"], target["LogicalName"]) == (
        record,
        "account",
    )
    values = attributes(target)
    assert values["name"] == "Hook Ltd" and values["accountid"] == record
    assert values["creditlimit"] == {"__type": f"Money:{XRM}", "Value": 10}
    assert values["ownerid"]["LogicalName"] == "systemuser" and values["ownerid"]["Id"] == who["UserId"]
    assert created.body["OutputParameters"] == [{"key": "id", "value": record}]
    assert {"key": "tag", "value": "erp-sync"} in created.body["SharedVariables"]

    values = attributes(target_of(updated))
    assert values["telephone1"] == "555"
    assert values["paymenttermscode"] == {"__type": f"OptionSetValue:{XRM}", "Value": 2}
    assert values["modifiedon"].startswith("/Date(") and "name" not in values

    assert target_of(deleted) == {
        "__type": f"EntityReference:{XRM}",
        "Id": record,
        "KeyAttributes": [],
        "LogicalName": "account",
        "Name": None,
        "RowVersion": None,
    }
    assert [d["status"] for d in logged(sandbox, record)] == ["delivered"] * 3


def test_update_steps_fire_only_for_their_filtering_attributes(
    api: Api, receiver: Receiver, sandbox: DataverseSandbox
) -> None:
    endpoint_id = api.endpoint(receiver.url("/filtered"))
    api.step(endpoint_id, "Update", attributes="telephone1,emailaddress1")
    record = api.create("accounts", {"name": "Filtered"})
    api.ok("PATCH", f"accounts({record})", {"name": "Renamed", "description": "no listened column"})
    assert logged(sandbox, record) == []  # queued in the write's transaction, or not at all
    api.ok("PATCH", f"accounts({record})", {"telephone1": "1"})
    api.ok("PATCH", f"accounts({record})", {"telephone1": "1"})  # set again, unchanged: still fires
    first, _ = receiver.wait("/filtered", 2)
    assert attributes(target_of(first))["telephone1"] == "1"
    assert len(logged(sandbox, record)) == 2


def test_bulk_actions_and_batches_deliver_each_operation(api: Api, receiver: Receiver) -> None:
    api.webhook(receiver.url("/bulk"), messages=("Create", "Update"))
    answer = api.ok(
        "POST",
        "accounts/Microsoft.Dynamics.CRM.CreateMultiple",
        {"Targets": [{"name": f"Bulk {i}"} for i in range(3)]},
    )
    ids = answer.json()["Ids"]
    api.ok(
        "POST",
        "accounts/Microsoft.Dynamics.CRM.UpdateMultiple",
        {"Targets": [{"accountid": i, "telephone1": "2"} for i in ids]},
    )
    got = receiver.wait("/bulk", 6)
    assert sorted((r.record_id, r.message) for r in got) == sorted(
        [(i, "Create") for i in ids] + [(i, "Update") for i in ids]
    )
    assert len({r.body["CorrelationId"] for r in got if r.message == "Create"}) == 1  # one request

    in_batch = str(uuid.uuid4())
    changeset = Changeset(
        [
            part("PATCH", f"accounts({in_batch})", {"name": "B1"}, "1"),
            part("PATCH", "$1", {"telephone1": "3"}, "2"),
        ]
    )
    single = part("PATCH", f"accounts({ids[0]})", {"name": "B2"})
    post_batch(api, [changeset, single])
    batch = receiver.wait("/bulk", 9)[6:]
    assert sorted((r.record_id, r.message) for r in batch) == sorted(
        [(in_batch, "Create"), (in_batch, "Update"), (ids[0], "Update")]
    )
    assert [r.message for r in batch if r.record_id == in_batch] == [
        "Create",
        "Update",
    ]  # one record, in order


def part(method: str, url: str, body: dict[str, Any], content_id: str | None = None) -> BatchPart:
    headers = {"Content-Type": "application/json"}
    return BatchPart(
        method=method, url=url, headers=headers, body=json.dumps(body).encode(), content_id=content_id
    )


def post_batch(api: Api, items: list[Any]) -> list[BatchPart]:
    content_type, body = build_batch_request(items)
    headers = api.sandbox.headers(**{"Content-Type": content_type})
    response = requests.post(f"{api.sandbox.api_url}/$batch", data=body, headers=headers, timeout=30)
    return parse_batch_response(response.headers["Content-Type"], response.content)


def test_a_rolled_back_changeset_delivers_nothing(
    api: Api, receiver: Receiver, sandbox: DataverseSandbox
) -> None:
    api.webhook(receiver.url("/rollback"), messages=("Create",))
    lost = str(uuid.uuid4())
    changeset = Changeset(
        [
            part("PATCH", f"accounts({lost})", {"name": "Lost"}, "1"),
            part("POST", "accounts", {"name": "x" * 200}),
        ]
    )
    parts = post_batch(api, [changeset])
    assert [p.status for p in parts] == [400]
    assert logged(sandbox, lost) == []
    kept = api.create("accounts", {"name": "Kept"})
    (got,) = receiver.wait("/rollback", 1)
    assert got.record_id == kept


def test_failed_deliveries_are_retried_until_the_receiver_answers(
    api: Api, receiver: Receiver, sandbox: DataverseSandbox
) -> None:
    api.webhook(receiver.url("/retry"), messages=("Create",))
    before = sandbox.counters()
    receiver.fail_next = 2  # the receiver answers 503 twice
    record = api.create("accounts", {"name": "Retry 503"})
    (got,) = receiver.wait("/retry", 1)
    assert got.record_id == record
    (entry,) = logged(sandbox, record)
    assert (entry["status"], entry["attempts"], entry["last_status"]) == ("delivered", 3, 200)
    assert entry["last_error"].startswith("HTTP 503")

    sandbox.set_knobs(webhook_fail_next=2, webhook_fail_status=0)  # connection errors, simulated
    other = api.create("accounts", {"name": "Retry connection"})
    wait_until(
        lambda: [e for e in logged(sandbox, other) if e["status"] == "delivered"], "the retried delivery"
    )
    (entry,) = logged(sandbox, other)
    assert entry["attempts"] == 3 and "simulated connection error" in entry["last_error"]
    after = sandbox.counters()
    assert after["webhook_failed_attempts"] - before["webhook_failed_attempts"] == 4
    assert after["webhook_delivered"] - before["webhook_delivered"] == 2
    assert [r.record_id for r in receiver.at("/retry")] == [record, other]


def test_pending_deliveries_survive_a_restart(api: Api, sandbox: DataverseSandbox) -> None:
    port = free_port()  # nobody listens: connection refused
    api.webhook(f"http://127.0.0.1:{port}/later", messages=("Create",))
    record = api.create("accounts", {"name": "Survivor"})
    wait_until(lambda: [e for e in logged(sandbox, record) if e["attempts"] >= 2], "two failed attempts")
    (entry,) = logged(sandbox, record)
    assert entry["status"] == "pending" and "ConnectionError" in entry["last_error"]
    assert "k3y" not in entry["last_error"]  # the WebhookKey travels in the URL requests quotes
    assert sandbox.counters()["webhook_pending"] >= 1
    sandbox.restart()
    late = Receiver(port)
    try:
        (got,) = late.wait("/later", 1)
        assert got.record_id == record
        wait_until(lambda: logged(sandbox, record)[0]["status"] == "delivered", "the log to say delivered")
        assert len(late.at("/later")) == 1
    finally:
        late.close()


def test_disabled_or_deleted_steps_stop_deliveries(
    api: Api, receiver: Receiver, sandbox: DataverseSandbox
) -> None:
    steps = api.webhook(receiver.url("/switch"), messages=("Create",))
    step = f"sdkmessageprocessingsteps({steps['Create']})"
    api.ok("PATCH", step, {"statecode": 1, "statuscode": 2})
    quiet = api.create("accounts", {"name": "While disabled"})
    assert logged(sandbox, quiet) == []
    api.ok("PATCH", step, {"statecode": 0, "statuscode": 1})
    loud = api.create("accounts", {"name": "Enabled again"})
    (got,) = receiver.wait("/switch", 1)
    assert got.record_id == loud
    api.ok("DELETE", step)
    gone = api.create("accounts", {"name": "After delete"})
    assert logged(sandbox, gone) == []


def test_deleting_the_endpoint_cancels_what_is_pending(api: Api, sandbox: DataverseSandbox) -> None:
    endpoint_id = api.endpoint(f"http://127.0.0.1:{free_port()}/nobody")
    api.step(endpoint_id, "Create")
    record = api.create("accounts", {"name": "Never delivered"})
    wait_until(lambda: [e for e in logged(sandbox, record) if e["attempts"] >= 1], "a failed attempt")
    api.ok("DELETE", f"serviceendpoints({endpoint_id})")
    wait_until(lambda: logged(sandbox, record)[0]["status"] == "cancelled", "the delivery to be cancelled")
    assert "deleted" in logged(sandbox, record)[0]["last_error"]


@pytest.mark.parametrize(
    ("authtype", "authvalue", "where"),
    [
        (5, '<settings><setting name="x-api-key" value="h-secret" /></settings>', "headers"),
        (
            6,
            '<settings><setting name="key" value="q-secret" /><setting name="v" value="2" /></settings>',
            "query",
        ),
    ],
)
def test_header_and_query_string_authentication(
    api: Api, receiver: Receiver, authtype: int, authvalue: str, where: str
) -> None:
    path = f"/auth{authtype}"
    api.webhook(receiver.url(path), messages=("Create",), authtype=authtype, authvalue=authvalue)
    api.create("accounts", {"name": "Authenticated"})
    (got,) = receiver.wait(path, 1)
    if where == "headers":
        assert got.headers["x-api-key"] == "h-secret" and got.query == {}
    else:
        assert got.query == {"key": "q-secret", "v": "2"}


def test_a_burst_of_edits_does_not_wait_for_the_receiver(api: Api, receiver: Receiver) -> None:
    api.webhook(receiver.url("/burst"), messages=("Create", "Update"))
    receiver.open.clear()  # the receiver holds every answer
    try:
        created = api.ok(
            "POST",
            "accounts/Microsoft.Dynamics.CRM.CreateMultiple",
            {"Targets": [{"name": f"Burst {i}"} for i in range(500)]},
        )
        ids = created.json()["Ids"]
        updated = api.call(
            "POST",
            "accounts/Microsoft.Dynamics.CRM.UpdateMultiple",
            {"Targets": [{"accountid": i, "telephone1": "9"} for i in ids]},
        )
        assert updated.status_code == 204  # answered while every delivery is still waiting
    finally:
        receiver.open.set()
    got = receiver.wait("/burst", 1000)
    order: dict[str, list[str]] = {}
    for item in got:
        order.setdefault(item.record_id, []).append(item.message)
    assert set(order) == set(ids) and all(messages == ["Create", "Update"] for messages in order.values())


def test_an_oversized_context_loses_its_inputs_and_says_so(tmp_path: Path) -> None:
    values = {"name": "Big", "description": "x" * (SIZE_LIMIT + 1)}
    event = {"user_id": "u", "user_object_id": "o", "correlation_id": "c", "request_id": "r", "tag": None}
    event_json = json.dumps(event | {"values": values})
    delivery = Delivery(1, "op", "step", "end", "Update", "account", "id", "k", event_json, 0, 0)
    endpoint = {"url": "http://127.0.0.1/x", "authtype": 4, "authvalue": "k"}
    request = http_request(delivery, endpoint, SandboxConfig(data_dir=tmp_path))  # type: ignore[arg-type]
    assert request.headers["x-ms-dynamics-msg-size-exceeded"] == "true"
    body = json.loads(request.body)
    assert (
        body["InputParameters"] == [] and body["MessageName"] == "Update" and len(request.body) < SIZE_LIMIT
    )


# -- the product's registration helper ------------------------------------------------------------
def test_register_webhook_is_idempotent_and_delivers(receiver: Receiver, sandbox: DataverseSandbox) -> None:
    tables = [
        TableEvents("account", ("Create", "Update", "Delete"), ("name", "telephone1")),
        ("contact", ["Create"], []),
    ]
    with sandbox.client() as client:
        first = register_webhook(
            client, name="product-hook", url=receiver.url("/product"), key="p-key", tables=tables
        )
        second = register_webhook(
            client, name="product-hook", url=receiver.url("/product"), key="p-key", tables=tables
        )
        try:
            assert first.endpoint_created and len(first.created) == 4
            assert not second.endpoint_created and second.endpoint_id == first.endpoint_id
            assert (second.created, second.updated, second.deleted) == ([], [], [])
            assert sorted(second.unchanged) == sorted(first.created)
            steps = webhook_steps(client, "product-hook")
            assert all(len(rows) == 1 for rows in steps.values()) and len(steps) == 4
            assert steps["product-hook: Update of account"][0]["filteringattributes"] == "name,telephone1"
            endpoints = list(client.iter_rows("serviceendpoints", ["name"], filter="name eq 'product-hook'"))
            assert len(endpoints) == 1

            record = client.create("accounts", {"name": "Via product"})
            client.update("accounts", record, {"description": "not listened to"})
            client.update("accounts", record, {"telephone1": "7"})
            created, updated = receiver.wait("/product", 2)
            assert (created.message, updated.message) == ("Create", "Update")
            # HttpHeader authentication: the key in the receiver's header, never in the URL
            assert created.headers["x-d365sync-webhook-key"] == "p-key" and created.query == {}
            assert updated.record_id == record

            narrower = register_webhook(
                client,
                name="product-hook",
                url=receiver.url("/product"),
                key="p-key",
                tables={"account": ["name"]},
            )
            assert narrower.deleted == ["product-hook: Create of contact"]
            assert narrower.updated == ["product-hook: Update of account"]
        finally:
            removed = unregister_webhook(client, "product-hook")
        assert len(removed) == 3
        assert webhook_steps(client, "product-hook") == {}
        assert unregister_webhook(client, "product-hook") == []


def test_the_events_command_registers_from_the_entity_specs(
    receiver: Receiver,
    sandbox: DataverseSandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from d365sync.cli import main

    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(sandbox.airflow_connection()))
    monkeypatch.delenv("D365SYNC_WEBHOOK_KEY", raising=False)
    monkeypatch.setenv("AIRFLOW_VAR_D365SYNC_WEBHOOK_KEY", "cli-secret-key")
    url = receiver.url("/cli")
    try:
        assert (
            main(["events", "register", "--name", "cli-hook", "--url", url, "--entities", "customers,orders"])
            == 0
        )
        printed = capsys.readouterr().out
        assert "cli-secret-key" not in printed
        summary = json.loads(printed)
        assert sorted(summary["tables"]) == ["account", "salesorder"]
        assert len(summary["steps"]["created"]) == 6
        assert "new_shipstatus" in summary["tables"]["salesorder"]["filtering_attributes"]
        assert (
            main(["events", "register", "--name", "cli-hook", "--url", url, "--entities", "customers,orders"])
            == 0
        )
        assert len(json.loads(capsys.readouterr().out)["steps"]["unchanged"]) == 6
        with sandbox.client() as client:
            client.create("accounts", {"name": "Via the CLI"})
        (got,) = receiver.wait("/cli", 1)
        assert got.headers["x-d365sync-webhook-key"] == "cli-secret-key" and got.query == {}
    finally:
        assert main(["events", "unregister", "--name", "cli-hook"]) == 0
    assert len(json.loads(capsys.readouterr().out)["deleted_steps"]) == 6


def test_the_delay_knob_holds_deliveries_back(api: Api, sandbox: DataverseSandbox) -> None:
    api.webhook(f"http://127.0.0.1:{free_port()}/delayed", messages=("Create",))
    sandbox.set_knobs(webhook_delay_ms=600_000)
    try:
        record = api.create("accounts", {"name": "Delayed"})
    finally:
        sandbox.set_knobs(webhook_delay_ms=0)
    (entry,) = logged(sandbox, record)
    assert (entry["status"], entry["attempts"]) == ("pending", 0)
    created, due = (datetime.fromisoformat(entry[k]) for k in ("created_on", "next_attempt_on"))
    assert due - created == timedelta(minutes=10)


def test_the_dry_run_merges_entities_on_one_table(capsys: pytest.CaptureFixture[str]) -> None:
    from d365sync.cli import main

    every = "customers,orders,invoices,products,inventory"
    url = "https://ops.example.com/hook?code=secret"
    assert main(["events", "register", "--url", url, "--entities", every, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["url"] == "https://ops.example.com/hook"  # the query, which may hold a key, is not shown
    assert sorted(plan["tables"]) == ["account", "invoice", "product", "salesorder"]
    product = plan["tables"]["product"]["filtering_attributes"]  # products and inventory both map product
    assert {"price", "quantityonhand", "statecode"} <= set(product) and len(product) == len(set(product))
