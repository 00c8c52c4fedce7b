"""The docker-compose topology as loopback processes: shared by the deploy tests and the Celery
benchmark (``benchmarks/bench_celery_workers.py``).

:func:`topology` creates fresh PostgreSQL databases (Airflow metadata, sync state, ERP) and a
Redis db, starts the Dataverse sandbox, runs the compose file's airflow-init script (migrations,
pool, password file, ERP seed + tidy), then api-server, scheduler, dag-processor, triggerer and
``workers`` times ``airflow celery worker``, each in its own session; on exit every process group is
ended and the databases dropped. Every setting comes from the compose file through
:mod:`tests.deploy.compose`; ``overrides`` are scenario tunables added on top (heartbeat
timeouts, retry delays), never a replacement for a compose setting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import SERVICES
from tests.deploy import compose

BIN = Path(sys.executable).parent
PROCESSES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_admin(sql: str) -> None:
    import psycopg2

    host, port = SERVICES["postgres"]
    conn = psycopg2.connect(host=host, port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def flush_redis(db: int) -> None:
    import redis

    host, port = SERVICES["redis"]
    client = redis.Redis(host=host, port=port, db=db)
    try:
        client.flushdb()
    finally:
        client.close()


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    api_url: str
    redis_db: int
    databases: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    killed: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sandbox: Any = None
    erp_odbc: str = ""

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

    @property
    def workers(self) -> list[str]:
        return [name for name in self.procs if name.startswith("airflow-worker-")]

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-chars:]}" for n in self.procs)

    def kill(self, name: str) -> None:
        """SIGKILL one process group (a crashed worker: no warm shutdown, no task clean-up); it
        then no longer counts as a process that must stay up."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.killed[name] = proc

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


@contextlib.contextmanager
def topology(
    tmp: Path,
    dotenv: Mapping[str, str],
    *,
    name: str = "",
    workers: int = 2,
    overrides: Mapping[str, str] | None = None,
    sandbox_seed: int = 40,
    sandbox_limits: dict[str, Any] | None = None,
    init_timeout: float = 300.0,
) -> Iterator[Stack]:
    """The compose topology on loopback (see the module doc); ``name`` keeps the databases and the
    Redis db of two stacks of one process apart."""
    from d365sync.sandbox.dataverse.process import DataverseSandbox

    (tmp / "airflow" / "auth").mkdir(parents=True)
    (tmp / "dataverse").mkdir()
    suffix = f"{name}_{os.getpid()}" if name else str(os.getpid())
    redis_db = 1 + (os.getpid() + sum(map(ord, name))) % 15
    databases = [f"airflow_ci_{suffix}", f"state_ci_{suffix}", f"erp_ci_{suffix}"]
    secret = {**compose.SECRETS, **dotenv}["DATAVERSE_CLIENT_SECRET"]
    sandbox = DataverseSandbox(
        tmp / "dataverse", seed=sandbox_seed, limits=sandbox_limits, client_secret=secret
    )
    api_port = free_port()
    local = localizer(tmp, suffix, sandbox.port, api_port, redis_db)
    env = {**base_environment(), **local.environment(compose.common_environment(dotenv)), **(overrides or {})}
    stack = Stack(tmp, env, f"http://127.0.0.1:{api_port}", redis_db, databases, sandbox=sandbox)
    try:
        for db in databases:
            pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            pg_admin(f'CREATE DATABASE "{db}"')
        flush_redis(redis_db)
        # airflow-init: the compose service's own script with its own environment, localized
        init_env = local.environment(compose.service_environment("airflow-init", dotenv))
        stack.erp_odbc = init_env["ERP_ODBC"]
        script = compose.service_command("airflow-init", dotenv)
        assert isinstance(script, list) and script[0] == "-c"
        init = subprocess.run(
            ["bash", "-c", local.text(script[1])],  # container paths -> repo and temp dirs
            env={**env, **init_env, **(overrides or {})},
            capture_output=True,
            text=True,
            timeout=init_timeout,
            cwd=tmp,
        )
        assert init.returncode == 0, f"airflow-init failed\n{init.stdout[-4000:]}\n{init.stderr[-6000:]}"
        for process in PROCESSES:
            command = compose.service_command(process, dotenv)
            assert isinstance(command, str)
            # what the service adds to x-airflow-common (the api-server: the webhook receiver's key)
            own = local.environment(compose.service_environment(process, dotenv))
            stack.start(process, command.split(), **{**own, **(overrides or {})})
        worker = compose.service_command("airflow-worker", dotenv)
        assert isinstance(worker, str)
        worker_env = {
            **local.environment(compose.service_environment("airflow-worker", dotenv)),
            **(overrides or {}),
        }
        for n in range(1, workers + 1):
            extra = {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())} if n > 1 else {}
            stack.start(
                f"airflow-worker-{n}",
                [*worker.split(), "--celery-hostname", f"worker{n}@%h"],
                **{**worker_env, **extra},
            )
        yield stack
    finally:
        stack.stop()
        sandbox.stop()
        flush_redis(redis_db)
        for db in databases:
            pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


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

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        tis = self.json("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return list(tis["task_instances"])


def wait_for(what: str, probe: Callable[[], Any], timeout: float, stack: Stack, interval: float = 2.0) -> Any:
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


def wait_ready(stack: Stack, api: Api, password: str, dag_ids: tuple[str, ...], timeout: float = 180) -> None:
    """api-server and scheduler healthy, logged in, and every DAG in ``dag_ids`` parsed."""

    def healthy() -> bool:
        body = requests.get(f"{stack.api_url}/api/v2/monitor/health", timeout=10).json()
        return all(body.get(c, {}).get("status") == "healthy" for c in ("metadatabase", "scheduler"))

    wait_for("api-server and scheduler health", healthy, timeout, stack)
    api.login(password)
    for dag_id in dag_ids:
        wait_for(f"{dag_id} parsed", lambda d=dag_id: api.call("GET", f"dags/{d}").ok, timeout, stack)


def unpause(api: Api, dag_id: str) -> None:
    """Unpause ``dag_id``. With ``catchup=False`` the scheduler then also creates a run for the
    latest complete schedule interval (a ``scheduled__`` run) besides any manual one."""
    api.json("PATCH", f"dags/{dag_id}", json={"is_paused": False})


def dag_runs(api: Api, dag_id: str) -> list[dict[str, Any]]:
    runs = api.json("GET", f"dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"})
    return list(runs["dag_runs"])


def trigger(api: Api, dag_id: str) -> str:
    """Unpause ``dag_id`` and start a manual run; its run id."""
    unpause(api, dag_id)
    run = api.json("POST", f"dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": {}})
    return str(run["dag_run_id"])


def wait_run(
    api: Api, dag_id: str, run_id: str, deadline: float, interval: float = 5.0
) -> tuple[str, list[dict[str, Any]]]:
    """Wait for the run to finish; (state, task instances)."""

    def finished() -> str | None:
        state = api.json("GET", f"dags/{dag_id}/dagRuns/{run_id}")["state"]
        return state if state in ("success", "failed") else None

    state = wait_for(f"{dag_id} run {run_id}", finished, deadline - time.monotonic(), api.stack, interval)
    return str(state), api.task_instances(dag_id, run_id)


def run_dag(api: Api, dag_id: str, deadline: float) -> tuple[str, list[dict[str, Any]]]:
    """Trigger ``dag_id``, wait, and require success; (run id, task instances)."""
    run_id = trigger(api, dag_id)
    state, tis = wait_run(api, dag_id, run_id, deadline)
    summary = {t["task_id"]: t["state"] for t in tis}
    assert state == "success", f"{dag_id} {run_id}: {state} {summary}\n{api.stack.logs_tail()}"
    return run_id, tis


def account_numbers(stack: Stack) -> list[str]:
    """Every account's accountnumber in the sandbox, through the Web API."""
    sandbox = stack.sandbox
    url: str | None = f"{sandbox.api_url}/accounts?$select=accountnumber"
    numbers: list[str] = []
    while url:
        response = requests.get(url, headers=sandbox.headers(Prefer="odata.maxpagesize=5000"), timeout=60)
        assert response.ok, response.text
        body = response.json()
        numbers += [row["accountnumber"] for row in body["value"]]
        url = body.get("@odata.nextLink")
    return numbers


def state_store(stack: Stack) -> Any:
    """The sync-state store the stack's tasks use (from its ``AIRFLOW_CONN_SYNC_STATE_DEFAULT``)."""
    from d365sync.engine import connections
    from d365sync.engine.state import StateStore

    url, schema = connections.state_url(connections.from_env(connections.STATE_CONN, stack.env))
    return StateStore.open(url, schema=schema)


def executed_line(dag_id: str, run_id: str, task_id: str) -> str:
    """What the Celery worker logs (in its workload repr) when it executes this task instance."""
    return f"task_id='{task_id}', dag_id='{dag_id}', run_id='{run_id}'"
