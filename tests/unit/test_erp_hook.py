"""ErpOdbcHook: connection → configured client, built from AIRFLOW_CONN_* without a metadata DB."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

from d365sync.airflow.erp_hook import ErpOdbcHook


def _env(conn_id: str, conn: dict[str, object]) -> dict[str, str]:
    return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(conn)}


def test_sqlite_connection_tests_and_builds_the_client(tmp_path: Path) -> None:
    conn = {
        "conn_type": "erp_odbc",
        "schema": str(tmp_path / "erp.db"),
        "extra": {"driver": "SQLite3", "chunk_size": "500", "retry_attempts": 2, "dialect": "sqlite"},
    }
    with mock.patch.dict("os.environ", _env("erp_t", conn)):
        hook = ErpOdbcHook(erp_conn_id="erp_t")
        assert hook.odbc_connection_string == f"DRIVER={{SQLite3}};DATABASE={tmp_path / 'erp.db'};"
        ok, message = hook.test_connection()
        assert ok and "dialect sqlite" in message
        with hook.get_client() as client:
            assert client.chunk_size == 500 and client.dialect.name == "sqlite"
        assert hook.placeholder == "?"


def test_client_extras_stay_out_of_the_odbc_string_and_others_pass_through() -> None:
    conn = {
        "conn_type": "erp_odbc",
        "host": "erp.example.net,1433",
        "schema": "ERPPROD",
        "login": "sync",
        "password": "s3cret!",
        "extra": {
            "driver": "ODBC Driver 18 for SQL Server",
            "Encrypt": "yes",
            "fast_executemany": "false",
            "dialect": "mssql",
        },
    }
    with (
        mock.patch.dict("os.environ", _env("erp_ms", conn)),
        mock.patch("pyodbc.drivers", return_value=["ODBC Driver 18 for SQL Server"]),
    ):
        hook = ErpOdbcHook(erp_conn_id="erp_ms", client_options={"chunk_size": 2000})
        assert hook.odbc_connection_string == (
            "DRIVER={ODBC Driver 18 for SQL Server};SERVER=erp.example.net,1433;DATABASE=ERPPROD;"
            "UID=sync;PWD=s3cret!;Encrypt=yes;"
        )
        assert hook.option("chunk_size") == 2000 and hook.option("dialect") == "mssql"


def test_unreachable_database_fails_the_test_with_a_message(tmp_path: Path) -> None:
    conn = {
        "conn_type": "erp_odbc",
        "schema": str(tmp_path / "missing" / "erp.db"),
        "extra": {"driver": "SQLite3"},
    }
    with mock.patch.dict("os.environ", _env("erp_bad", conn)):
        ok, message = ErpOdbcHook(erp_conn_id="erp_bad").test_connection()
    assert not ok and message


@pytest.mark.parametrize("conn_id", ["erp_default"])
def test_default_connection_name(conn_id: str) -> None:
    assert ErpOdbcHook().get_conn_id() == conn_id
