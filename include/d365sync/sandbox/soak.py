"""The soak: a real Airflow scheduler syncs both systems every minute while users edit them.

``d365sync soak --duration 30m`` (``make soak``; the CI test ``tests/soak`` runs a short one):

1. **Stack** in a work directory: the Dataverse sandbox (seeded), a SQLite ERP over ODBC (seeded,
   then ``seeder.tidy`` as the demo does), a SQLite state store (migrated before any task runs,
   as the compose ``airflow-init`` does), and Airflow on a fresh ``AIRFLOW_HOME`` (SQLite
   metadata DB, WarmLocalExecutor as ``make demo``, ``parallelism`` 4): ``api-server``,
   ``scheduler`` and ``dag-processor``, each in its own process group, all stopped at the end.
   Every entity DAG runs on ``D365SYNC_SCHEDULE_OVERRIDE`` (``* * * * *``); the operations DAGs
   stay paused; no triggerer (deadline alerts are off), so the shipped entities' ``events``
   (webhook, ERP polling) start nothing here: the soak exercises the cron, the safety net that
   event runs ride on (those are ``tests/dags/test_event_runs.py``'s). An entity run its upstream's
   commit starts (orders after customers) is event-started all the same and takes the fast lane
   ``sync_events`` when its entity has events; the scheduled ones take the staged chain.
2. **Baseline**: every entity DAG is unpaused; the runner waits for one full cycle (below) and
   notes what is pending then (the legacy seed's dirt that ``tidy`` leaves: invalid e-mails,
   duplicate customers) — the simulator never touches those records.
3. **Users**: :class:`~d365sync.sandbox.simulator.Simulator` edits both systems for the duration
   and injects the bad values. Afterwards the runner waits until a run of each affected entity
   that *started after* its last bad value finished, then checks that each bad record sits in the
   dead-letter queue with a reason.
4. **Fix**: ``Simulator.fix()`` repairs each bad value at its source; the runner waits for one
   more full cycle that started after the fix. Runs that started before the fix never count.
5. **Drain**: the *cutoff* is the moment that cycle was complete; every run that started before
   it must finish. The DAGs stay unpaused (the scheduler skips paused DAGs, so pausing would
   freeze a running run half-way); a run that started after the cutoff is "in flight", not judged.
6. **Report**: every DAG run and its verdict (from the REST API), failed runs with the failing task
   and the error line of its log, tries beyond the first, dead letters by entity/stage/reason,
   what is pending, and a drift compare of both systems (``engine.reconcile.compare``; the runs
   still going then have nothing left to write once the systems converged).

A **cycle** after time *T*: for each entity in dependency order (the DAGs' own asset schedules:
orders after customers), a *finished* run whose ``start_date`` is after *T* and after the cycle's
run of every upstream entity committed (its ``commit_state``, or in a fast-lane run its
``sync_events``, ended: the key map moved and the asset fired). A run still queued or running is
never mistaken for a finished one: only ``success`` and ``failed`` are final.

Checks (the exit status is non-zero if any fails): every DAG run green; each bad value
dead-lettered with a reason; each fixed value synced to the other system with nothing pending
on its record; nothing pending that was not pending at the baseline; both systems agree except on
pending keys (and on records one side keeps by design: ``creates`` off in that direction);
every user edit accepted; every wait finished in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

#: the LocalExecutor with GX preloaded before its workers fork (d365sync.airflow.executor), as ``make demo``
WARM_EXECUTOR = "d365sync.airflow.executor.WarmLocalExecutor"
log = logging.getLogger(__name__)

INCLUDE = Path(__file__).resolve().parents[2]
DAGS_FOLDER = INCLUDE.parent / "dags"
DAG_PREFIX = "sync_"  # d365sync.airflow.dag_factory.DAG_PREFIX (this module stays Airflow-free)
ASSET_PREFIX = "d365sync_"  # dag_factory.entity_asset: an entity DAG's upstream, from its schedule
FINAL = ("success", "failed")
# The task whose end is an entity run's commit (key map moved, asset emitted): the staged chain's
# commit_state, or the fast lane's one task (dag_factory: route takes one, the other is skipped).
COMMIT_TASKS = ("commit_state", "sync_events")
STARTUP_TIMEOUT = 240.0
POLL = 5.0
# AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS of the soak's Airflow processes: SQLite metadata DB
# writers (scheduler, dag-processor, api-server) wait up to 30 s for a lock instead of 5 s, so a
# busy 2-core machine shows the sync's behaviour rather than "database is locked".
SQLITE_CONNECT_ARGS: dict[str, Any] = {"timeout": 30}


# ------------------------------------------------------------------------------ options
@dataclass
class SoakOptions:
    """What to run; the defaults are the CI test's small soak."""

    duration: float = 180.0  # seconds of user activity
    workdir: Path | None = None  # default: a new var/soak-<time> directory
    erp_rows: int = 40  # ERP customers (orders = rows / 2, items = max(50, rows / 100))
    dataverse_accounts: int = 20  # seeded Dataverse accounts (+ products, orders, invoices)
    rate_per_minute: float = 6.0  # user edits per minute
    bad_per_kind: int = 1  # bad values of each kind
    schedule: str = "* * * * *"
    parallelism: int = 4
    pool_slots: int = 2
    task_retries: int = 1
    retry_delay_seconds: int = 5
    phase_timeout: float = 1200.0  # each wait: baseline cycle, bad values seen, post-fix cycle, drain
    seed: int = 7
    dags_folder: Path = DAGS_FOLDER
    entities_dir: Path | None = None


# ------------------------------------------------------------------------------- report
@dataclass
class TaskFailure:
    task_id: str
    try_number: int
    state: str
    error: str


@dataclass
class RunInfo:
    dag_id: str
    run_id: str
    state: str
    run_type: str
    queued_at: str | None
    start_date: str | None
    end_date: str | None
    failures: list[TaskFailure] = field(default_factory=list)
    report_error: str | None = None  # the state store's run report (record_failed_run)
    # success | failed | stuck (not finished though it started before the cutoff) |
    # in flight (started after the cutoff, or not started: not judged)
    verdict: str = ""


@dataclass
class Check:
    id: str  # stable: harness, waits, runs_green, bad_dead_lettered, fix_syncs, nothing_pending,
    # systems_agree, edits_accepted
    name: str
    ok: bool
    details: list[str] = field(default_factory=list)


@dataclass
class SoakReport:
    options: dict[str, Any]
    workdir: str
    started_at: str = ""
    finished_at: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    waits: dict[str, str] = field(default_factory=dict)  # phase → "ok" or what was missing
    runs: list[RunInfo] = field(default_factory=list)
    retried_tasks: list[str] = field(default_factory=list)
    simulator: dict[str, Any] = field(default_factory=dict)
    bad_values: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)  # pending at the end
    baseline_pending: list[str] = field(default_factory=list)
    new_pending: list[str] = field(default_factory=list)
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline_drift: dict[str, Any] = field(default_factory=dict)  # entity → items after the first sync
    checks: list[Check] = field(default_factory=list)
    error: str | None = None  # the harness itself failed (a process died, a system refused to start)
    cutoff: str | None = None  # when the post-fix cycle was complete: runs started before it are judged

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def render(self) -> str:
        return "\n".join(_render(self))


# ------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse_duration(text: str) -> float:
    """``90s``, ``3m``, ``1.5h``, or plain seconds → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 2h)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def _when(text: str | None) -> datetime | None:
    return None if not text else datetime.fromisoformat(text.replace("Z", "+00:00"))


def _now() -> datetime:
    return datetime.now(UTC)


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60}m{whole % 60:02d}s"


def stop_group(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM the process group, wait for it to empty, then SIGKILL what is left (by group id)."""

    def alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    if alive():
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (proc.poll() is None or alive()):
            time.sleep(0.2)
        if alive():
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- Airflow API
class AirflowApi:
    """The REST API as the admin user (SimpleAuthManager); logs in again when the token expires."""

    def __init__(self, url: str, password: str) -> None:
        import requests

        self.url, self.password = url, password
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def login(self) -> None:
        response = self.session.post(
            f"{self.url}/auth/token", json={"username": "admin", "password": self.password}, timeout=30
        )
        response.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def call(self, method: str, path: str, attempts: int = 6, **kw: Any) -> Any:
        """One API call; logs in again on 401, retries 5xx and connection errors (a busy SQLite
        metadata DB answers 500 when a write waited too long for its lock)."""
        import requests

        for attempt in range(1, attempts + 1):
            try:
                response = self.session.request(method, f"{self.url}/api/v2/{path}", timeout=60, **kw)
            except requests.RequestException:
                if attempt == attempts:
                    raise
                time.sleep(2 * attempt)
                continue
            if response.status_code == 401:
                self.login()
                continue
            if response.status_code >= 500 and attempt < attempts:
                log.warning("soak: %s %s answered %s; retrying", method, path, response.status_code)
                time.sleep(2 * attempt)
                continue
            response.raise_for_status()
            return response.json()
        raise RuntimeError(f"{method} {path}: no answer after {attempts} attempts")

    def exists(self, dag_id: str) -> bool:
        import requests

        try:
            self.call("GET", f"dags/{dag_id}", attempts=1)
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                return False
            raise
        return True

    def pages(self, path: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            body = self.call("GET", path, params={**params, "limit": 100, "offset": offset})
            rows = body[key]
            yield from rows
            offset += len(rows)
            if not rows or offset >= body.get("total_entries", 0):
                return

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return list(self.pages(f"dags/{dag_id}/dagRuns", "dag_runs", order_by="run_after"))

    def task_instances(self, dag_id: str, run_id: str = "~") -> list[dict[str, Any]]:
        path = f"dags/{dag_id}/dagRuns/{quote(run_id, safe='~')}/taskInstances"
        return list(self.pages(path, "task_instances"))

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self.call("PATCH", f"dags/{dag_id}", json={"is_paused": paused})

    def upstream(self, dag_id: str) -> set[str]:
        """Entities whose asset this DAG's schedule waits on (orders → customers)."""
        details = self.call("GET", f"dags/{dag_id}/details")
        names: set[str] = set()
        _asset_names(details.get("asset_expression"), names)
        return {n.removeprefix(ASSET_PREFIX) for n in names if n.startswith(ASSET_PREFIX)}

    def timetable(self, dag_id: str) -> str:
        return str(self.call("GET", f"dags/{dag_id}/details").get("timetable_summary") or "")


def _asset_names(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str):
            out.add(name)
        for value in node.values():
            _asset_names(value, out)
    elif isinstance(node, list):
        for value in node:
            _asset_names(value, out)


# ------------------------------------------------------------------------------- stack
@dataclass
class Stack:
    """The running systems and their connections."""

    workdir: Path
    home: Path
    env: dict[str, str]
    api: AirflowApi
    sandbox: Any
    erp_odbc: str
    state_url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def dynamics(self) -> Any:
        """A client acting as the sync's application user (what the DAGs use)."""
        return self.sandbox.client()

    def people(self) -> Any:
        """A client acting as the simulated people: their edits are not the sync's own."""
        from d365sync.sandbox.dataverse.config import PERSON_USER

        return self.sandbox.client_as(PERSON_USER)

    def erp(self) -> Any:
        from d365sync.erp import ErpClient

        return ErpClient(self.erp_odbc)

    def store(self) -> Any:
        from d365sync.engine.privacy import Privacy
        from d365sync.engine.state import StateStore

        return StateStore.open(self.state_url, privacy=Privacy.from_keys(pii_key(self.workdir), "soak key"))

    def dead(self) -> dict[str, int]:
        return {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def airflow_env(
    opts: SoakOptions, workdir: Path, home: Path, port: int, conns: Mapping[str, str]
) -> dict[str, str]:
    """Environment of every Airflow process: nothing inherited from AIRFLOW_* or D365SYNC_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__", "D365SYNC_"))}
    bin_dir = str(Path(sys.executable).parent)
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(opts.dags_folder),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": f"{__name__}.SQLITE_CONNECT_ARGS",
        "AIRFLOW__CORE__EXECUTOR": WARM_EXECUTOR,
        "AIRFLOW__CORE__PARALLELISM": str(opts.parallelism),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(48),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "D365SYNC_SCHEDULE_OVERRIDE": opts.schedule,
        "D365SYNC_DEADLINE_ALERTS": "false",
        "D365SYNC_TASK_RETRIES": str(opts.task_retries),
        "D365SYNC_RETRY_DELAY_SECONDS": str(opts.retry_delay_seconds),
        "D365SYNC_MAX_RETRY_DELAY_SECONDS": str(opts.retry_delay_seconds * 4),
        "D365SYNC_STAGING_ROOT": f"file://{workdir / 'staging'}",
        "D365SYNC_PII_KEYS": pii_key(workdir),
        "NO_COLOR": "1",
        **conns,
    }
    if opts.entities_dir is not None:
        env["D365SYNC_ENTITIES_DIR"] = str(opts.entities_dir)
    return env


def pii_key(workdir: Path) -> str:
    """The soak's personal-data key, generated once into ``<workdir>/pii.key`` (mode 600)."""
    from d365sync.engine.privacy import generate_key

    path = workdir / "pii.key"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(generate_key())
    return path.read_text().strip()


@contextmanager
def stack(opts: SoakOptions, workdir: Path) -> Iterator[Stack]:
    """Start every system (see the module docstring); stop every process started, by group."""
    from d365sync.erp import ErpClient
    from d365sync.sandbox.dataverse.config import PERSON_USER
    from d365sync.sandbox.dataverse.process import DataverseSandbox
    from d365sync.sandbox.erp.seeder import init_sandbox, tidy

    home = workdir / "airflow"
    for folder in (home / "plugins", workdir / "logs", workdir / "dataverse", workdir / "staging"):
        folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        sandbox = DataverseSandbox(
            workdir / "dataverse", seed=opts.dataverse_accounts, extra_users=[PERSON_USER]
        )
        cleanup.callback(sandbox.stop)
        erp_odbc = f"DRIVER={{SQLite3}};Database={workdir / 'erp.db'};"
        with ErpClient(erp_odbc) as erp:
            init_sandbox(erp, rows=opts.erp_rows, seed=opts.seed)
            tidy(erp)
        state_url = f"sqlite:///{workdir / 'state.db'}"
        from d365sync.engine.state import StateStore

        StateStore.open(state_url).close()  # migrated once up front, as the compose airflow-init does
        conns = _connections(sandbox, workdir)
        port = free_port()
        env = airflow_env(opts, workdir, home, port, conns)
        password = secrets.token_urlsafe(12)
        (home / "passwords.json").write_text(json.dumps({"admin": password}))
        api = AirflowApi(f"http://127.0.0.1:{port}", password)
        cleanup.callback(api.close)
        _cli(env, workdir, "db", "migrate")
        with sqlite3.connect(home / "airflow.db") as conn:  # the runner reads while Airflow writes
            conn.execute("PRAGMA journal_mode=WAL")
        from d365sync.airflow.settings import dynamics_pool

        _cli(env, workdir, "pools", "set", dynamics_pool()[0], str(opts.pool_slots), "Dataverse API")
        running = Stack(workdir, home, env, api, sandbox, erp_odbc, state_url)
        for name in ("api-server", "scheduler", "dag-processor"):
            _start(running, name)
            cleanup.callback(stop_group, running.procs[name])
            if name == "api-server":  # task processes need the Execution API from the start
                _wait(running, "api-server health", lambda: _healthy(api.url), STARTUP_TIMEOUT)
        api.login()
        yield running


def _connections(sandbox: Any, workdir: Path) -> dict[str, str]:
    from d365sync.sandbox.erp import sqlite_airflow_connection

    state = {"conn_type": "sqlite", "host": str(workdir / "state.db")}
    return {
        "AIRFLOW_CONN_DYNAMICS_DEFAULT": json.dumps(sandbox.airflow_connection()),
        "AIRFLOW_CONN_ERP_DEFAULT": json.dumps(sqlite_airflow_connection(workdir / "erp.db")),
        "AIRFLOW_CONN_SYNC_STATE_DEFAULT": json.dumps(state),
    }


def _cli(env: Mapping[str, str], workdir: Path, *args: str) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args],
        env=dict(env),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _start(running: Stack, name: str) -> None:
    with (running.workdir / "logs" / f"{name}.log").open("ab") as out:
        running.procs[name] = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), name],
            env=running.env,
            cwd=running.workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_group ends it with its workers
        )


def _healthy(url: str) -> bool:
    import requests

    try:
        return requests.get(f"{url}/api/v2/monitor/health", timeout=5).ok
    except requests.RequestException:
        return False


def _wait(running: Stack, what: str, ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if dead := running.dead():
            name = next(iter(dead))
            raise RuntimeError(
                f"airflow {name} exited {dead[name]} waiting for {what}\n{running.log_tail(name)}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(1)


# ------------------------------------------------------------------------------ the soak
class Soak:
    """One soak over a running :class:`Stack`; :meth:`run` fills and returns the report."""

    def __init__(self, opts: SoakOptions, running: Stack, report: SoakReport) -> None:
        from d365sync.spec import load_entities

        self.opts, self.stack, self.report = opts, running, report
        self.specs = load_entities(opts.entities_dir or INCLUDE / "entities")
        self.dag_ids = {name: f"{DAG_PREFIX}{name}" for name in self.specs}
        self.upstream: dict[str, set[str]] = {}
        self.order: list[str] = []
        self.baseline: dict[str, set[tuple[str, ...]]] = {}
        self.before_fix: list[Any] = []  # dead letters pending right before the fix
        self._commits: dict[tuple[str, str], datetime | None] = {}
        self.cutoff: datetime | None = None  # runs that started before it are judged
        self.baseline_drift: dict[str, list[dict[str, Any]] | str] = {}
        self.sim: Any = None

    # -- phases ----------------------------------------------------------------------------
    def run(self) -> SoakReport:
        """The phases of the module docstring; whatever happened, collect what there is to report."""
        try:
            self._phases()
        finally:
            with self._phase("collect"):
                try:
                    self._collect()
                except Exception as exc:  # never hide the phases' own error behind this one
                    log.exception("soak: collecting the report failed")
                    self.report.checks.append(
                        Check("harness", "the report was collected", False, [f"{exc!r}"[:2000]])
                    )
        return self.report

    def _phases(self) -> None:
        api = self.stack.api
        with self._phase("dags parsed"):
            _wait(
                self.stack,
                "entity DAGs parsed",
                lambda: all(map(api.exists, self.dag_ids.values())),
                STARTUP_TIMEOUT,
            )
            self.upstream = {e: api.upstream(d) & set(self.specs) for e, d in self.dag_ids.items()}
            self.order = _dependency_order(self.upstream)
            # "* * * * *", or "Asset or * * * * *" for an entity that also runs after its upstream
            wrong = {
                d: s
                for d in self.dag_ids.values()
                if not (s := api.timetable(d)).endswith(self.opts.schedule)
            }
            if wrong:
                raise RuntimeError(f"D365SYNC_SCHEDULE_OVERRIDE not applied: {wrong}")
        unpaused = _now()
        for entity in self.order:
            api.set_paused(self.dag_ids[entity], False)
        with self._phase("baseline cycle"):
            self._wait_runs("baseline cycle", dict.fromkeys(self.order, unpaused), chain=True)
        self.baseline = self._pending()
        self.report.baseline_pending = _listing(self.baseline)
        self.baseline_drift = self._compare()
        with self._phase("users"):
            self._simulate()
        with self._phase("bad values seen"):
            seen: dict[str, datetime] = {}
            for bad in self.sim.bad:
                seen[bad.entity] = max(seen.get(bad.entity, bad.injected_at), bad.injected_at)
            self._wait_runs("bad values seen", seen, chain=False)
        self.before_fix = self._dead_letters()
        with self._phase("fix"):
            fixed_at = self._fix()
        with self._phase("post-fix cycle"):
            self._wait_runs("post-fix cycle", dict.fromkeys(self.order, fixed_at), chain=True)
        with self._phase("drain"):
            # No pausing: a paused DAG's running run is frozen mid-way (the scheduler skips paused
            # DAGs), so the DAGs keep running and the runs that started before the cutoff must end.
            self.cutoff = _now()
            self.report.cutoff = self.cutoff.isoformat()
            self._drain(self.cutoff)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        log.info("soak: %s…", name)
        try:
            yield
        finally:
            self.report.phases[name] = round(time.monotonic() - started, 1)

    def _simulate(self) -> None:
        from d365sync.sandbox.simulator import Simulator, SimulatorThread

        avoid = [(e, k) for e, k, *_ in self.baseline["dead_letters"] | self.baseline["parked"]]
        with ExitStack() as clients:
            dynamics = clients.enter_context(self.stack.people())
            erp = clients.enter_context(self.stack.erp())
            self.sim = Simulator(dynamics, erp, seed=self.opts.seed, avoid=avoid)
            runner = SimulatorThread(
                self.sim, self.opts.duration, self.opts.rate_per_minute, self.opts.bad_per_kind
            )
            runner.start()
            try:
                while runner.alive():
                    if dead := self.stack.dead():
                        raise RuntimeError(f"Airflow processes exited during the soak: {dead}")
                    runner.join(POLL)
            finally:
                runner.stop()
            if runner.error is not None:
                raise runner.error

    def _fix(self) -> datetime:
        with ExitStack() as clients:
            self.sim.dynamics = clients.enter_context(self.stack.people())
            self.sim.erp = clients.enter_context(self.stack.erp())
            self.sim.fix()
        return _now()

    # -- waiting for runs --------------------------------------------------------------------
    def _runs(self) -> dict[str, list[dict[str, Any]]]:
        return {e: self.stack.api.runs(d) for e, d in self.dag_ids.items()}

    def _wait_runs(self, phase: str, since: Mapping[str, datetime], *, chain: bool) -> None:
        """Until each entity in ``since`` has a finished run that started after its time (and, with
        ``chain``, after its upstream entities' runs of this wait ended)."""
        deadline = time.monotonic() + self.opts.phase_timeout
        while True:
            found = cycle(
                self._runs(), since, self.order, self.upstream, chain=chain, committed=self._committed
            )
            missing = [e for e in self.order if e in since and e not in found]
            if not missing:
                self.report.waits[phase] = "ok"
                return
            if dead := self.stack.dead():
                raise RuntimeError(f"Airflow processes exited during {phase}: {dead}")
            if time.monotonic() > deadline:
                self.report.waits[phase] = (
                    f"timed out after {self.opts.phase_timeout:.0f}s waiting for {missing}"
                )
                log.warning("soak: %s", self.report.waits[phase])
                return
            time.sleep(POLL)

    def _committed(self, entity: str, run: dict[str, Any]) -> datetime | None:
        """When the run's commit ended (None if it never did): ``commit_state`` of the staged chain,
        or ``sync_events``, the fast lane, which commits and emits the asset itself (the lane the
        run did not take is skipped); final runs are cached."""
        key = (entity, run["dag_run_id"])
        if key not in self._commits:
            tis = self.stack.api.task_instances(self.dag_ids[entity], run["dag_run_id"])
            ends = [
                _when(t["end_date"]) for t in tis if t["task_id"] in COMMIT_TASKS and t["state"] == "success"
            ]
            self._commits[key] = ends[0] if ends else None
        return self._commits[key]

    def _drain(self, cutoff: datetime) -> None:
        """Until every run that started before ``cutoff`` is finished."""
        deadline = time.monotonic() + self.opts.phase_timeout
        while True:
            running = [
                f"{d} {r['dag_run_id']}"
                for d in self.dag_ids.values()
                for r in self.stack.api.runs(d)
                if verdict(r, cutoff) == "stuck"
            ]
            if not running:
                self.report.waits["drain"] = "ok"
                return
            if time.monotonic() > deadline:
                self.report.waits["drain"] = f"still running after {self.opts.phase_timeout:.0f}s: {running}"
                return
            time.sleep(POLL)

    # -- state store -------------------------------------------------------------------------
    def _dead_letters(self, statuses: tuple[str, ...] = ("pending", "replay")) -> list[Any]:
        with self.stack.store() as store:
            return [d for s in statuses for d in store.dead_letters(status=s)]

    def _pending(self) -> dict[str, set[tuple[str, ...]]]:
        """What waits in the state store: dead letters, parked children, open reviews."""
        with self.stack.store() as store:
            letters = {
                (d.entity, d.record_key.strip(), d.stage)
                for s in ("pending", "replay")
                for d in store.dead_letters(status=s)
            }
            parked = {
                (e, c.record_key.strip(), c.parent_entity)
                for e in self.specs
                for c in store.parked_children(e)
            }
            reviews = {(r.entity, r.record_key.strip(), r.field) for r in store.reviews()}
        return {"dead_letters": letters, "parked": parked, "reviews": reviews}

    # -- collecting --------------------------------------------------------------------------
    def _collect(self) -> None:
        report = self.report
        report.runs = self._run_infos()
        report.simulator = self.sim.summary() if self.sim else {}
        pending = self._pending()
        report.new_pending = _listing({k: v - self.baseline.get(k, set()) for k, v in pending.items()})
        letters = self._dead_letters()
        report.dead_letters = [
            {
                "entity": d.entity,
                "key": d.record_key.strip(),
                "stage": d.stage,
                "status": d.status,
                "attempts": d.attempts,
                "error": d.error,
            }
            for d in letters
        ]
        pending_keys = {(e, k) for items in pending.values() for e, k, *_ in items}
        report.bad_values = self._bad_values(self.before_fix, pending) if self.sim else []
        report.drift = self._drift(pending_keys) if self.order else {}
        report.baseline_drift = {
            e: items if isinstance(items, str) else len(items) for e, items in self.baseline_drift.items()
        }
        report.checks = self._checks()

    def _run_infos(self) -> list[RunInfo]:
        api, infos = self.stack.api, []
        with self.stack.store() as store:
            for entity, dag_id in self.dag_ids.items():
                for run in api.runs(dag_id):
                    info = RunInfo(
                        dag_id,
                        run["dag_run_id"],
                        run["state"],
                        run["run_type"],
                        run["queued_at"],
                        run["start_date"],
                        run["end_date"],
                    )
                    info.verdict = verdict(run, self.cutoff or _now())
                    if info.verdict in ("failed", "stuck"):
                        info.failures = self._failures(dag_id, run["dag_run_id"])
                        stored = store.run_report(run["dag_run_id"], entity)
                        info.report_error = stored.error if stored is not None else None
                    infos.append(info)
                for ti in api.task_instances(dag_id):
                    if ti["try_number"] > 1:
                        tries = f"{ti['try_number']} tries, {ti['state']}"
                        self.report.retried_tasks.append(
                            f"{dag_id} {ti['dag_run_id']} {ti['task_id']}: {tries}"
                        )
        return infos

    def _failures(self, dag_id: str, run_id: str) -> list[TaskFailure]:
        out = []
        for ti in self.stack.api.task_instances(dag_id, run_id):
            if ti["state"] in ("failed", "up_for_retry"):
                error = task_error(self.stack.home / "logs", dag_id, run_id, ti["task_id"], ti["try_number"])
                out.append(TaskFailure(ti["task_id"], ti["try_number"], ti["state"], error))
        return out

    def _bad_values(
        self, before_fix: list[Any], pending: Mapping[str, set[tuple[str, ...]]]
    ) -> list[dict[str, Any]]:
        out = []
        with ExitStack() as clients:
            self.sim.dynamics = clients.enter_context(self.stack.people())
            self.sim.erp = clients.enter_context(self.stack.erp())
            for bad in self.sim.bad:
                letters = [
                    d for d in before_fix if d.entity == bad.entity and d.record_key.strip() == bad.key
                ]
                try:
                    landed, held = self.sim.landed(bad)
                except Exception as exc:  # the other side may not hold the record at all
                    landed, held = False, f"{type(exc).__name__}: {exc}"
                left = sorted(
                    f"{kind}: {' '.join(map(str, item))}"
                    for kind, items in pending.items()
                    for item in items
                    if item[0] == bad.entity and item[1] == bad.key
                )
                out.append(
                    {
                        "kind": bad.kind,
                        "entity": bad.entity,
                        "key": bad.key,
                        "side": bad.side,
                        "field": bad.field,
                        "value": str(bad.value),
                        "injected_at": bad.injected_at.isoformat(),
                        "dead_letters": [f"{d.stage}: {d.error}" for d in letters],
                        "reason": next((d.error for d in letters if (d.error or "").strip()), None),
                        "fixed_value": str(bad.fixed_value),
                        "fixed_at": bad.fixed_at.isoformat() if bad.fixed_at else None,
                        "landed": landed,
                        "other_side": str(held),
                        "pending_after_fix": left,
                    }
                )
        return out

    def _compare(self) -> dict[str, list[dict[str, Any]] | str]:
        """:func:`compare_systems` per entity: its drift items, or why the compare failed."""
        from d365sync.engine.stages.context import RunContext

        out: dict[str, list[dict[str, Any]] | str] = {}
        with ExitStack() as clients:
            dynamics = clients.enter_context(self.stack.dynamics())
            erp = clients.enter_context(self.stack.erp())
            store = clients.enter_context(self.stack.store())
            for entity in self.order:
                ctx = RunContext(
                    spec=self.specs[entity],
                    dynamics=dynamics,
                    erp=erp,
                    store=store,
                    staging_root=str(self.stack.workdir / "drift"),
                    run_id="soak-drift",
                    dry_run=True,
                )
                try:
                    out[entity] = compare_systems(ctx)
                except Exception as exc:  # a record one side cannot even read is drift too
                    out[entity] = f"{type(exc).__name__}: {exc}"[:500]
        return out

    def _drift(self, pending_keys: set[tuple[str, str]]) -> dict[str, dict[str, Any]]:
        """The end's drift, each item either allowed (and counted by why) or unexpected."""
        baseline = {
            (entity, _signature(item))
            for entity, items in self.baseline_drift.items()
            if not isinstance(items, str)
            for item in items
        }
        out: dict[str, dict[str, Any]] = {}
        for entity, items in self._compare().items():
            if isinstance(items, str):
                out[entity] = {"error": items, "total": 0, "allowed": {}, "unexpected": []}
                continue
            allowed: Counter[str] = Counter()
            unexpected = []
            for item in items:
                key = (entity, item["key"])
                at_baseline = (entity, _signature(item)) in baseline
                why = _allowed(self.specs[entity], item, key in pending_keys, at_baseline)
                if why:
                    allowed[why] += 1
                else:
                    unexpected.append(item)
            out[entity] = {"total": len(items), "allowed": dict(allowed), "unexpected": unexpected}
        return out

    # -- checks ------------------------------------------------------------------------------
    def _checks(self) -> list[Check]:
        r = self.report
        finished = [x for x in r.runs if x.state in FINAL]
        not_green = [x for x in r.runs if x.verdict in ("failed", "stuck")]
        checks = [
            Check(
                "waits",
                "every wait finished in time (baseline cycle, bad values seen, post-fix cycle, drain)",
                all(v == "ok" for v in r.waits.values()) and len(r.waits) == 4,
                [f"{k}: {v}" for k, v in r.waits.items() if v != "ok"],
            ),
            Check(
                "runs_green",
                f"every DAG run green ({len(finished)} finished)",
                bool(finished) and not not_green,
                [
                    f"{x.dag_id} {x.run_id}: {x.state}; "
                    + "; ".join(f"{f.task_id}: {f.error}" for f in x.failures)
                    for x in not_green
                ],
            ),
        ]
        injected = {b["kind"] for b in r.bad_values}
        from d365sync.sandbox.simulator import BAD_KINDS

        missing = [k for k in BAD_KINDS if k not in injected]
        checks.append(
            Check(
                "bad_dead_lettered",
                f"each bad value dead-lettered with a reason ({len(r.bad_values)} injected)",
                not missing and all(b["reason"] for b in r.bad_values),
                [
                    f"{k}: not injected ({'; '.join(r.simulator.get('skipped', [])) or 'no record'})"
                    for k in missing
                ]
                + [
                    f"{b['kind']} {b['entity']} {b['key']}: no dead letter"
                    for b in r.bad_values
                    if not b["reason"]
                ],
            )
        )
        checks.append(
            Check(
                "fix_syncs",
                "fixing each at the source syncs it on the next cycle, nothing left pending on it",
                bool(r.bad_values) and all(b["landed"] and not b["pending_after_fix"] for b in r.bad_values),
                [
                    f"{b['kind']} {b['entity']} {b['key']}: "
                    + (
                        "fixed value not in the other system (holds " + b["other_side"] + ")"
                        if not b["landed"]
                        else ""
                    )
                    + ("; pending: " + ", ".join(b["pending_after_fix"]) if b["pending_after_fix"] else "")
                    for b in r.bad_values
                    if not b["landed"] or b["pending_after_fix"]
                ],
            )
        )
        checks.append(
            Check(
                "nothing_pending",
                "nothing pending after the fix that was not pending at the baseline",
                not r.new_pending,
                list(r.new_pending),
            )
        )
        unexpected = [
            f"{e}: {d.get('error') or ''}{' '.join(_drift_line(i) for i in d['unexpected'][:10])}"
            for e, d in r.drift.items()
            if d["unexpected"] or d.get("error")
        ]
        checks.append(
            Check(
                "systems_agree",
                "both systems agree except for pending (dead-lettered) keys",
                not unexpected,
                unexpected,
            )
        )
        refused = r.simulator.get("refused", {})
        checks.append(
            Check(
                "edits_accepted",
                "every user edit accepted by its system",
                not refused,
                [f"{k}: {v['count']}x {v['error']}" for k, v in refused.items()],
            )
        )
        return checks


def cycle(
    runs: Mapping[str, list[dict[str, Any]]],
    since: Mapping[str, datetime],
    order: list[str],
    upstream: Mapping[str, set[str]],
    *,
    chain: bool,
    committed: Callable[[str, dict[str, Any]], datetime | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The first *finished* run (``success`` or ``failed``; never one still queued or running) of each
    entity in ``since`` whose ``start_date`` is after the entity's time and, with ``chain``, after
    the found run of every upstream entity in ``since`` committed (``committed(entity, run)``: when
    its ``commit_state`` ended, which is when its key map moved and its asset fired; the run's
    ``end_date`` when unknown). An entity whose upstream has no such run yet has none either. Runs
    that started before the time never count."""
    found: dict[str, dict[str, Any]] = {}
    for entity in order:
        if entity not in since:
            continue
        after = since[entity]
        if chain:
            parents = {u: found.get(u) for u in sorted(upstream.get(entity, ())) if u in since}
            if any(p is None for p in parents.values()):
                continue
            ends = [
                (committed(u, p) if committed else None) or _when(p["end_date"])
                for u, p in parents.items()
                if p is not None
            ]
            after = max([after, *(e for e in ends if e is not None)])
        done = [
            (start, r)
            for r in runs.get(entity, [])
            if r["state"] in FINAL and (start := _when(r["start_date"])) is not None and start > after
        ]
        if done:
            found[entity] = min(done, key=lambda pair: pair[0])[1]
    return found


def verdict(run: Mapping[str, Any], cutoff: datetime) -> str:
    """``success`` / ``failed`` for a finished run; ``stuck`` for one that started before the cutoff
    and is not finished; ``in flight`` for one that started after it or never started."""
    if run["state"] in FINAL:
        return str(run["state"])
    start = _when(run.get("start_date"))
    return "stuck" if start is not None and start <= cutoff else "in flight"


def _listing(pending: Mapping[str, set[tuple[str, ...]]]) -> list[str]:
    return sorted(f"{kind}: {' '.join(map(str, item))}" for kind, items in pending.items() for item in items)


def _allowed(spec: Any, item: Mapping[str, Any], pending: bool, at_baseline: bool = False) -> str | None:
    """Why a drift item is no failure, or None: a pending key (dead-lettered, parked, in review), a
    record one side keeps by design (``creates`` off towards the other), or the very same drift
    (key, kind and differing fields) as right after the first sync, before any user edit (e.g. an
    invoice whose order exists only in the ERP: its Dynamics order lookup stays empty by design). A
    user's edit that does not sync adds its field to the item, so it never matches the baseline's
    (unless that very field already differed then)."""
    if pending:
        return "pending key (dead letter, parked or in review)"
    if item["kind"] == "only_dynamics" and not spec.creates.to_erp:
        return "Dynamics-only by design (creates.to_erp off)"
    if item["kind"] == "only_erp" and not spec.creates.to_dynamics:
        return "ERP-only by design (creates.to_dynamics off)"
    if at_baseline:
        return "the same drift as after the first sync"
    return None


def _signature(item: Mapping[str, Any]) -> tuple[str, str, tuple[str, ...]]:
    why = item.get("why")
    fields = tuple(sorted(w["field"] for w in why)) if isinstance(why, list) else ()
    return (str(item["key"]), str(item["kind"]), fields)


def compare_systems(ctx: Any) -> list[dict[str, Any]]:
    """``engine.reconcile``'s full compare by field hashes, with one difference: a Dynamics record is
    left out when its ``statecode`` is the entity's *inactive* state, not whenever it is non-zero
    (``reconcile.compare`` keeps only ``statecode == 0``, so a paid invoice (2) or a fulfilled
    order (3) would look missing in Dynamics). Items: ``{"key", "kind", "why"}`` as reconcile's."""
    from d365sync.engine import reconcile as rc
    from d365sync.engine.stages.context import chunked

    spec, fields = ctx.spec, rc.shared_fields(ctx)
    inactive = spec.dynamics.inactive_state
    rows = ctx.dynamics.iter_rows(spec.dynamics.entity_set, spec.dynamics_select)
    active = (r for r in rows if r.get("statecode", 0) != inactive)
    seen = {key: rc.field_hashes(record, fields) for key, record, _ in rc._canonical(ctx, "dynamics", active)}
    drift: list[dict[str, Any]] = []
    for chunk in chunked(rc.erp_records(ctx), ctx.chunk_size):
        bases = ctx.store.load_base(ctx.entity, "erp", [k for k, _, _ in chunk])
        for key, record, _ in chunk:
            mine = rc.field_hashes(record, fields)
            item = rc._differs(key, mine, seen.pop(key, None), bases.get(key), fields)
            if item:
                drift.append(item)
    drift += [{"key": k, "kind": "only_dynamics", "why": "no active ERP row"} for k in sorted(seen)]
    return drift


def _drift_line(item: Mapping[str, Any]) -> str:
    why = item.get("why")
    if isinstance(why, list):
        why = ",".join(f"{w['field']}({w['changed_on']})" for w in why)
    return f"[{item['key']} {item['kind']}: {why}]"


def _dependency_order(upstream: Mapping[str, set[str]]) -> list[str]:
    from graphlib import TopologicalSorter

    sorter = TopologicalSorter({e: upstream[e] for e in sorted(upstream)})
    return list(sorter.static_order())


# ------------------------------------------------------------------------------ task logs
def task_error(logs: Path, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
    """The error line of a task try's log: the raised exception (type: message) of the last event that
    carries one (Airflow 3 logs JSON lines, ``error_detail`` outermost first), else the last error."""
    path = logs / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}" / f"attempt={try_number}.log"
    if not path.exists():
        return f"(no log at {path})"
    last_error = ""
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            if "Error" in line or "Exception" in line:
                last_error = line.strip()
            continue
        if not isinstance(event, dict):
            continue
        details = [d for d in event.get("error_detail") or [] if isinstance(d, dict) and d.get("exc_type")]
        if details:  # the raised exception comes first, its causes after it
            last_error = f"{details[0]['exc_type']}: {details[0].get('exc_value', '')}".strip()
            continue
        if not last_error and str(event.get("level", "")).lower() in ("error", "critical"):
            last_error = str(event.get("event", ""))
    return last_error[:500] or "(no error line in the log)"


# ------------------------------------------------------------------------------ rendering
def _render(r: SoakReport) -> Iterator[str]:
    o = r.options
    total_time = _clock(sum(r.phases.values()))
    yield f"== d365sync soak: {_clock(o['duration'])} of user activity, {total_time} in all"
    yield f"workdir {r.workdir}  (logs/, airflow/logs/, report.json)"
    if r.error:
        yield f"HARNESS ERROR: {r.error}"
    yield "phases: " + ", ".join(f"{k} {_clock(v)}" for k, v in r.phases.items())
    verdicts = ("success", "failed", "stuck", "in flight")
    by_dag: dict[str, Counter[str]] = {}
    for run in r.runs:
        by_dag.setdefault(run.dag_id, Counter())[run.verdict or run.state] += 1
    total = Counter(run.verdict or run.state for run in r.runs)
    yield ""
    yield f"Runs: {len(r.runs)} (" + ", ".join(f"{s} {n}" for s, n in sorted(total.items())) + ")"
    yield "| DAG | runs | success | failed | stuck (started before the cutoff) | in flight at the end |"
    yield "|---|---:|---:|---:|---:|---:|"
    for dag_id, counts in sorted(by_dag.items()):
        cells = [sum(counts.values()), *(counts[v] for v in verdicts)]
        yield f"| {dag_id} | " + " | ".join(map(str, cells)) + " |"
    failed = [run for run in r.runs if run.verdict in ("failed", "stuck")]
    if failed:
        yield ""
        yield "Failed runs (failing task: error line of its log):"
        for run in failed:
            tasks = "; ".join(f"{f.task_id} (try {f.try_number}): {f.error}" for f in run.failures) or (
                f"no failed task; run report: {run.report_error}" if run.report_error else "no failed task"
            )
            yield f"  {run.dag_id} {run.run_id} [{run.verdict}] {tasks}"
    if r.retried_tasks:
        yield f"Tasks with more than one try: {len(r.retried_tasks)}"
        for line in r.retried_tasks[:20]:
            yield f"  {line}"
    sim = r.simulator
    yield ""
    yield "User edits: " + ", ".join(f"{k} {v}" for k, v in sim.get("edits", {}).items())
    for kind, v in sim.get("refused", {}).items():
        yield f"  refused {kind}: {v['count']}x {v['error']}"
    if sim.get("no_record"):
        yield "  drawn, but no record qualified: " + ", ".join(
            f"{k} {v}" for k, v in sim["no_record"].items()
        )
    for note in sim.get("skipped", []):
        yield f"  not injected: {note}"
    yield ""
    yield "Bad values:"
    for b in r.bad_values:
        yield (
            f"  {b['kind']}: {b['entity']} {b['key']} {b['side']}.{b['field']}"
            f" — dead letter: {b['reason'] or 'NONE'}"
            f"; fixed → other side {'has it' if b['landed'] else 'lacks it (' + b['other_side'] + ')'}"
            f"; pending after fix: {', '.join(b['pending_after_fix']) or 'nothing'}"
        )
    reasons = Counter((d["entity"], d["stage"], _reason(d["error"])) for d in r.dead_letters)
    yield ""
    at_baseline = sum(1 for p in r.baseline_pending if p.startswith("dead_letters"))
    yield f"Dead letters pending at the end: {len(r.dead_letters)} (at the baseline: {at_baseline})"
    for (entity, stage, reason), n in sorted(reasons.items()):
        yield f"  {entity:<10} {stage:<9} {n:>3}x {reason}"
    if r.new_pending:
        yield "Pending now that was not pending at the baseline:"
        for line in r.new_pending:
            yield f"  {line}"
    yield ""
    yield "Drift (reconcile's compare by field hash; records inactive on both sides left out):"
    yield "  after the first sync: " + ", ".join(f"{e} {n}" for e, n in r.baseline_drift.items())
    for entity, d in r.drift.items():
        if d.get("error"):
            yield f"  {entity}: compare failed: {d['error']}"
            continue
        allowed = ", ".join(f"{n} {why}" for why, n in d["allowed"].items()) or "none"
        yield f"  {entity}: {d['total']} differences; unexpected {len(d['unexpected'])}; allowed: {allowed}"
        for item in d["unexpected"][:10]:
            yield f"    {_drift_line(item)}"
    yield ""
    yield "Checks:"
    for check in r.checks:
        yield f"  [{'ok' if check.ok else 'FAIL'}] {check.id}: {check.name}"
        for detail in check.details[:15]:
            yield f"         {detail}"
    yield f"RESULT: {'PASS' if r.ok else 'FAIL'}"


def _reason(error: str) -> str:
    """An error without its record's values, for grouping (digits and quoted values blanked)."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "…", error or "")
    return re.sub(r"\d+", "#", text)[:140]


# ------------------------------------------------------------------------------ entry points
def run_soak(opts: SoakOptions) -> SoakReport:
    """Start the stack, soak, stop everything; the report (also ``<workdir>/report.json``)."""
    workdir = (opts.workdir or Path("var") / "soak" / f"{datetime.now(UTC):%Y%m%dT%H%M%S}").resolve()
    if workdir.exists() and any(workdir.iterdir()):
        raise ValueError(f"{workdir} is not empty: a soak starts from fresh systems")
    workdir.mkdir(parents=True, exist_ok=True)
    options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}
    report = SoakReport(options=options, workdir=str(workdir), started_at=_now().isoformat())
    started = time.monotonic()
    try:
        with stack(opts, workdir) as running:
            report.phases["stack up"] = round(time.monotonic() - started, 1)
            Soak(opts, running, report).run()
    except Exception as exc:  # reported (and failed) rather than lost: the logs stay in the workdir
        log.exception("soak: the harness failed")
        report.error = f"{type(exc).__name__}: {exc}"
        report.checks.append(Check("harness", "the soak ran to the end", False, [report.error[:2000]]))
    finally:
        report.finished_at = _now().isoformat()
        (workdir / "report.json").write_text(report.to_json())
    return report


def add_parser(commands: Any) -> None:
    soak = commands.add_parser(
        "soak",
        help="soak test: a real Airflow scheduler syncs every minute while simulated users edit both systems",
        description=__doc__.split("\n\n", 1)[0],
    )
    soak.add_argument(
        "--duration", type=parse_duration, default=parse_duration("30m"), help="user activity (90s, 30m, 2h)"
    )
    soak.add_argument(
        "--workdir",
        type=Path,
        help="an empty or new directory for the systems, logs and report.json (default var/soak/<time>)",
    )
    soak.add_argument("--rows", type=int, default=200, help="ERP customers to seed (default 200)")
    soak.add_argument("--accounts", type=int, default=50, help="Dataverse accounts to seed (default 50)")
    soak.add_argument("--rate", type=float, default=6.0, help="user edits per minute (default 6)")
    soak.add_argument("--bad-per-kind", type=int, default=2, help="bad values of each kind (default 2)")
    soak.add_argument("--parallelism", type=int, default=4, help="AIRFLOW__CORE__PARALLELISM (default 4)")
    soak.add_argument(
        "--phase-timeout", type=parse_duration, default=parse_duration("15m"), help="longest wait for runs"
    )
    soak.add_argument("--seed", type=int, default=7)
    soak.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("d365sync.dynamics").setLevel(logging.WARNING)  # one line per upsert otherwise
    opts = SoakOptions(
        duration=args.duration,
        workdir=args.workdir,
        erp_rows=args.rows,
        dataverse_accounts=args.accounts,
        rate_per_minute=args.rate,
        bad_per_kind=args.bad_per_kind,
        parallelism=args.parallelism,
        phase_timeout=args.phase_timeout,
        seed=args.seed,
    )
    report = run_soak(opts)
    print(report.render())
    return 0 if report.ok else 1
