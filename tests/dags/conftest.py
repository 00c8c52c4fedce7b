"""Fixtures for the DAG tests: a migrated Airflow metadata DB in a temp ``AIRFLOW_HOME``.

Airflow reads ``AIRFLOW_HOME`` and builds its SQLAlchemy engine when ``airflow`` is first
imported, and other test modules import it at collection time. So every ``dag.test()`` runs in a
child process (``python -m d365sync.airflow.runner``) with a clean environment: the temp home,
``AIRFLOW__CORE__DAGS_FOLDER`` = the repo's ``dags/`` (``dag.test()`` needs the file there),
examples off, and a SQLite metadata DB migrated once per session (``airflow db migrate``). A
child process is also what lets a test kill a task mid-load for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MIGRATED = "airflow.db.migrated"  # the session's metadata DB as `airflow db migrate` left it
DAGS_FOLDER = REPO / "dags"
BIN = Path(sys.executable).parent
# The tasks of every entity DAG, in the order they run.
ENTITY_TASKS = [
    "extract_dynamics",
    "extract_erp",
    "validate",
    "transform",
    "resolve",
    "load_erp",
    "load_dynamics",
    "commit_state",
    "report",
]
# Entities with ``events`` (customers, orders) run a branch first: the fast lane or the chain above.
EVENT_TASKS = ["route", "sync_events"]
FAST_LANE = ["sync_events"]


def lane_of(tasks: Mapping[str, str]) -> str:
    """The lane a successful entity run took, ``"staged"`` or ``"fast"``, from its task states
    (task id → state); fails unless they are exactly one of these:

    * no ``route`` (an entity without ``events``): every task of the chain ``success``;
    * ``route`` ``success`` and every task of one lane ``success``, every task of the lane it did
      not take ``skipped`` (the chain for the fast lane, ``sync_events`` for the chain).

    A mapped task's instances (``load_dynamics[0]``, ``[1]``…) count as the task when they all
    share one state.
    """
    states: dict[str, str] = {}
    for name, state in tasks.items():
        task_id = name.split("[", 1)[0]
        states[task_id] = state if states.get(task_id, state) == state else f"mixed: {dict(tasks)}"
    if "route" not in states:
        assert states == dict.fromkeys(ENTITY_TASKS, "success"), states
        return "staged"
    staged = {
        "route": "success",
        **dict.fromkeys(ENTITY_TASKS, "success"),
        **dict.fromkeys(FAST_LANE, "skipped"),
    }
    fast = {
        "route": "success",
        **dict.fromkeys(ENTITY_TASKS, "skipped"),
        **dict.fromkeys(FAST_LANE, "success"),
    }
    assert states in (staged, fast), states
    return "staged" if states == staged else "fast"


# The triggering_user_name dag.test() records for its run (airflow.sdk DAG.test): the user whose role
# the operations DAGs check (d365sync.airflow.tasks.acting_user).
DAG_TEST_USER = "dag_test"

# Warnings a child run may report that are not ours to fix (checked by AirflowEnv.run).
FOREIGN_WARNING_PATHS = ("/site-packages/",)


#: what ``make demo`` runs: the LocalExecutor with GX preloaded before its workers fork
WARM_EXECUTOR = "d365sync.airflow.executor.WarmLocalExecutor"


def airflow_base_env(home: Path) -> dict[str, str]:
    """Environment for Airflow child processes: temp home, repo dags, examples off, SQLite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "D365SYNC_STAGING_ROOT": f"file://{home / 'staging'}",
            "D365SYNC_TASK_RETRIES": "0",
            "PYTHONWARNINGS": "default",
        }
    )
    return env


def triggered_as(role: str | None, *others: str) -> dict[str, str]:
    """Env making ``dag.test()``'s triggering user a SimpleAuthManager user with ``role`` (None: not
    an Airflow user at all), plus ``others`` (``"alice:op"``): for the operations DAGs."""
    users = [*others, *([f"{DAG_TEST_USER}:{role}"] if role else [])]
    return {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(users)}


@dataclass
class RunResult:
    """One DAG run as the runner reports it."""

    dag_id: str
    state: str
    run_id: str
    tasks: dict[str, str]
    report: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    log: str = field(repr=False, default="")

    def __repr__(self) -> str:  # failed assertions show the task states and the log's tail
        failed = {t: s for t, s in self.tasks.items() if s not in ("success", "skipped")}
        tail = "" if not failed else "\n--- log tail ---\n" + self.log[-6000:]
        return f"RunResult({self.dag_id}: {self.state}, not successful: {failed}){tail}"


@dataclass
class AirflowEnv:
    """A migrated Airflow home and helpers that run DAGs through ``dag.test()`` in a child process."""

    home: Path
    env: dict[str, str]

    def with_env(self, **extra: str) -> AirflowEnv:
        return AirflowEnv(self.home, {**self.env, **extra})

    def own_home(self, home: Path) -> AirflowEnv:
        """This session's settings on a home of its own, holding a copy of the metadata DB as it
        was just migrated: no DAG version, run or stack of another module writes there. For a
        test that reads back what one command wrote (a copy costs nothing; a migration does)."""
        home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.home / MIGRATED, home / "airflow.db")
        return AirflowEnv(home, {**self.env, **airflow_base_env(home)})

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``airflow <args>`` against this home."""
        return subprocess.run(
            [str(BIN / "airflow"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def runner(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        """Start ``python -m d365sync.airflow.runner --json <args>`` (the caller waits or kills it)."""
        return subprocess.Popen(
            [sys.executable, "-m", "d365sync.airflow.runner", "--json", *args],
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def run(
        self,
        *dag_ids: str,
        conf: Mapping[str, Any] | None = None,
        logical_date: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
    ) -> list[RunResult]:
        """``dag.test()`` each DAG in order; fails the test on a child error or one of our warnings."""
        args = [*dag_ids]
        if conf is not None:
            args += ["--conf", json.dumps(conf)]
        if logical_date is not None:
            args += ["--logical-date", logical_date]
        proc = self.runner(*args, env=env)
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode not in (0, 1):
            pytest.fail(f"runner exited {proc.returncode}\n--- stderr ---\n{err[-8000:]}")
        lines = out.strip().splitlines()
        payload = json.loads(lines[-1])
        err = "\n".join(lines[:-1]) + "\n" + err
        ours = [w for w in payload["warnings"] if not any(p in w["filename"] for p in FOREIGN_WARNING_PATHS)]
        assert ours == [], f"warnings from project code: {ours}"
        return [
            RunResult(r["dag_id"], r["state"], r["run_id"], r["tasks"], r.get("report"), r, err)
            for r in payload["runs"]
        ]


def assert_success(runs: list[RunResult]) -> None:
    """Every run succeeded; an entity run (``dag.test()``: a manual run) took the staged chain, every
    task of it ``success`` and only the fast lane ``skipped`` (:func:`lane_of`). Fails with the
    failed tasks and the child's log tail (pytest truncates long reprs)."""
    bad = [r for r in runs if r.state != "success"]
    if bad:
        pytest.fail("\n".join(repr(r) for r in bad), pytrace=False)
    for run in runs:
        if run.dag_id.startswith("sync_"):
            assert lane_of(run.tasks) == "staged", run.tasks


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> AirflowEnv:
    """A temp AIRFLOW_HOME with a migrated SQLite metadata DB (migrated once per session)."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = airflow_base_env(home)
    done = subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    shutil.copyfile(home / "airflow.db", home / MIGRATED)  # for AirflowEnv.own_home
    return AirflowEnv(home, env)


@pytest.fixture
def no_airflow_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Drop D365SYNC_* settings from the environment so defaults apply."""
    for name in list(os.environ):
        if name.startswith("D365SYNC_"):
            monkeypatch.delenv(name)
    yield
