"""The docker-compose topology without Docker: the same settings, as separate processes on loopback.

From ``docker-compose.yaml`` (x-airflow-common environment and the services' commands, hosts
swapped for 127.0.0.1 by :mod:`tests.deploy.compose`): the airflow-init script against a fresh
PostgreSQL metadata database, an ERP schema seeded through ODBC and a PostgreSQL state store;
then api-server, scheduler, dag-processor, triggerer and two ``airflow celery worker`` processes
on the local Redis (a db number of their own). ``sync_customers`` and then ``sync_orders`` are
triggered through the REST API (SimpleAuthManager JWT) and must succeed, with every task
instance executed by one of the Celery workers. Every process is started in its own session and
ended by process group in the fixture's teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import SERVICES
from tests.deploy import compose

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

BIN = Path(sys.executable).parent
RUN_TIMEOUT = 360.0  # both DAG runs, after the stack is up
# The test's ".env": small and quiet, as a user would tune the compose file for a laptop.
DOTENV = {
    "AIRFLOW__CORE__PARALLELISM": "4",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    # paused at creation: only the two DAGs under test get unpaused (no runs of the others)
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
    "_AIRFLOW_WWW_USER_PASSWORD": "ci-admin-pw",
    "DEMO_ROWS": "300",
}
PROCESSES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_admin(sql: str) -> None:
    import psycopg2

    host, port = SERVICES["postgres"]
    conn = psycopg2.connect(host=host, port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    api_url: str
    redis_db: int
    databases: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sandbox: Any = None

    def start(self, name: str, argv: list[str], **extra_env: str) -> None:
        with (self.tmp / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                env={**self.env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                start_new_session=True,  # own process group: teardown kills it with its children
            )

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-chars:]}" for n in self.procs)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            # the group may outlive its leader (forked task runners, log servers)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def localizer(tmp: Path, suffix: str, sandbox_port: int, api_port: int, redis_db: int) -> compose.Localizer:
    pg_host, pg_port = SERVICES["postgres"]
    redis_host, redis_port = SERVICES["redis"]
    return compose.Localizer(
        endpoints={
            "postgres": compose.Endpoint(pg_host, pg_port, f"airflow_ci_{suffix}", "postgres"),
            "state-db": compose.Endpoint(pg_host, pg_port, f"state_ci_{suffix}", "postgres"),
            "erp-db": compose.Endpoint(pg_host, pg_port, f"erp_ci_{suffix}", "postgres"),
            "redis": compose.Endpoint(redis_host, redis_port, str(redis_db)),
            "dataverse": compose.Endpoint("127.0.0.1", sandbox_port),
            "airflow-apiserver": compose.Endpoint("127.0.0.1", api_port),
        },
        paths={
            "/opt/d365sync/staging": str(tmp / "staging"),
            "/opt/d365sync": str(compose.REPO),
            "/opt/airflow": str(tmp / "airflow"),
        },
        ports={
            "AIRFLOW__API__PORT": api_port,
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": free_port(),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": free_port(),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": free_port(),
        },
    )


def base_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "D365SYNC_", "_AIRFLOW"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = "default"
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from d365sync.sandbox.dataverse.process import DataverseSandbox

    tmp = tmp_path_factory.mktemp("celery-topology")
    (tmp / "airflow" / "auth").mkdir(parents=True)
    suffix = str(os.getpid())
    redis_db = 1 + os.getpid() % 15
    databases = [f"airflow_ci_{suffix}", f"state_ci_{suffix}", f"erp_ci_{suffix}"]
    (tmp / "dataverse").mkdir()
    sandbox = DataverseSandbox(tmp / "dataverse", seed=40)
    api_port = free_port()
    local = localizer(tmp, suffix, sandbox.port, api_port, redis_db)
    env = {**base_environment(), **local.environment(compose.common_environment(DOTENV))}
    stack = Stack(tmp, env, f"http://127.0.0.1:{api_port}", redis_db, databases, sandbox=sandbox)
    try:
        for db in databases:
            _pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            _pg_admin(f'CREATE DATABASE "{db}"')
        _flush_redis(redis_db)
        # airflow-init: the compose service's own script with its own environment, localized
        init_env = local.environment(compose.service_environment("airflow-init", DOTENV))
        script = compose.service_command("airflow-init", DOTENV)
        assert isinstance(script, list) and script[0] == "-c"
        init = subprocess.run(
            ["bash", "-c", local.text(script[1])],  # container paths -> repo and temp dirs
            env={**env, **init_env},
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp,
        )
        assert init.returncode == 0, f"airflow-init failed\n{init.stdout[-4000:]}\n{init.stderr[-6000:]}"
        for name in PROCESSES:
            command = compose.service_command(name, DOTENV)
            assert isinstance(command, str)
            stack.start(name, command.split())
        worker = compose.service_command("airflow-worker", DOTENV)
        assert isinstance(worker, str)
        worker_env = local.environment(compose.service_environment("airflow-worker", DOTENV))
        for n in (1, 2):
            extra = {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())} if n == 2 else {}
            stack.start(
                f"airflow-worker-{n}",
                [*worker.split(), "--celery-hostname", f"worker{n}@%h"],
                **{**worker_env, **extra},
            )
        yield stack
    finally:
        stack.stop()
        sandbox.stop()
        _flush_redis(redis_db)
        for db in databases:
            _pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _flush_redis(db: int) -> None:
    import redis

    host, port = SERVICES["redis"]
    client = redis.Redis(host=host, port=port, db=db)
    try:
        client.flushdb()
    finally:
        client.close()


class Api:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.session = requests.Session()

    def login(self, password: str) -> None:
        response = requests.post(
            f"{self.stack.api_url}/auth/token", json={"username": "admin", "password": password}, timeout=30
        )
        assert response.status_code == 201, response.text
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def call(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.session.request(method, f"{self.stack.api_url}/api/v2/{path}", timeout=30, **kw)

    def json(self, method: str, path: str, **kw: Any) -> Any:
        response = self.call(method, path, **kw)
        assert response.ok, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()


def wait_for(what: str, probe: Any, timeout: float, stack: Stack, interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = {n: p.returncode for n, p in stack.procs.items() if p.poll() is not None}
        if dead:
            pytest.fail(f"processes exited while waiting for {what}: {dead}\n{stack.logs_tail()}")
        try:
            result = probe()
        except (requests.ConnectionError, requests.Timeout):
            result = None
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{stack.logs_tail()}")


def run_dag(api: Api, dag_id: str, deadline: float) -> tuple[str, list[dict[str, Any]]]:
    api.json("PATCH", f"dags/{dag_id}", json={"is_paused": False})
    run = api.json("POST", f"dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": {}})
    run_id = run["dag_run_id"]

    def finished() -> str | None:
        state = api.json("GET", f"dags/{dag_id}/dagRuns/{run_id}")["state"]
        return state if state in ("success", "failed") else None

    state = wait_for(f"{dag_id} run {run_id}", finished, deadline - time.monotonic(), api.stack, 5.0)
    tis = api.json("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
    tis = tis["task_instances"]
    summary = {t["task_id"]: t["state"] for t in tis}
    assert state == "success", f"{dag_id} {run_id}: {state} {summary}\n{api.stack.logs_tail()}"
    return run_id, tis


def test_customers_then_orders_run_on_celery_workers(stack: Stack) -> None:
    started = time.monotonic()
    api = Api(stack)

    def healthy() -> bool:
        body = requests.get(f"{stack.api_url}/api/v2/monitor/health", timeout=10).json()
        return all(body.get(c, {}).get("status") == "healthy" for c in ("metadatabase", "scheduler"))

    wait_for("api-server and scheduler health", healthy, 180, stack)
    api.login(DOTENV["_AIRFLOW_WWW_USER_PASSWORD"])
    for dag_id in ("sync_customers", "sync_orders"):
        wait_for(f"{dag_id} parsed", lambda d=dag_id: api.call("GET", f"dags/{d}").ok, 180, stack)

    deadline = time.monotonic() + RUN_TIMEOUT
    runs = {dag_id: run_dag(api, dag_id, deadline) for dag_id in ("sync_customers", "sync_orders")}

    worker_logs = stack.log("airflow-worker-1") + stack.log("airflow-worker-2")
    host = socket.gethostname()
    for dag_id, (run_id, tis) in runs.items():
        assert tis, f"{dag_id}: no task instances"
        for ti in tis:
            where = f"{dag_id}.{ti['task_id']}"
            assert ti["state"] == "success", where
            assert ti["queue"] == "default", f"{where}: queue {ti['queue']}"
            assert ti["hostname"] == host, f"{where}: hostname {ti['hostname']}"
            assert ti["pid"], f"{where}: no pid"
            # the Celery executor's worker-side line for this very task instance
            assert f"task_id='{ti['task_id']}', dag_id='{dag_id}', run_id='{run_id}'" in worker_logs, (
                f"{where} not executed by a Celery worker\n{worker_logs[-3000:]}"
            )
    assert "Executing workload in Celery" in worker_logs
    print(f"celery topology: both runs succeeded in {time.monotonic() - started:.0f}s after start-up")
