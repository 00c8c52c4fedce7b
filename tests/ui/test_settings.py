"""UI settings from the environment: where the state store is, roles, limits."""

from __future__ import annotations

import json

import pytest

from d365sync.ui.settings import UiSettings, parse_role_map


def test_explicit_state_url_wins() -> None:
    env = {
        "D365SYNC_UI_STATE_URL": "sqlite:////data/state.db",
        "AIRFLOW_CONN_SYNC_STATE_DEFAULT": "sqlite:///x",
    }
    assert UiSettings.from_env(env).state_url == "sqlite:////data/state.db"


def test_state_from_the_airflow_connection_json() -> None:
    conn = {
        "conn_type": "postgres",
        "host": "db",
        "port": 5432,
        "login": "sync",
        "password": "pw",
        "schema": "ops",
    }
    settings = UiSettings.from_env(
        {"AIRFLOW_CONN_SYNC_STATE_DEFAULT": json.dumps(conn | {"extra": {"schema": "s1"}})}
    )
    assert settings.state_url == "postgresql+psycopg2://sync:pw@db:5432/ops"
    assert settings.state_schema == "s1"


def test_state_from_a_sqlite_connection_uri_and_default() -> None:
    sqlite = UiSettings.from_env(
        {"AIRFLOW_CONN_SYNC_STATE_DEFAULT": json.dumps({"conn_type": "sqlite", "host": "/d/s.db"})}
    )
    assert sqlite.state_url == "sqlite:////d/s.db"
    assert UiSettings.from_env({}).state_url.endswith("var/demo/state.db")


def test_numbers_roles_and_overrides() -> None:
    env = {"D365SYNC_UI_PAGE_SIZE": "25", "D365SYNC_UI_ROLE_MAP": "SyncOps:op, Auditors : viewer"}
    settings = UiSettings.from_env(env, state_url="sqlite://")
    assert (settings.page_size, settings.state_url) == (25, "sqlite://")
    assert (
        settings.role_map
        == {"syncops": "op", "auditors": "viewer"}
        == parse_role_map(env["D365SYNC_UI_ROLE_MAP"])
    )
    with pytest.raises(ValueError, match="D365SYNC_UI_PAGE_SIZE"):
        UiSettings.from_env({"D365SYNC_UI_PAGE_SIZE": "many"})
