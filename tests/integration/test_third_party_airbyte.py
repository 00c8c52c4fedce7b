"""Airbyte's ``source-microsoft-dataverse`` connector, unmodified, against the Dataverse sandbox.

Acceptance item (issue 12, "Dataverse fidelity"): the connector discovers the sandbox's tables
with incremental support, and an incremental read syncs them (first sync, then a delta sync);
``check`` passes too.

The connector (PyPI ``airbyte-source-microsoft-dataverse==1.0.2``, on airbyte-cdk 0.80, pydantic 1,
Python < 3.12) cannot share the project venv with Airflow, so it runs from its own locked venv
(``tests/thirdparty/airbyte/uv.lock``; ``make venv-airbyte`` builds ``.venv-airbyte``, and ``make
test`` depends on it) as a subprocess, the way Airbyte runs a source: ``discover``/``read`` with JSON
files, Airbyte protocol messages on stdout.

It hardcodes ``https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`` for its token and
calls ``<url>/api/data/v9.2/``, so the test gives it what a real deployment has, and nothing else:

* the environment URL ``https://d365sync-sandbox.crm.dynamics.com`` (the sandbox's ``--env-url``,
  so tokens are issued for it and checked against it);
* an ``HTTPS_PROXY``: a small CONNECT proxy in this module that tunnels those two hosts, and only
  them, to the sandbox's port (any other CONNECT is refused and fails the test);
* a certificate for both names from a private trustme CA, trusted through ``REQUESTS_CA_BUNDLE``
  and a ``certifi`` stand-in on ``PYTHONPATH`` whose ``where()`` names that CA. The stand-in is
  needed because the CDK's ``HttpStream`` sends with ``Session.send``, which (unlike
  ``Session.request``) never reads ``REQUESTS_CA_BUNDLE`` and uses certifi's bundle: on a machine
  with a corporate CA the same is done by adding it to the bundle.

Without the venv the tests skip locally (``make venv-airbyte``) and fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from d365sync.sandbox.dataverse.process import DataverseSandbox
from d365sync.sandbox.dataverse.schema import TABLES, AttrType

REPO = Path(__file__).resolve().parents[2]
AIRBYTE_VENV = Path(os.environ.get("D365SYNC_AIRBYTE_VENV", REPO / ".venv-airbyte"))
CONNECTOR = AIRBYTE_VENV / "bin" / "source-microsoft-dataverse"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

ORG_HOST = "d365sync-sandbox.crm.dynamics.com"
LOGIN_HOST = "login.microsoftonline.com"
SEED = 60  # accounts: with a page size of 25, the first sync follows nextLinks before the deltaLink
PAGE_SIZE = 25
RUN_TIMEOUT = 180


@pytest.fixture(scope="module")
def connector() -> Path:
    if not os.access(CONNECTOR, os.X_OK):
        message = f"the Airbyte connector venv is missing ({CONNECTOR}); build it with `make venv-airbyte`"
        if IN_CI:
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(f"{message} (set CI=true to make this a failure)")
    return CONNECTOR


# --------------------------------------------------------------------------------------------
# The network a real deployment would have: DNS names, a proxy, a trusted CA
# --------------------------------------------------------------------------------------------


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that tunnels the hosts in ``routes`` and refuses the rest."""

    def __init__(self, routes: dict[str, tuple[str, int]]) -> None:
        self.routes = routes
        self.tunnels: list[str] = []
        self.refused: list[str] = []
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)  # so the accept loop sees close() promptly
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="connect-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(60)
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client, contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            request_line, _, rest = head.partition(b"\r\n")
            method, _, target = request_line.decode("latin-1").partition(" ")
            target = target.rsplit(" ", 1)[0].lower()
            if method != "CONNECT" or target not in self.routes:
                self.refused.append(request_line.decode("latin-1"))
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            self.tunnels.append(target)
            with socket.create_connection(self.routes[target], timeout=30) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                early = rest.partition(b"\r\n\r\n")[2]
                if early:
                    upstream.sendall(early)
                self._pump(client, upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, client)
            while not self._closed.is_set():
                for key, _ in selector.select(timeout=1):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)


@dataclass
class AirbyteWorld:
    sandbox: DataverseSandbox
    proxy: ConnectProxy
    workdir: Path
    config: Path
    env: dict[str, str]

    def run(self, *args: str) -> list[dict[str, Any]]:
        """Run the connector (``discover``/``read`` …); its Airbyte messages, or a failure with its log."""
        completed = subprocess.run(
            [str(CONNECTOR), *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        messages = []
        for line in completed.stdout.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                messages.append(json.loads(line))
        errors = [m for m in messages if m.get("type") == "TRACE" and m["trace"].get("type") == "ERROR"]
        if completed.returncode != 0 or errors or self.proxy.refused:
            pytest.fail(
                f"source-microsoft-dataverse {' '.join(args)} exited {completed.returncode}; "
                f"refused CONNECTs: {self.proxy.refused}\nstdout (tail):\n{completed.stdout[-6000:]}\n"
                f"stderr (tail):\n{completed.stderr[-4000:]}",
                pytrace=False,
            )
        return messages

    def write(self, name: str, data: Any) -> Path:
        path = self.workdir / name
        path.write_text(json.dumps(data))
        return path

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A direct call to the sandbox (test setup), not through the proxy."""
        response = requests.request(
            method,
            f"{self.sandbox.api_url}/{path}",
            headers=self.sandbox.headers(**kwargs.pop("headers", {})),
            verify=self.sandbox.verify,
            timeout=30,
            **kwargs,
        )
        assert response.status_code < 400, response.text
        return response


@pytest.fixture(scope="module")
def world(connector: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirbyteWorld]:
    import trustme

    workdir = tmp_path_factory.mktemp("airbyte")
    ca = trustme.CA()
    cert = ca.issue_cert(LOGIN_HOST, ORG_HOST, "127.0.0.1", "localhost")
    tls = (workdir / "ca.pem", workdir / "server.pem", workdir / "server.key")
    ca.cert_pem.write_to_path(str(tls[0]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(tls[1]))
    cert.private_key_pem.write_to_path(str(tls[2]))

    shim = workdir / "trust" / "certifi"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        '"""certifi stand-in: this machine trusts the private CA (see the test module)."""\n'
        f"CA_BUNDLE = {str(tls[0])!r}\n\n\n"
        "def where():\n    return CA_BUNDLE\n\n\n"
        "def contents():\n    with open(CA_BUNDLE, encoding='ascii') as file:\n        return file.read()\n"
    )

    (workdir / "data").mkdir()
    sandbox = DataverseSandbox(workdir / "data", seed=SEED, tls=tls, env_url=f"https://{ORG_HOST}")
    upstream = ("127.0.0.1", sandbox.port)
    proxy = ConnectProxy({f"{LOGIN_HOST}:443": upstream, f"{ORG_HOST}:443": upstream})
    config = workdir / "config.json"
    config.write_text(
        json.dumps(
            {
                "url": f"https://{ORG_HOST}",
                "tenant_id": sandbox.tenant,
                "client_id": sandbox.client_id,
                "client_secret_value": sandbox.client_secret,
                "odata_maxpagesize": PAGE_SIZE,
            }
        )
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "HTTPS_PROXY": proxy.url,
        "NO_PROXY": "",
        "REQUESTS_CA_BUNDLE": str(tls[0]),
        "PYTHONPATH": str(shim.parent),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    try:
        yield AirbyteWorld(sandbox, proxy, workdir, config, env)
    finally:
        proxy.close()
        sandbox.stop()


@dataclass
class Discovery:
    streams: dict[str, dict[str, Any]]  # the catalog's streams by name
    log: list[dict[str, Any]]  # the connector's LOG messages
    counters: dict[str, Any]  # what the sandbox saw (/_sandbox/counters)


@pytest.fixture(scope="module")
def discovery(world: AirbyteWorld) -> Discovery:
    """One ``discover`` for the module."""
    world.sandbox.reset_counters()
    messages = world.run("discover", "--config", str(world.config))
    (catalog,) = [m["catalog"] for m in messages if m["type"] == "CATALOG"]
    return Discovery(
        streams={stream["name"]: stream for stream in catalog["streams"]},
        log=[m["log"] for m in messages if m["type"] == "LOG"],
        counters=world.sandbox.counters(),
    )


# --------------------------------------------------------------------------------------------
# check and discover
# --------------------------------------------------------------------------------------------


def test_check_connection_succeeds(world: AirbyteWorld) -> None:
    messages = world.run("check", "--config", str(world.config))
    (status,) = [m["connectionStatus"] for m in messages if m["type"] == "CONNECTION_STATUS"]
    assert status["status"] == "SUCCEEDED", status


def test_discover_finds_every_table_with_its_key_and_incremental_cursor(discovery: Discovery) -> None:
    catalog = discovery.streams
    assert set(catalog) == set(TABLES)
    for name, table in TABLES.items():
        stream = catalog[name]
        assert stream["source_defined_primary_key"] == [[table.primary_id]], name
        properties = stream["json_schema"]["properties"]
        if table.change_tracking:
            assert set(stream["supported_sync_modes"]) == {"full_refresh", "incremental"}, name
            assert stream["source_defined_cursor"] is True and stream["default_cursor_field"] == [
                "modifiedon"
            ]
            assert "_ab_cdc_updated_at" in properties and "_ab_cdc_deleted_at" in properties
        else:
            assert stream["supported_sync_modes"] == ["full_refresh"], name
        # Every column, typed from AttributeType (lookups under their _x_value name) and, for
        # DateTime, from the DateTimeBehavior read through the derived-type cast in a $batch.
        for column in table.columns:
            key = f"_{column.name}_value" if column.type == AttrType.LOOKUP else column.name
            assert key in properties, (name, key)
            if column.type == AttrType.DATETIME:
                assert properties[key]["format"] == "date-time", (name, key)
    assert catalog["account"]["json_schema"]["properties"]["creditlimit"]["type"] == ["null", "number"]
    assert catalog["account"]["json_schema"]["properties"]["creditonhold"]["type"] == ["null", "boolean"]


def test_discover_reads_metadata_through_the_real_hosts_and_a_batch(
    world: AirbyteWorld, discovery: Discovery
) -> None:
    # Only the two hosts a real deployment talks to, through the proxy (nothing was refused).
    assert set(world.proxy.tunnels) == {f"{LOGIN_HOST}:443", f"{ORG_HOST}:443"}
    counters = discovery.counters
    assert counters["token_requests"] >= 1 and counters["token_failures"] == 0
    assert counters["routes"].get("GET EntityDefinitions"), counters["routes"]
    assert counters["routes"].get("POST $batch"), counters["routes"]
    # The DateTimeBehavior batch parts all answered (the connector only logs a warning otherwise).
    warnings = [log["message"] for log in discovery.log if log["level"] in ("WARN", "ERROR")]
    assert not warnings, warnings
    assert all(status.startswith("2") for status in counters["statuses"]), counters["statuses"]


# --------------------------------------------------------------------------------------------
# read: an incremental first sync through change tracking, then a delta sync
# --------------------------------------------------------------------------------------------


def _configured(catalog: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    stream = catalog[name]
    return {
        "streams": [
            {
                "stream": stream,
                "sync_mode": "incremental",
                "destination_sync_mode": "append_dedup",
                "cursor_field": stream["default_cursor_field"],
                "primary_key": stream["source_defined_primary_key"],
            }
        ]
    }


def _records(messages: list[dict[str, Any]], stream: str) -> list[dict[str, Any]]:
    return [
        m["record"]["data"] for m in messages if m["type"] == "RECORD" and m["record"]["stream"] == stream
    ]


def _states(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["state"] for m in messages if m["type"] == "STATE"]


def test_incremental_read_first_sync_then_delta(world: AirbyteWorld, discovery: Discovery) -> None:
    configured = world.write("catalog-account.json", _configured(discovery.streams, "account"))
    total = world.api("GET", "accounts?$count=true&$top=1").json()["@odata.count"]
    assert total >= SEED

    first = world.run("read", "--config", str(world.config), "--catalog", str(configured))
    records = _records(first, "account")
    assert len(records) == total and len({r["accountid"] for r in records}) == total  # all pages
    assert all(r["_ab_cdc_updated_at"] == r["modifiedon"] and r["name"] for r in records)
    states = _states(first)
    assert states, "the first sync must end with a state (the delta token)"
    state_path = world.write("state.json", states)
    token = json.dumps(states[-1])
    assert "$deltatoken" in token

    # Changes after the first sync: one update, one create, one delete.
    updated, deleted = records[0]["accountid"], records[1]["accountid"]
    world.api("PATCH", f"accounts({updated})", json={"name": "Changed by the test"})
    created = world.api(
        "POST",
        "accounts",
        json={"name": "Created by the test", "accountnumber": "AIRBYTE-1"},
        headers={"Prefer": "return=representation"},
    ).json()["accountid"]
    world.api("DELETE", f"accounts({deleted})")

    delta = world.run(
        "read", "--config", str(world.config), "--catalog", str(configured), "--state", str(state_path)
    )
    changes = {r["accountid"]: r for r in _records(delta, "account")}
    assert set(changes) == {updated, created, deleted}
    assert (
        changes[updated]["name"] == "Changed by the test"
        and changes[updated].get("_ab_cdc_deleted_at") is None
    )
    assert changes[created]["name"] == "Created by the test"
    assert changes[deleted]["_ab_cdc_deleted_at"]  # the $deletedEntity, as Airbyte marks a delete
    assert json.dumps(_states(delta)[-1]) != token  # a new delta token
