"""A backfill created through ``airflow backfill create`` and executed by a real scheduler.

Setup: its own migrated Airflow home (SQLite metadata DB, LocalExecutor) so that no other DAG of
the session is ever scheduled here; every DAG is paused at creation and only ``sync_customers``
is unpaused. The entity files are a copy of ``include/entities`` with a daily customers schedule
(``0 0 * * *`` instead of every 10 minutes), so "three daily intervals" are three backfill runs,
not 432.

Execution: ``airflow scheduler`` plus ``airflow api-server`` (LocalExecutor task processes talk
to the Execution API) run as child processes in their own sessions, stopped by process id at the
end. That is the path a real backfill takes (run type ``backfill``, data intervals → windows) and
takes ~1 min per backfill on 2 cores; ``dag.test()`` cannot execute runs it did not create (it
deletes a run with the same logical date and starts a manual one).

No live run interleaves with the backfill: the DAG's ``next_dagrun_create_after`` is cleared in
the metadata DB, because Airflow counts backfill runs separately from the DAG's
``max_active_runs`` and a scheduled run would otherwise start next to the backfill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from d365sync.engine.stages.context import aware
from tests.dags.conftest import (
    BIN,
    REPO,
    WARM_EXECUTOR,
    AirflowEnv,
    airflow_base_env,
    assert_success,
    lane_of,
)
from tests.dags.sync_env import SyncEnv, connections_env, init_erp, sqlite_backend, tidy_erp, writes

ERP_ROWS = 150
SEED_ACCOUNTS = 10
DAG_ID = "sync_customers"
TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
DAYS = [TODAY - timedelta(days=n) for n in (4, 3, 2)]  # three complete daily intervals
OUTSIDE = TODAY - timedelta(days=6)  # before the first interval
BACKFILL_TIMEOUT = 900.0  # a wait, not a timing check: a loaded 2-core machine runs 10 tasks a run slowly
API_TIMEOUT = 90.0
WRITE_METHODS = ("PATCH", "POST", "PUT", "DELETE")


@dataclass
class Backfill:
    sync: SyncEnv
    home: Path
    edits: dict[str, Decimal]  # customer number → new ERP credit limit, inside the window
    outside: tuple[str, Decimal]  # the one edited before the window

    @property
    def db(self) -> Path:
        return self.home / "airflow.db"

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db, timeout=30) as conn:
            return conn.execute(sql, params).fetchall()

    def tasks(self, run_id: str) -> dict[str, str]:
        """Task id → state of one run of the DAG."""
        rows = self.query(
            "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", DAG_ID, run_id
        )
        return {task_id: state for task_id, state in rows}

    def create(self) -> int:
        """``airflow backfill create`` over the three days; returns the backfill id."""
        done = self.sync.airflow.cli(
            "backfill",
            "create",
            "--dag-id",
            DAG_ID,
            "--from-date",
            DAYS[0].date().isoformat(),
            "--to-date",
            DAYS[-1].date().isoformat(),
            "--reprocess-behavior",
            "completed",
            "--max-active-runs",
            "1",
            check=False,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        ((backfill_id,),) = self.query("SELECT MAX(id) FROM backfill WHERE dag_id = ?", DAG_ID)
        return int(backfill_id)

    def run(self) -> list[tuple[str, str, str]]:
        """Create the backfill, let a scheduler execute it; (run_id, state, run_type) of its runs."""
        backfill_id = self.create()
        with scheduler(self) as log:
            return self.wait(backfill_id, log)

    def wait(self, backfill_id: int, log: Path) -> list[tuple[str, str, str]]:
        """Until the scheduler completed the backfill."""
        deadline = time.monotonic() + BACKFILL_TIMEOUT
        while time.monotonic() < deadline:
            ((completed,),) = self.query("SELECT completed_at FROM backfill WHERE id = ?", backfill_id)
            if completed is not None:
                break
            time.sleep(2)
        else:
            pytest.fail(f"backfill {backfill_id} not done in {BACKFILL_TIMEOUT}s\n{log.read_text()[-6000:]}")
        return self.query(
            "SELECT run_id, state, run_type FROM dag_run WHERE backfill_id = ? ORDER BY logical_date",
            backfill_id,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _daily_entities(folder: Path) -> Path:
    """``include/entities`` with customers scheduled daily."""
    shutil.copytree(REPO / "include" / "entities", folder, dirs_exist_ok=True)
    spec = folder / "customers.yaml"
    text = spec.read_text()
    assert 'schedule: "*/10 * * * *"' in text
    spec.write_text(text.replace('schedule: "*/10 * * * *"', 'schedule: "0 0 * * *"'))
    return folder


def _airflow(home: Path, entities: Path, extra: dict[str, str]) -> AirflowEnv:
    port = _free_port()
    env = airflow_base_env(home) | extra
    env |= {
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__EXECUTOR": WARM_EXECUTOR,
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": "backfill-test-secret-" + "x" * 32,
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
        "D365SYNC_ENTITIES_DIR": str(entities),
        "D365SYNC_DEADLINE_ALERTS": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    airflow = AirflowEnv(home, env)
    airflow.cli("db", "migrate")
    with sqlite3.connect(home / "airflow.db") as conn:  # readers (this test) never block the scheduler
        conn.execute("PRAGMA journal_mode=WAL")
    return airflow


@pytest.fixture(scope="module")
def backfill(dataverse_sandbox_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backfill]:
    backend = sqlite_backend(tmp_path_factory.mktemp("backfill-sqlite"))
    init_erp(backend, ERP_ROWS)
    tidy_erp(backend)
    sandbox = dataverse_sandbox_factory(seed=SEED_ACCOUNTS)
    home = tmp_path_factory.mktemp("backfill-home")
    extra = connections_env(sandbox, backend) | {"D365SYNC_STAGING_ROOT": f"file://{home / 'staging'}"}
    airflow = _airflow(home, _daily_entities(tmp_path_factory.mktemp("entities")), extra)
    sync = SyncEnv(airflow, sandbox, backend)
    (initial,) = sync.run(DAG_ID)  # also serializes the DAGs (all paused at creation)
    assert_success([initial])
    assert writes(initial), "the initial sync must have created records"
    keys = _untouched_customers(sync)
    edits = {key: Decimal(f"{7000 + i}.25") for i, key in enumerate(keys[:3])}
    for (key, limit), day in zip(edits.items(), DAYS, strict=True):
        _backdated_edit(sync, key, limit, day + timedelta(hours=12))
    outside = (keys[3], Decimal("6999.75"))
    _backdated_edit(sync, *outside, OUTSIDE + timedelta(hours=12))
    airflow.cli("dags", "unpause", DAG_ID)
    with sqlite3.connect(home / "airflow.db", timeout=30) as conn:
        # no scheduled (live) run next to the backfill: see the module docstring
        conn.execute("UPDATE dag SET next_dagrun_create_after = NULL WHERE dag_id = ?", (DAG_ID,))
    yield Backfill(sync, home, edits, outside)
    sandbox.stop()


def _untouched_customers(sync: SyncEnv) -> list[str]:
    """Active customers on both sides whose ERP row the sync never wrote (seeded LAST_UPD, < 2025)."""
    from d365sync.sandbox.erp.tables import TABLES

    rows = sync.dv_rows("accounts", "accountnumber,statecode")
    accounts = {a["accountnumber"] for a in rows if a["statecode"] == 0}
    table = next(t for t in TABLES if t.name == "CUST_MASTER")
    with sync.erp() as client:
        erp = [r for chunk in client.iter_rows(table) for r in chunk]
    untouched = (r for r in erp if str(r["STATUS"]).strip() == "A" and r["LAST_UPD"] < datetime(2025, 1, 1))
    keys = sorted(k for k in (str(r["CUST_NO"]).strip() for r in untouched) if k in accounts)
    assert len(keys) >= 4, keys
    return keys


def _backdated_edit(sync: SyncEnv, key: str, limit: Decimal, stamp: datetime) -> None:
    """A change the live cursor never sees: its LAST_UPD lies days behind the watermark."""
    with sync.erp() as client:
        client.execute(
            ['UPDATE "CUST_MASTER" SET "CREDIT_LIMIT" = ?, "LAST_UPD" = ? WHERE "CUST_NO" = ?'],
            [limit, stamp.replace(tzinfo=None), key],
        )


@contextmanager
def scheduler(backfill: Backfill) -> Iterator[Path]:
    """``airflow api-server`` + ``airflow scheduler`` on the backfill home; stopped by pid.

    Started after ``backfill create``: the CLI writes the runs to the SQLite metadata DB and
    fails with "database is locked" when a scheduler holds it.
    """
    log = backfill.home / "scheduler.log"
    procs = []
    with log.open("ab") as out:
        try:
            for command in ("api-server", "scheduler"):
                procs.append(
                    subprocess.Popen(
                        [str(BIN / "airflow"), command],
                        env=backfill.sync.airflow.env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
                if command == "api-server":  # task processes need the Execution API from the start
                    _wait_for_api(backfill.sync.airflow.env["AIRFLOW__API__PORT"], procs[0], log)
            yield log
        finally:
            for proc in procs:
                _stop(proc)


def _wait_for_api(port: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + API_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"airflow api-server exited {proc.returncode}\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"airflow api-server not up in {API_TIMEOUT}s\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the process and the workers it forked (its own session), by its id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def _live_watermarks(sync: SyncEnv) -> dict[str, Any]:
    with sync.store() as store:
        return {side: store.watermark("customers", side) for side in ("dynamics", "erp")}


def _dynamics_limits(sync: SyncEnv, keys: list[str]) -> dict[str, Decimal]:
    return {
        k: Decimal(str(sync.dv("GET", f"accounts(accountnumber='{k}')?$select=creditlimit")["creditlimit"]))
        for k in keys
    }


def _dataverse_writes(sync: SyncEnv) -> dict[str, int]:
    routes = sync.sandbox.counters().get("operation_routes", {})
    return {r: n for r, n in routes.items() if r.split(" ", 1)[0] in WRITE_METHODS and n}


@pytest.mark.timeout(2 * BACKFILL_TIMEOUT)
def test_backfill_of_three_days_resyncs_their_erp_changes(backfill: Backfill) -> None:
    sync = backfill.sync
    outside_key, outside_limit = backfill.outside
    before = _live_watermarks(sync)
    untouched = _dynamics_limits(sync, [outside_key])

    runs = backfill.run()

    assert [(state, kind) for _, state, kind in runs] == [("success", "backfill")] * 3, runs
    for run_id, _, _ in runs:  # a window run takes the staged chain, never the fast lane
        assert lane_of(backfill.tasks(run_id)) == "staged", run_id
    assert _dynamics_limits(sync, list(backfill.edits)) == backfill.edits
    assert _dynamics_limits(sync, [outside_key]) == untouched != {outside_key: outside_limit}
    after = _live_watermarks(sync)
    for side in ("dynamics", "erp"):
        assert after[side].token == before[side].token, f"{side}: a backfill never replaces a live token"
        assert aware(after[side].value) >= aware(before[side].value), f"{side} watermark moved backwards"
    with sync.store() as store:
        reports = {run_id: store.run_report(run_id, "customers") for run_id, _, _ in runs}
    assert all(r is not None and r.status == "success" for r in reports.values()), reports


@pytest.mark.timeout(2 * BACKFILL_TIMEOUT)
def test_the_same_backfill_again_writes_nothing(backfill: Backfill) -> None:
    sync = backfill.sync
    sync.sandbox.reset_counters()
    erp_stamp = sync.erp_scalar('SELECT MAX("LAST_UPD") FROM "CUST_MASTER"')
    with sync.store() as store:
        logged = {a["id"] for a in store.audit_log("customers")}

    runs = backfill.run()  # reprocessed runs keep their run ids (backfill__<run_after>)

    assert [(state, kind) for _, state, kind in runs] == [("success", "backfill")] * 3, runs
    assert _dataverse_writes(sync) == {}
    assert sync.erp_scalar('SELECT MAX("LAST_UPD") FROM "CUST_MASTER"') == erp_stamp
    with sync.store() as store:
        audit = [a for a in store.audit_log("customers") if a["id"] not in logged]
        counts = {run_id: json.dumps(store.run_report(run_id, "customers").counts) for run_id, _, _ in runs}
    assert audit == []
    assert _dynamics_limits(sync, list(backfill.edits)) == backfill.edits, counts


def test_a_task_sdk_backfill_run_is_a_window_run() -> None:
    from types import SimpleNamespace

    from airflow.sdk.api.datamodels._generated import DagRunType

    from d365sync.airflow.tasks import window_of

    start, end = DAYS[0], DAYS[1]
    context = {"data_interval_start": start, "data_interval_end": end, "params": {}}
    backfill_run = window_of({**context, "dag_run": SimpleNamespace(run_type=DagRunType.BACKFILL)})
    assert (backfill_run.start, backfill_run.end) == (start, end)
    assert window_of({**context, "dag_run": SimpleNamespace(run_type=DagRunType.SCHEDULED)}) is None
