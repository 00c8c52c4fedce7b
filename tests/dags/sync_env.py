"""A complete sync environment for DAG tests: Dataverse sandbox, ERP and state store, as connections.

``SyncEnv`` wraps :class:`~tests.dags.conftest.AirflowEnv` with the three ``AIRFLOW_CONN_*``
variables the tasks read, plus helpers to edit either system the way a user would (the Web API
for Dynamics, SQL for the ERP) and to read the state store.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from d365sync.engine.state import StateStore
from d365sync.erp import ErpClient
from d365sync.sandbox.dataverse.process import DataverseSandbox
from d365sync.sandbox.erp import sqlite_airflow_connection
from tests.dags.conftest import AirflowEnv, RunResult

WRITE_OPS = ("create", "update", "deactivate", "delete", "reactivate")


@dataclass
class Backend:
    """Where the ERP and the state store live: SQLite files, or PostgreSQL (CI)."""

    name: str
    erp_conn: dict[str, Any]
    erp_odbc: str
    state_conn: dict[str, Any]
    state_url: str
    state_schema: str | None = None


def sqlite_backend(folder: Path) -> Backend:
    erp = folder / "erp.db"
    state = folder / "state.db"
    return Backend(
        "sqlite",
        sqlite_airflow_connection(erp),
        f"DRIVER={{SQLite3}};Database={erp};",
        {"conn_type": "sqlite", "host": str(state)},
        f"sqlite:///{state}",
    )


@dataclass
class SyncEnv:
    airflow: AirflowEnv
    sandbox: DataverseSandbox
    backend: Backend

    def run(self, *dags: str, **kw: Any) -> list[RunResult]:
        return self.airflow.run(*dags, **kw)

    # -- Dynamics, through the Web API ------------------------------------------------------
    def dv(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.request(
            method, f"{self.sandbox.api_url}/{path}", json=body, headers=self.sandbox.headers(), timeout=30
        )
        response.raise_for_status()
        return response.json() if response.content else None

    def dv_rows(self, entity_set: str, select: str, top: int = 5000) -> list[dict[str, Any]]:
        return self.dv("GET", f"{entity_set}?$select={select}&$top={top}")["value"]

    # -- ERP, through SQL -------------------------------------------------------------------
    @contextmanager
    def erp(self) -> Iterator[ErpClient]:
        with ErpClient(self.backend.erp_odbc) as client:
            yield client

    def erp_update(self, table: str, key_col: str, key: str, **values: Any) -> None:
        """An ERP user's edit: the row's cursor and version move with it."""
        from d365sync.sandbox.erp.tables import TABLES

        spec = next(t for t in TABLES if t.name == table)
        sets = [f'"{c}" = ?' for c in values]
        params = list(values.values())
        if spec.cursor_column:
            sets.append(f'"{spec.cursor_column}" = ?')
            params.append(datetime.now(UTC).replace(tzinfo=None))
        if spec.version_column:
            sets.append(f'"{spec.version_column}" = "{spec.version_column}" + 1')
        sql = f'UPDATE "{table}" SET {", ".join(sets)} WHERE "{key_col}" = ?'
        with self.erp() as client:
            client.execute([sql], [*params, key])

    def erp_scalar(self, sql: str, *params: Any) -> Any:
        with self.erp() as client:
            return client.scalar(sql, *params)

    # -- state --------------------------------------------------------------------------------
    @contextmanager
    def store(self) -> Iterator[StateStore]:
        with StateStore.open(self.backend.state_url, schema=self.backend.state_schema) as store:
            yield store


def connections_env(sandbox: DataverseSandbox, backend: Backend) -> dict[str, str]:
    return {
        "AIRFLOW_CONN_DYNAMICS_DEFAULT": json.dumps(sandbox.airflow_connection()),
        "AIRFLOW_CONN_ERP_DEFAULT": json.dumps(backend.erp_conn),
        "AIRFLOW_CONN_SYNC_STATE_DEFAULT": json.dumps(backend.state_conn),
    }


@contextmanager
def sqlite_sync_env(
    airflow_env: AirflowEnv,
    sandbox_factory: Callable[..., DataverseSandbox],
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    *,
    rows: int,
    seed: int,
    **extra_env: str,
) -> Iterator[SyncEnv]:
    """A module's sync environment: a SQLite ERP of ``rows`` (seeded, then tidied) and state store,
    the sandbox seeded with ``seed``, a staging folder, and ``airflow_env`` with their connections
    plus ``extra_env``. Stops the sandbox and removes the staging folder at the end."""
    backend = sqlite_backend(tmp_path_factory.mktemp(name))
    init_erp(backend, rows)
    tidy_erp(backend)
    sandbox = sandbox_factory(seed=seed)
    staging = tmp_path_factory.mktemp(f"{name}-staging")
    airflow = airflow_env.with_env(
        **connections_env(sandbox, backend), D365SYNC_STAGING_ROOT=f"file://{staging}", **extra_env
    )
    try:
        yield SyncEnv(airflow, sandbox, backend)
    finally:
        sandbox.stop()
        shutil.rmtree(staging, ignore_errors=True)


def init_erp(backend: Backend, rows: int) -> None:
    seed_erp(backend.erp_odbc, rows)


def seed_erp(odbc: str, rows: int) -> None:
    """``d365sync sandbox erp init`` through the console entry point (ODBC)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "d365sync.cli",
            "sandbox",
            "erp",
            "init",
            "--odbc",
            odbc,
            "--rows",
            str(rows),
            "--seed",
            "7",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


def tidy_erp(backend: Backend) -> None:
    """The demo's data steward (``seeder.tidy``), so the first runs stay under the thresholds."""
    from d365sync.sandbox.erp.seeder import tidy

    with ErpClient(backend.erp_odbc) as client:
        tidy(client)


def writes(result: RunResult) -> dict[str, int]:
    """Non-zero write counts of a run (``<side>_<op>``)."""
    counts = (result.report or {}).get("counts") or {}
    return {k: v for k, v in counts.items() if k.split("_", 1)[-1] in WRITE_OPS and v}
