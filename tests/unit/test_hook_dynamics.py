"""DynamicsWebApiHook and provider info, without an Airflow database.

Connections come from ``AIRFLOW_CONN_*`` JSON in the environment; provider discovery reads the
real entry point of the editable install.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from d365sync.airflow.hook import DynamicsWebApiHook
from d365sync.airflow.provider import get_provider_info
from d365sync.dynamics import DynamicsClient


def _set_conn(monkeypatch: pytest.MonkeyPatch, conn_id: str = "dv", **fields: Any) -> None:
    conn = {
        "conn_type": "dynamics",
        "host": "https://org.crm4.dynamics.com",
        "login": "client-1",
        "password": "secret-1",
        "extra": {"tenant_id": "tenant-1", "page_size": "250", "max_concurrency": 3},
        **fields,
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def test_hook_builds_a_config_from_connection_and_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_conn(monkeypatch)
    config = DynamicsWebApiHook("dv").get_config()
    assert config.api_url == "https://org.crm4.dynamics.com/api/data/v9.2"
    assert (config.tenant_id, config.client_id, config.client_secret) == ("tenant-1", "client-1", "secret-1")
    assert (config.page_size, config.max_concurrency, config.batch_size) == (250, 3, 1000)
    assert config.authority_host == "https://login.microsoftonline.com" and config.verify is True


def test_constructor_arguments_win_over_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_conn(monkeypatch, extra={"extra__dynamics__tenant_id": "legacy", "ca_bundle": "/ca.pem"})
    hook = DynamicsWebApiHook("dv", tenant_id="override", page_size=10, authority_host="http://127.0.0.1:1")
    config = hook.get_config()
    assert (config.tenant_id, config.page_size, config.verify) == ("override", 10, "/ca.pem")
    assert config.authority == "http://127.0.0.1:1/override"


def test_legacy_prefixed_extras_and_bare_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_conn(monkeypatch, host="org.crm.dynamics.com", extra={"extra__dynamics__tenant_id": "legacy"})
    config = DynamicsWebApiHook("dv").get_config()
    assert (config.tenant_id, config.environment_url) == ("legacy", "https://org.crm.dynamics.com")


def test_get_conn_returns_one_cached_client(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_conn(monkeypatch)
    hook = DynamicsWebApiHook("dv")
    client = hook.get_conn()
    try:
        assert isinstance(client, DynamicsClient) and hook.get_conn() is client
    finally:
        hook.close()


def test_test_connection_reports_bad_config_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_conn(monkeypatch, extra={})
    ok, message = DynamicsWebApiHook("dv").test_connection()
    assert not ok and message == "tenant_id is required"


def test_provider_info_declares_the_dynamics_form() -> None:
    info = get_provider_info()
    assert info["package-name"] == "d365-erp-sync"
    by_type = {c["connection-type"]: c for c in info["connection-types"]}
    dynamics = by_type["dynamics"]
    assert dynamics["hook-class-name"] == "d365sync.airflow.hook.DynamicsWebApiHook"
    assert dynamics["ui-field-behaviour"]["relabeling"] == {
        "host": "Environment URL",
        "login": "Client ID",
        "password": "Client Secret",
    }
    assert set(dynamics["ui-field-behaviour"]["hidden-fields"]) == {"schema", "port"}
    assert set(dynamics["conn-fields"]) >= {"tenant_id", "authority_host", "page_size", "batch_size"}
    assert by_type["erp_odbc"]["hook-class-name"] == "d365sync.airflow.erp_hook.ErpOdbcHook"


def test_providers_manager_discovers_the_testable_dynamics_hook() -> None:
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    hook = ProvidersManagerTaskRuntime().hooks["dynamics"]
    assert hook is not None
    assert hook.hook_class_name == "d365sync.airflow.hook.DynamicsWebApiHook"
    assert hook.connection_testable and hook.package_name == "d365-erp-sync"
    manager = ProvidersManager()
    assert "d365-erp-sync" in manager.providers
    assert manager.field_behaviours["dynamics"]["relabeling"]["host"] == "Environment URL"
    assert "extra__dynamics__tenant_id" in manager.connection_form_widgets
    erp_hook = ProvidersManagerTaskRuntime().hooks["erp_odbc"]
    assert erp_hook is not None and erp_hook.connection_testable
    assert erp_hook.hook_class_name == "d365sync.airflow.erp_hook.ErpOdbcHook"
    assert {"extra__erp_odbc__driver", "extra__erp_odbc__dialect"} <= set(manager.connection_form_widgets)
