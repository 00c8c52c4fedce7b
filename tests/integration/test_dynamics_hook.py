"""DynamicsWebApiHook end to end over HTTPS: Airflow connection → client → TLS sandbox.

The connection comes from ``AIRFLOW_CONN_*`` (no Airflow database); the private CA is trusted
only through the connection's ``ca_bundle`` extra, not through environment variables.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from d365sync.airflow.hook import DynamicsWebApiHook

try:
    from tests.sandbox_fixtures import dataverse_sandbox_tls
except ImportError:  # pragma: no cover - the sandbox fixture module is written in parallel
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        raise
    pytest.skip("tests/sandbox_fixtures.py is not available yet", allow_module_level=True)

__all__ = ["dataverse_sandbox_tls"]


def _connection(sandbox: Any, monkeypatch: pytest.MonkeyPatch, secret: str | None = None) -> str:
    authority = str(sandbox.authority).rstrip("/")
    conn = {
        "conn_type": "dynamics",
        "host": str(sandbox.base_url),
        "login": sandbox.client_id,
        "password": secret or sandbox.client_secret,
        "extra": {
            "tenant_id": sandbox.tenant,
            "authority_host": authority.removesuffix(f"/{sandbox.tenant}"),
            "ca_bundle": str(sandbox.ca_bundle),
            "page_size": 50,
        },
    }
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_DATAVERSE_TLS", json.dumps(conn))
    return "dataverse_tls"


def test_hook_test_connection_over_tls(dataverse_sandbox_tls: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert str(dataverse_sandbox_tls.base_url).startswith("https://")
    ok, message = DynamicsWebApiHook(_connection(dataverse_sandbox_tls, monkeypatch)).test_connection()
    assert ok, message
    assert message.startswith("Connected as user ")


def test_hook_client_reads_and_writes_over_tls(
    dataverse_sandbox_tls: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = DynamicsWebApiHook(_connection(dataverse_sandbox_tls, monkeypatch))
    try:
        client = hook.get_conn()
        assert client.config.page_size == 50
        records = [{"accountnumber": f"tls-{i}", "name": f"TLS {i}"} for i in range(120)]
        assert all(o.ok for o in client.upsert_many("accounts", "accountnumber", records))
        before = client.counters.requests
        rows = list(
            client.iter_rows("accounts", ["accountnumber"], filter="startswith(accountnumber,'tls-')")
        )
        assert len(rows) == 120 and client.counters.requests - before == 3
    finally:
        hook.close()


def test_hook_wrong_secret_fails_with_a_clear_message(
    dataverse_sandbox_tls: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "not-the-secret-at-all"
    ok, message = DynamicsWebApiHook(_connection(dataverse_sandbox_tls, monkeypatch, wrong)).test_connection()
    assert not ok
    assert "AADSTS" in message and dataverse_sandbox_tls.client_id in message and wrong not in message
