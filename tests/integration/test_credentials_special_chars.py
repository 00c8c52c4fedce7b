"""Issue 11 #5: credentials with URL and ODBC special characters, against a real PostgreSQL.

A role whose password holds ``@ # /`` (URL delimiters) and ``;SERVER=`` (an ODBC attribute)
must reach the configured server through both the SQLAlchemy state store and the ODBC ERP
client, and no error or log line may repeat any fragment of that password. The server uses
trust authentication, so the password is checked where it is parsed (the URL, the ODBC
string) and the connection proves the target: the role and 127.0.0.1, not a host named after
part of the password.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pyodbc
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from d365sync.airflow.erp_hook import ErpOdbcHook
from d365sync.engine import connections as c
from d365sync.engine.state import StateStore
from d365sync.sync_cli import Unreachable, _check
from tests.conftest import SERVICES

pytestmark = pytest.mark.postgres

PASSWORD = "Kp@ssQ#wZ/rdX;SERVER=evilhost"
# Every piece between the special characters (bar the generic word SERVER) must stay hidden.
FRAGMENTS = [p for p in re.split(r"[@#/;=]", PASSWORD) if p != "SERVER"]


def _assert_hidden(*texts: str) -> None:
    for blob in texts:
        leaked = [f for f in FRAGMENTS if f in blob]
        assert not leaked, f"password fragments {leaked} in: {blob}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pg_role() -> Iterator[tuple[str, str]]:
    """(role, schema it owns) with :data:`PASSWORD`, dropped afterwards."""
    host, port = SERVICES["postgres"]
    role = f"sec_creds_{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"postgresql+psycopg2://postgres@{host}:{port}/test")
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE ROLE "{role}" LOGIN PASSWORD :pw'), {"pw": PASSWORD})
            conn.execute(text(f'CREATE SCHEMA "{role}" AUTHORIZATION "{role}"'))
        yield role, role
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{role}" CASCADE'))
            conn.execute(text(f'DROP ROLE "{role}"'))
    finally:
        admin.dispose()


def _state_env(role: str, form: str, port: int) -> dict[str, str]:
    host = SERVICES["postgres"][0]
    if form == "json":
        conn = {"conn_type": "postgres", "host": host, "port": port, "schema": "test"}
        raw = json.dumps(conn | {"login": role, "password": PASSWORD})
    else:  # Airflow's URI form needs the password URL-encoded
        raw = f"postgres://{role}:{quote(PASSWORD, safe='')}@{host}:{port}/test"
    return {"AIRFLOW_CONN_SYNC_STATE_DEFAULT": raw}


@pytest.mark.parametrize("form", ["json", "uri"])
def test_state_store_password_with_url_characters_connects_to_the_host(
    pg_role: tuple[str, str], form: str
) -> None:
    role, schema = pg_role
    host, port = SERVICES["postgres"]
    conn = c.from_env(c.STATE_CONN, _state_env(role, form, port))
    assert conn is not None and conn.password == PASSWORD
    url, _ = c.state_url(conn)
    parsed = make_url(url)
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        role,
        PASSWORD,
        host,
        port,
        "test",
    )
    with StateStore.open(url, schema=schema) as store, store.engine.connect() as cx:
        who = cx.execute(text("SELECT current_user, host(inet_server_addr())")).one()
    assert tuple(who) == (role, host)


def test_state_store_unreachable_error_never_shows_the_password(
    pg_role: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    role, _ = pg_role
    conn = c.from_env(c.STATE_CONN, _state_env(role, "json", _closed_port()))
    url, _ = c.state_url(conn)
    with pytest.raises(Unreachable) as err:
        _check("sync state store", conn, lambda: StateStore.open(url))
    assert "127.0.0.1" in str(err.value)
    _assert_hidden(str(err.value), repr(err.value.__cause__), caplog.text)


def _erp_conn(role: str, port: int) -> dict[str, object]:
    return {
        "conn_type": "erp_odbc",
        "host": SERVICES["postgres"][0],
        "port": port,
        "schema": "test",
        "login": role,
        "password": PASSWORD,
        "extra": {"driver": "PostgreSQL Unicode", "dialect": "postgresql", "retry_attempts": 1},
    }


def test_erp_odbc_password_with_semicolon_stays_one_attribute(pg_role: tuple[str, str]) -> None:
    role, _ = pg_role
    host, port = SERVICES["postgres"]
    env = {"AIRFLOW_CONN_ERP_DEFAULT": json.dumps(_erp_conn(role, port))}
    conn = c.from_env(c.ERP_CONN, env)
    conn_str = c.erp_conn_str(conn)
    assert f"PWD={{{PASSWORD}}};" in conn_str
    with c.erp_client(conn) as client:
        assert client.scalar("SELECT current_user") == role
        assert client.scalar("SELECT host(inet_server_addr())") == host


def test_erp_hook_password_with_semicolon_connects_to_the_host(
    pg_role: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    role, _ = pg_role
    host, port = SERVICES["postgres"]
    monkeypatch.setenv("AIRFLOW_CONN_ERP_SEC", json.dumps(_erp_conn(role, port)))
    hook = ErpOdbcHook(erp_conn_id="erp_sec")
    assert f"PWD={{{PASSWORD}}};" in hook.odbc_connection_string
    ok, message = hook.test_connection()
    assert ok, message
    with hook.get_client() as client:
        assert client.scalar("SELECT current_user") == role
        assert client.scalar("SELECT host(inet_server_addr())") == host


def test_erp_unreachable_errors_never_show_the_password(
    pg_role: tuple[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    role, _ = pg_role
    raw = json.dumps(_erp_conn(role, _closed_port()))
    conn = c.from_env(c.ERP_CONN, {"AIRFLOW_CONN_ERP_DEFAULT": raw})
    with pytest.raises(pyodbc.Error) as err, c.erp_client(conn) as client:
        client.server_info()
    assert "127.0.0.1" in str(err.value)
    monkeypatch.setenv("AIRFLOW_CONN_ERP_SEC", raw)
    ok, message = ErpOdbcHook(erp_conn_id="erp_sec").test_connection()
    assert not ok and "127.0.0.1" in message
    _assert_hidden(str(err.value), message, caplog.text)
