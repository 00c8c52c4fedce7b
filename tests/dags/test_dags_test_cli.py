"""``airflow dags test sync_customers``, the standard way to try a DAG, with deadline alerts on (issue 10).

Run through the real ``airflow`` CLI in a child process against the session's migrated metadata DB,
the Dataverse sandbox and a SQLite ERP + state store. It used to exit 1 after every task had
succeeded: ``AttributeError: 'dict' object has no attribute 'hex'`` from the deadline alert.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator

import pytest

from tests.dags.conftest import AirflowEnv, lane_of
from tests.dags.sync_env import SyncEnv, sqlite_sync_env
from tests.sandbox_fixtures import SandboxFactory

DAG_ID = "sync_customers"


@pytest.fixture(scope="module")
def env(
    airflow_env: AirflowEnv,
    dataverse_sandbox_factory: SandboxFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SyncEnv]:
    # a home of its own: the test reads the DAG version its run used, and a stack or run of
    # another module in the session's home may serialize sync_customers without the alert
    own = airflow_env.own_home(tmp_path_factory.mktemp("airflow-home-dags-test"))
    with sqlite_sync_env(
        own,
        dataverse_sandbox_factory,
        tmp_path_factory,
        "dags-test-cli",
        rows=30,
        seed=10,
        D365SYNC_DEADLINE_ALERTS="true",
    ) as env:
        yield env


def _runs(airflow: AirflowEnv) -> list[tuple[int, str, str]]:
    with sqlite3.connect(airflow.home / "airflow.db") as db:
        return db.execute(
            "SELECT id, run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id", (DAG_ID,)
        ).fetchall()


def test_airflow_dags_test_exits_0_with_the_staged_chain_successful_and_the_deadline_alert_on(
    env: SyncEnv,
) -> None:
    before = {run[0] for run in _runs(env.airflow)}
    done = env.airflow.cli("dags", "test", DAG_ID, check=False, timeout=600)
    output = f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-8000:]}"
    assert done.returncode == 0, output

    (run_id, state) = [(r[1], r[2]) for r in _runs(env.airflow) if r[0] not in before][-1]
    assert state == "success", output
    with sqlite3.connect(env.airflow.home / "airflow.db") as db:
        tasks = dict(
            db.execute(
                "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", (DAG_ID, run_id)
            ).fetchall()
        )
        # what the scheduler reads: the DAG version this run used names its alert row by id
        alerts = db.execute(
            "SELECT s.data, a.id, a.callback_def FROM deadline_alert a"
            " JOIN serialized_dag s ON s.id = a.serialized_dag_id"
            " JOIN dag_run r ON r.created_dag_version_id = s.dag_version_id"
            " WHERE r.dag_id = ? AND r.run_id = ?",
            (DAG_ID, run_id),
        ).fetchall()
        left = db.execute(
            "SELECT COUNT(*) FROM deadline d JOIN dag_run r ON r.id = d.dagrun_id"
            " WHERE r.dag_id = ? AND r.run_id = ?",
            (DAG_ID, run_id),
        ).fetchone()[0]
    # a manual run takes the staged chain: every task of it successful, the fast lane skipped
    assert lane_of(tasks) == "staged", (tasks, output)
    ((data, alert_id, callback),) = alerts
    assert [uuid.UUID(i) for i in json.loads(data)["dag"]["deadline"]] == [uuid.UUID(alert_id)]
    assert "d365sync.airflow.alerts.on_deadline_missed" in callback and DAG_ID in callback
    assert left == 0  # the succeeded run's deadline was pruned: no late alert for it
