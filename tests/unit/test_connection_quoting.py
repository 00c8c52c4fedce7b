"""Issue 11 #5 without services: ODBC values braced by the ODBC rules, URLs quoted, no leaks."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.engine import make_url

from d365sync.engine import connections as c
from d365sync.erp.connstr import connection_string, odbc_value


@pytest.mark.parametrize(
    ("raw", "quoted"),
    [
        ("s3cret!", "s3cret!"),
        ("p@ss#w/rd", "p@ss#w/rd"),
        ("a;SERVER=evil", "{a;SERVER=evil}"),
        ("a}b", "{a}}b}"),
        ("{x}", "{{x}}}"),
        (" lead", "{ lead}"),
        ("trail ", "{trail }"),
    ],
)
def test_odbc_values_are_braced_when_the_odbc_rules_need_it(raw: str, quoted: str) -> None:
    assert odbc_value(raw) == quoted


def test_every_attribute_is_quoted_and_bad_names_are_refused() -> None:
    conn = c.Conn(
        "erp_default",
        "erp_odbc",
        host="db;x",
        login="u}",
        password="p;SERVER=evil",
        schema="erp",
        extra={"driver": "PostgreSQL Unicode", "sslmode": "require;UID=root"},
    )
    assert c.erp_conn_str(conn) == (
        "DRIVER={PostgreSQL Unicode};SERVER={db;x};DATABASE=erp;UID={u}}};PWD={p;SERVER=evil};"
        "sslmode={require;UID=root};"
    )
    with pytest.raises(c.ConnectionConfigError, match="erp_default: ODBC attribute name 'a;PWD'"):
        c.erp_conn_str(c.Conn("erp_default", extra={"a;PWD": "x"}))
    assert connection_string([("DRIVER", "SQLite3"), ("Database", "/d/erp.db"), ("PWD", "")]) == (
        "DRIVER={SQLite3};Database=/d/erp.db;"
    )


def test_state_url_quotes_the_password() -> None:
    env = {
        "AIRFLOW_CONN_SYNC_STATE_DEFAULT": json.dumps(
            {"conn_type": "postgres", "host": "db", "login": "s", "password": "p@ss#w/rd:x", "schema": "st"}
        )
    }
    url, _ = c.state_url(c.from_env(c.STATE_CONN, env))
    parsed = make_url(url)
    assert (parsed.host, parsed.password, parsed.database) == ("db", "p@ss#w/rd:x", "st")


def test_a_uri_with_an_unencoded_password_fails_without_showing_it() -> None:
    env = {"AIRFLOW_CONN_SYNC_STATE_DEFAULT": "postgres://sync:Kp9/rdX@db.example/state"}
    with pytest.raises(c.ConnectionConfigError, match="URL-encode") as err:
        c.from_env(c.STATE_CONN, env)
    assert "Kp9" not in str(err.value) and "rdX" not in str(err.value)
