"""``d365sync sandbox erp init`` through the real console entry point and the SQLite3 driver."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

from d365sync.cli import main
from d365sync.erp import ErpClient


def test_init_with_odbc_string(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conn_str = f"DRIVER={{SQLite3}};Database={tmp_path / 'erp.db'};"
    assert main(["sandbox", "erp", "init", "--odbc", conn_str, "--rows", "250", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "CUST_MASTER" in out and "250 rows" in out and "dirty" in out
    with ErpClient(conn_str) as client:
        assert client.scalar('SELECT COUNT(*) FROM "SO_HEADER"') == 125


def test_init_with_airflow_conn_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conn = {"conn_type": "erp_odbc", "schema": str(tmp_path / "erp.db"), "extra": {"driver": "SQLite3"}}
    with mock.patch.dict("os.environ", {"AIRFLOW_CONN_ERP_SANDBOX": json.dumps(conn)}):
        assert main(["sandbox", "erp", "init", "--conn-id", "erp_sandbox", "--rows", "100"]) == 0
    assert "dialect sqlite" in capsys.readouterr().out
