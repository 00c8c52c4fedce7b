"""Airflow on LocalExecutor as four separate processes that a test can kill and restart.

``airflow standalone`` runs the components as threads of one parent, so one of them cannot be
killed and brought back alone. :func:`components` does what standalone does (migrate the
metadata DB, LocalExecutor, SimpleAuthManager with a passwords file) and then starts the
api-server, scheduler, dag-processor and triggerer, each in a session of its own with its own log.
:meth:`Components.kill` SIGKILLs one component's process group (the way a crash or an OOM kill
ends it: no shutdown hook runs) and :meth:`Components.start` brings it back with the same
settings. Used by ``tests/dags/test_event_runs.py`` and ``benchmarks/bench_event_latency.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from d365sync.dynamics.webhooks import MESSAGES, register_webhook
from d365sync.engine.state import StateStore
from d365sync.sandbox.erp import sqlite_airflow_connection
from d365sync.spec import load_entities
from d365sync.webhook_cli import tables_for
from tests.browser.conftest import (
    REPLAY_DAG,
    STARTUP_TIMEOUT,
    USERS,
    AirflowServer,
    _env,
    _free_port,
    _healthy,
    _stop,
)
from tests.dags.conftest import BIN
from tests.integration.pipeline_env import ENTITIES, Env

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


class StackError(RuntimeError):
    """A component did not start, or exited; the message carries its log's tail."""


@dataclass
class Components(AirflowServer):
    """A running LocalExecutor stack: :class:`AirflowServer` plus one process per component."""

    env: dict[str, str] = field(default_factory=dict, repr=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    def rest(self, method: str, path: str, user: str = "alice", **kwargs: Any) -> Any:
        """``/api/v2/<path>`` as ``user``; the JSON answer (asserts a 2xx)."""
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        response = httpx.request(method, f"{self.url}/api/v2/{path}", headers=headers, timeout=30, **kwargs)
        assert response.status_code < 300, response.text
        return response.json()

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        """The DAG's runs, oldest first (the newest 1000)."""
        return self.rest("GET", f"dags/{dag_id}/dagRuns?limit=1000&order_by=start_date")["dag_runs"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        tis = self.rest("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {t["task_id"]: t["state"] for t in tis}

    def settled(self, dag_id: str) -> bool:
        """No run of the DAG is queued or running."""
        return all(r["state"] in ("success", "failed") for r in self.runs(dag_id))

    def unpause(self, dag_id: str) -> None:
        self.rest("PATCH", f"dags/{dag_id}", json={"is_paused": False})

    def start(self, name: str) -> None:
        """Start ``name`` (one of :data:`COMPONENTS`) in a session of its own; its log appends."""
        with (self.home / f"{name}.log").open("ab") as out:
            self.procs[name] = subprocess.Popen(
                [str(BIN / "airflow"), name],
                env=self.env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, name: str) -> None:
        """SIGKILL ``name``'s whole process group: task and trigger children go with it."""
        proc = self.procs.pop(name)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Until ``/monitor/health`` reports every component healthy (and the API answers)."""
        deadline = time.monotonic() + timeout
        while not _healthy(self.url):
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise StackError(f"airflow {name} exited {proc.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"not healthy after {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.5)  # polling interval of a readiness probe, not synchronisation

    def stop(self) -> None:
        for proc in self.procs.values():
            _stop(proc)
        self.procs.clear()

    def log_tail(self, chars: int = 6000) -> str:
        per = max(chars // len(COMPONENTS), 500)
        parts = []
        for name in COMPONENTS:
            path = self.home / f"{name}.log"
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-per:]}")
        return "\n".join(parts)


@contextmanager
def components(
    home: Path,
    store: tuple[StateStore, str],
    extra_env: Mapping[str, str] | None = None,
    users: Mapping[str, str] = USERS,
    artifacts: Path | None = None,
) -> Iterator[Components]:
    """Migrate, start the four components, wait until healthy and the DAGs are parsed; stop all on
    exit (their logs are copied to ``artifacts`` when given). ``users`` must include ``alice``."""
    passwords = {user: secrets.token_urlsafe(12) for user in users}
    passwords_file = home / "passwords.json"
    passwords_file.write_text(json.dumps(passwords))
    port = _free_port()
    env = {
        **_env(home, port, passwords_file, store[1], users),
        **(extra_env or {}),
    }
    migrate = subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"], env=env, cwd=home, capture_output=True, timeout=600
    )
    if migrate.returncode:
        raise StackError(f"airflow db migrate exited {migrate.returncode}\n{migrate.stdout[-4000:]!r}")
    stack = Components(f"http://127.0.0.1:{port}", home, passwords, store[0], home / "scheduler.log", env)
    try:
        for name in COMPONENTS:
            stack.start(name)
        stack.wait_healthy()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:  # the DAG processor's first pass: DAGs known to the API
            try:
                stack.api("alice", f"dags/{REPLAY_DAG}")
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise StackError(f"DAG {REPLAY_DAG} not parsed\n{stack.log_tail()}") from None
                time.sleep(0.5)
        yield stack
    finally:
        stack.stop()
        if artifacts is not None:
            for name in COMPONENTS:
                if (home / f"{name}.log").exists():
                    shutil.copyfile(home / f"{name}.log", artifacts / f"airflow-{name}.log")


def entity_files(target: Path, events: Mapping[str, str | None], source: Path = ENTITIES) -> Path:
    """A copy of the entity files in ``target`` with each named entity's ``events:`` line set to
    the given YAML flow mapping (``None``: the line removed, the entity cron-only)."""
    shutil.copytree(source, target)
    for name, line in events.items():
        path = target / f"{name}.yaml"
        kept = [row for row in path.read_text(encoding="utf-8").splitlines() if not row.startswith("events:")]
        at = next(i for i, row in enumerate(kept) if row.startswith("schedule:")) + 1
        if line is not None:
            kept.insert(at, f"events: {line}")
        path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    specs = load_entities(target)
    for name, line in events.items():
        assert specs[name].events.enabled == (line is not None), name
    return target


def sync_settings(env: Env, folder: Path, entities: Path, webhook_key: str) -> dict[str, str]:
    """The sync's settings for Airflow on ``env``: connections to its sandbox, its SQLite ERP and
    state store in ``folder``, these entity files, this webhook key, staging under ``folder``."""
    return {
        "AIRFLOW_CONN_DYNAMICS_DEFAULT": json.dumps(env.sandbox.airflow_connection()),
        "AIRFLOW_CONN_ERP_DEFAULT": json.dumps(sqlite_airflow_connection(folder / "erp.db")),
        "AIRFLOW_CONN_SYNC_STATE_DEFAULT": json.dumps(
            {"conn_type": "sqlite", "host": str(folder / "state.db")}
        ),
        "D365SYNC_ENTITIES_DIR": str(entities),
        "D365SYNC_WEBHOOK_KEY": webhook_key,
        "D365SYNC_STAGING_ROOT": f"file://{folder / 'staging'}",
    }


def ready_for_events(
    stack: Components, env: Env, key: str, entities: tuple[str, ...] = ("customers",)
) -> None:
    """What ``make demo`` does once Airflow is up: the ``dynamics_api`` pool, and the Dataverse
    webhook of ``entities`` registered through the Web API, calling the stack's receiver."""
    specs = load_entities(Path(stack.env["D365SYNC_ENTITIES_DIR"]))
    register_webhook(
        env.dynamics,
        name="d365sync",
        url=f"{stack.url}/d365sync/events/dataverse",
        key=key,
        tables=tables_for({name: specs[name] for name in entities}, MESSAGES),
    )
    pool = [str(BIN / "airflow"), "pools", "set", "dynamics_api", "2", "Dataverse Web API"]
    subprocess.run(pool, env=stack.env, cwd=stack.home, check=True, capture_output=True, timeout=120)
