"""Issue 11 #6: a plain-http authority or environment URL is refused unless it is loopback.

The client-credentials grant posts the client secret to ``authority_host``; over ``http://`` to
any other host it would travel in clear. The refusal happens while the configuration is built,
before any I/O, so these tests need no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from d365sync.airflow.hook import DynamicsWebApiHook
from d365sync.dynamics import DynamicsClient, DynamicsConfig, DynamicsConfigError
from d365sync.engine import connections as c

SECRET = "Sup3r-S3cret-Value"
COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yaml"


def _config(**overrides: object) -> DynamicsConfig:
    base: dict[str, object] = {
        "environment_url": "https://org.crm4.dynamics.com",
        "tenant_id": "contoso",
        "client_id": "app",
        "client_secret": SECRET,
    }
    return DynamicsConfig(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["authority_host", "environment_url"])
@pytest.mark.parametrize(
    "url",
    ["http://login.microsoftonline.com", "http://10.0.0.5:8765", "http://127.0.0.1.evil.example", "HTTP://x"],
)
def test_plain_http_to_a_remote_host_is_refused_naming_the_setting(name: str, url: str) -> None:
    with pytest.raises(DynamicsConfigError, match=f"{name} must be an https:// URL") as err:
        _config(**{name: url})
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8765", "http://127.0.0.2", "http://[::1]:8765", "http://localhost:8765"]
)
def test_plain_http_to_loopback_is_accepted(url: str) -> None:
    config = _config(environment_url=url, authority_host=url)
    assert config.authority_host == url and config.environment_url == url


def test_a_listed_private_host_may_use_plain_http() -> None:
    config = _config(authority_host="http://dataverse:8765", plain_http_hosts="dataverse, other")
    assert config.plain_http_hosts == ("dataverse", "other")
    with pytest.raises(DynamicsConfigError, match="authority_host"):
        _config(authority_host="http://dataverse.evil:8765", plain_http_hosts=("dataverse",))


def test_connections_and_the_hook_refuse_it_without_showing_the_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = json.dumps(
        {
            "conn_type": "dynamics",
            "host": "https://org.crm4.dynamics.com",
            "login": "app",
            "password": SECRET,
            "extra": {"tenant_id": "contoso", "authority_host": "http://login.example.net"},
        }
    )
    with pytest.raises(DynamicsConfigError, match="authority_host") as err:
        c.dynamics_config(c.from_env(c.DYNAMICS_CONN, {"AIRFLOW_CONN_DYNAMICS_DEFAULT": raw}))
    assert SECRET not in str(err.value)
    monkeypatch.setenv("AIRFLOW_CONN_DYN_PLAIN", raw)
    ok, message = DynamicsWebApiHook("dyn_plain").test_connection()
    assert not ok and "authority_host must be an https:// URL" in message and SECRET not in message


def test_the_compose_sandbox_connection_lists_its_plain_http_host() -> None:
    env = yaml.safe_load(COMPOSE.read_text())["x-airflow-common"]["environment"]
    conn = c.from_env(
        c.DYNAMICS_CONN, {"AIRFLOW_CONN_DYNAMICS_DEFAULT": env["AIRFLOW_CONN_DYNAMICS_DEFAULT"]}
    )
    config = c.dynamics_config(conn)
    assert config.authority_host == "http://dataverse:8765" and config.plain_http_hosts == ("dataverse",)


def test_the_loopback_sandbox_still_works_over_http(dataverse_sandbox_factory: object) -> None:
    sandbox = dataverse_sandbox_factory()  # type: ignore[operator]
    base = str(sandbox.base_url).rstrip("/")
    assert base.startswith("http://127.0.0.1")
    raw = json.dumps(
        {
            "conn_type": "dynamics",
            "host": base,
            "login": sandbox.client_id,
            "password": sandbox.client_secret,
            "extra": {"tenant_id": sandbox.tenant, "authority_host": base},
        }
    )
    config = c.dynamics_config(c.from_env(c.DYNAMICS_CONN, {"AIRFLOW_CONN_DYNAMICS_DEFAULT": raw}))
    with DynamicsClient(config) as client:
        assert client.whoami().get("UserId")
