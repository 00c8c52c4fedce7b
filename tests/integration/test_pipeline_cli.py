"""``d365sync sync`` against the real sandbox and SQLite ERP, configured through AIRFLOW_CONN_*."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d365sync.cli import main
from tests.integration.pipeline_env import Env
from tests.sandbox_fixtures import SandboxFactory

pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)


def test_sync_cli_reads_airflow_connections_dry_runs_then_syncs(
    dataverse_sandbox_factory: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sandbox = dataverse_sandbox_factory(seed=10)
    Env.create(sandbox, tmp_path, rows=20).close()
    dynamics = {
        "conn_type": "dynamics",
        "host": sandbox.base_url,
        "login": sandbox.client_id,
        "password": sandbox.client_secret,
        "extra": {"tenant_id": sandbox.tenant, "authority_host": sandbox.base_url},
    }
    erp = {"conn_type": "erp_odbc", "schema": str(tmp_path / "erp.db"), "extra": {"driver": "SQLite3"}}
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(dynamics))
    monkeypatch.setenv("AIRFLOW_CONN_ERP_DEFAULT", json.dumps(erp))
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_STATE_DEFAULT", f"sqlite:///{tmp_path / 'state.db'}")
    staging = ["--staging", str(tmp_path / "staging")]

    assert main(["sync", "customers", "--dry-run", *staging]) == 0
    out = capsys.readouterr().out
    assert "customers: DRY RUN" in out and "erp: create 10" in out and sandbox.client_secret not in out

    assert main(["sync", "--all", *staging]) == 0
    out = capsys.readouterr().out
    assert out.index("== customers") < out.index("== orders") < out.index("== invoices")

    assert main(["sync", "customers", *staging]) == 0
    out = capsys.readouterr().out
    assert "dynamics: nothing" in out and "erp: nothing" in out


def test_sync_cli_names_an_unreachable_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = "dynamics://app:s3cret@127.0.0.1:9/http?tenant_id=t&authority_host=http%3A%2F%2F127.0.0.1%3A9"
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", uri)
    assert main(["sync", "customers"]) == 2
    err = capsys.readouterr().err
    assert "Dynamics 365 is unreachable" in err and "127.0.0.1" in err and "s3cret" not in err
