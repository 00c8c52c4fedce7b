"""Run the entity DAGs once and print what each entity run did: in-process, or through a running Airflow.

``make sync``, the DAG tests and the benchmarks use it::

    python -m d365sync.airflow.runner                 # every entity DAG, parents first
    python -m d365sync.airflow.runner sync_customers --conf '{"dry_run": true}'
    python -m d365sync.airflow.runner orders --logical-date 2026-11-20T00:00:00+00:00 --json
    python -m d365sync.airflow.runner --api http://127.0.0.1:8080 --passwords FILE   # a running stack

In-process (the default), each DAG runs with ``dag.test()``. That writes DAG runs and task
states into the metadata DB of ``AIRFLOW_HOME``: it must never be the DB of a running Airflow
(``dag.test()`` deletes runs of the same date and resets task states there). It needs a migrated
metadata DB and ``AIRFLOW__CORE__DAGS_FOLDER`` pointing at the repo's ``dags/`` (``dag.test()``
refuses DAGs it cannot find there). Runs default to ``logical_date=None``, the way a manual
trigger from the UI or API without a date arrives. The ``dynamics_api`` pool is created when
missing. Deadline alerts are dropped for these in-process runs (see :func:`main`).

With ``--api``, nothing runs in this process and no metadata DB is opened: each DAG gets a manual
run through the public REST API of the running api-server (``POST /api/v2/dags/{id}/dagRuns``,
as the SimpleAuthManager user ``--user``), its scheduler runs it like any other run (pools,
``max_active_runs``, the UI shows it), and the runner waits for it before triggering the next
DAG, parents first. The report comes back from the ``report`` task's XCom.

``--json`` prints one JSON line last: ``{"runs": [...], "warnings": [...]}`` (warnings raised
during the runs, for the tests). The exit status is 0 when every run succeeded, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

COLUMNS = (
    ("extracted", ("extracted_dynamics", "extracted_erp")),
    ("quarantined", ("quarantined",)),
    ("ERP c/u/d", ("erp_create", "erp_update", "erp_deactivate")),
    ("Dynamics c/u/d", ("dynamics_create", "dynamics_update", "dynamics_deactivate")),
    ("echoes", ("echoes",)),
    ("conflicts", ("conflicts",)),
    ("review", ("review",)),
    ("parked", ("parked",)),
    ("API req", ("dataverse_requests",)),
)


def ensure_pool() -> None:
    from airflow.models.pool import Pool

    from d365sync.airflow.settings import dynamics_pool

    name, slots = dynamics_pool()
    if Pool.get_pool(name) is None:
        Pool.create_or_update_pool(
            name, slots, "Tasks that call the Dataverse Web API", include_deferred=False
        )


def init_stats() -> None:
    """Set up Airflow's metrics backend from ``[metrics]``, as the task runner's ``main()`` does.

    ``dag.test()`` runs the tasks in this process without that entry point, so without this the
    run metrics (:mod:`d365sync.airflow.metrics`) would go to the no-op logger.
    """
    from airflow.configuration import conf
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics import stats_utils

    stats.initialize(
        factory=stats_utils.get_stats_factory(),
        export_legacy_names=conf.getboolean("metrics", "legacy_names_on"),
    )


def resolve_dag_ids(names: Sequence[str]) -> list[str]:
    from d365sync.airflow.dag_factory import dag_id_for, entity_order, load_specs

    if not names:
        return [dag_id_for(e) for e in entity_order(load_specs())]
    specs = load_specs()
    return [dag_id_for(n) if n in specs else n for n in names]


def load_dags() -> dict[str, Any]:
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=conf.get("core", "dags_folder"))
    if bag.import_errors:
        raise SystemExit(f"DAG import errors: {bag.import_errors}")
    return bag.dags


def _task_name(ti: Any) -> str:
    """``task`` or, for a mapped task's instance, ``task[i]``."""
    index = getattr(ti, "map_index", -1)
    return ti.task_id if index is None or index < 0 else f"{ti.task_id}[{index}]"


def run_one(dag: Any, logical_date: datetime | None, conf: dict[str, Any] | None) -> dict[str, Any]:
    started = time.perf_counter()
    dr = dag.test(logical_date=logical_date, run_conf=conf)
    seconds = round(time.perf_counter() - started, 3)
    tasks = {_task_name(ti): str(ti.state) for ti in dr.get_task_instances()}
    return {
        "dag_id": dag.dag_id,
        "run_id": dr.run_id,
        "state": str(dr.state),
        "seconds": seconds,
        "tasks": tasks,
        "report": _xcom(dag.dag_id, dr.run_id, "report"),
    }


def _xcom(dag_id: str, run_id: str, task_id: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.settings import Session

    with Session() as session:
        query = XComModel.get_many(run_id=run_id, dag_ids=dag_id, task_ids=task_id, key="return_value")
        row = session.scalars(query).first()
        return None if row is None else XComModel.deserialize_value(row)


def table(runs: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per entity run."""
    head = ["DAG", "state", "s", *(c for c, _ in COLUMNS), "resolutions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        report = run.get("report") or {}
        counts = report.get("counts") or {}
        cells = ["/".join(str(counts.get(k, 0)) for k in keys) for _, keys in COLUMNS]
        res = ", ".join(f"{k}: {v}" for k, v in (report.get("resolutions") or {}).items()) or "-"
        lines.append(
            f"| {run['dag_id']} | {run['state']} | {run['seconds'] if run['seconds'] is not None else '-'} | "
            + " | ".join(cells)
            + f" | {res} |"
        )
    return "\n".join(lines)


class ApiError(RuntimeError):
    """The running Airflow could not be reached, refused a call, or a run did not finish in time."""


class ApiRunner:
    """Manual runs through the public REST API of a running api-server, one DAG at a time.

    ``transport`` is for the tests (an ``httpx.MockTransport``).
    """

    FINISHED = frozenset({"success", "failed"})

    def __init__(
        self,
        url: str,
        user: str,
        password: str,
        *,
        timeout: float = 1800,
        poll: float = 3.0,
        transport: httpx.BaseTransport | None = None,
        log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    ) -> None:
        self.url = url.rstrip("/")
        self.user, self.password = user, password
        self.timeout, self.poll, self.log = timeout, poll, log
        self.client = httpx.Client(base_url=self.url, timeout=30, transport=transport)

    def close(self) -> None:
        self.client.close()

    def wait_healthy(self, timeout: float = 360) -> None:
        """Until the api-server answers and its metadata DB and scheduler are healthy."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                body = self.client.get("/api/v2/monitor/health").json()
                parts = {p: (body.get(p) or {}).get("status") for p in ("metadatabase", "scheduler")}
                if all(v == "healthy" for v in parts.values()):
                    return
                last = f"health {parts}"
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ApiError(f"Airflow at {self.url} is not healthy after {timeout:.0f} s ({last})")
            time.sleep(self.poll)

    def login(self) -> None:
        """A JWT from SimpleAuthManager's ``POST /auth/token``, sent on every later call."""
        try:
            response = self.client.post(
                "/auth/token", json={"username": self.user, "password": self.password}
            )
        except httpx.HTTPError as exc:
            raise ApiError(f"Airflow at {self.url} not reachable: {exc}") from None
        if response.status_code not in (200, 201):
            raise ApiError(f"login as {self.user} refused: HTTP {response.status_code} {response.text[:200]}")
        self.client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.client.request(method, f"/api/v2/{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"{method} /api/v2/{path}: {type(exc).__name__}: {exc}") from None

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._call(method, path, **kwargs)
        if response.status_code >= 300:
            raise ApiError(f"{method} /api/v2/{path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()

    def wait_parsed(self, dag_id: str) -> dict[str, Any]:
        """The DAG as the API knows it, once the dag-processor has parsed it."""
        deadline = time.monotonic() + 300
        while True:
            response = self._call("GET", f"dags/{dag_id}")
            if response.status_code == 200:
                return dict(response.json())
            if response.status_code != 404 or time.monotonic() > deadline:
                raise ApiError(f"DAG {dag_id} unknown to Airflow: HTTP {response.status_code}")
            time.sleep(self.poll)

    def run(self, dag_id: str, conf: dict[str, Any] | None) -> dict[str, Any]:
        """Trigger one manual run, wait until it finished, and collect its tasks and report."""
        dag = self.wait_parsed(dag_id)
        if dag.get("is_paused"):
            self.log(f"{dag_id}: paused in Airflow, not triggered (unpause it to run it)")
            return {"dag_id": dag_id, "run_id": None, "state": "paused", "seconds": 0, "tasks": {}}
        run = self._trigger(dag_id, conf)
        run_id = run["dag_run_id"]
        self.log(f"{dag_id}: triggered {run_id} ({run.get('state')})")
        deadline = time.monotonic() + self.timeout
        state = run.get("state")
        while state not in self.FINISHED:
            if time.monotonic() > deadline:
                raise ApiError(f"{dag_id} run {run_id} still {state} after {self.timeout:.0f} s")
            time.sleep(self.poll)
            try:
                run = self._json("GET", f"dags/{dag_id}/dagRuns/{run_id}")
            except ApiError as exc:  # a busy or restarting api-server: ask again until the deadline
                self.log(f"{dag_id}: {exc}")
                continue
            if run.get("state") != state:
                state = run.get("state")
                self.log(f"{dag_id}: {run_id} {state}")
        tis = self._json("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return {
            "dag_id": dag_id,
            "run_id": run_id,
            "state": str(state),
            "seconds": _seconds(run.get("start_date"), run.get("end_date")),
            "tasks": {ti["task_id"]: str(ti.get("state")) for ti in tis.get("task_instances", [])},
            "report": self.report(dag_id, run_id),
        }

    def _trigger(self, dag_id: str, conf: dict[str, Any] | None, attempts: int = 5) -> dict[str, Any]:
        """POST the manual run under a run id of our own, again after a 5xx (a SQLite metadata DB
        busy with the scheduler answers "Database error"): a retry of a POST that did commit gets
        409 for that id, and the run is then read rather than triggered twice."""
        run_id = f"manual__{datetime.now(UTC).isoformat()}"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf or {}, "note": "make sync"}
        path = f"dags/{dag_id}/dagRuns"
        for attempt in range(1, attempts + 1):
            response = self._call("POST", path, json=body)
            if response.status_code in (200, 201):
                return dict(response.json())
            if response.status_code == 409 and attempt > 1:
                return self._json("GET", f"{path}/{run_id}")
            if response.status_code < 500 or attempt == attempts:
                raise ApiError(f"POST /api/v2/{path}: HTTP {response.status_code} {response.text[:300]}")
            self.log(f"{dag_id}: trigger answered HTTP {response.status_code}; again in {2**attempt} s")
            time.sleep(2**attempt)
        raise AssertionError("unreachable")

    def report(self, dag_id: str, run_id: str) -> Any:
        """The ``report`` task's return value; None when it did not run."""
        path = f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/report/xcomEntries/return_value"
        response = self._call("GET", path)
        if response.status_code == 404:
            return None
        if response.status_code >= 300:
            raise ApiError(f"GET {path}: HTTP {response.status_code} {response.text[:300]}")
        value = response.json().get("value")
        if isinstance(value, str):  # the raw stored JSON
            try:
                value = json.loads(value)
            except ValueError:
                return None
        return value


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)


def run_via_api(
    args: argparse.Namespace, transport: httpx.BaseTransport | None = None
) -> list[dict[str, Any]]:
    """Every requested DAG once through the running api-server, one after the other."""
    if not args.passwords:
        raise SystemExit("--api needs --passwords (the SimpleAuthManager passwords file)")
    passwords = json.loads(Path(args.passwords).read_text(encoding="utf-8"))
    if args.user not in passwords:
        raise SystemExit(f"no password for user {args.user!r} in {args.passwords}")
    conf = json.loads(args.conf) if args.conf else None
    runner = ApiRunner(
        args.api, args.user, passwords[args.user], timeout=args.timeout, poll=args.poll, transport=transport
    )
    try:
        runner.wait_healthy()
        runner.login()
        return [runner.run(dag_id, conf) for dag_id in resolve_dag_ids(args.dags)]
    finally:
        runner.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m d365sync.airflow.runner", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "dags", nargs="*", help="DAG ids or entity names (default: every entity, parents first)"
    )
    parser.add_argument("--conf", help="run conf / params as JSON")
    parser.add_argument("--logical-date", help="ISO date-time (default: none, like a manual trigger)")
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    parser.add_argument(
        "--api", metavar="URL", help="trigger the runs through this running api-server instead of dag.test()"
    )
    parser.add_argument("--passwords", help="with --api: the SimpleAuthManager passwords JSON file")
    parser.add_argument("--user", default="admin", help="with --api: the user that triggers (admin)")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="with --api: seconds to wait for each run (1800)"
    )
    parser.add_argument("--poll", type=float, default=3.0, help="with --api: seconds between polls (3)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, transport: httpx.BaseTransport | None = None) -> int:
    args = parse_args(argv)
    if args.api:
        if args.logical_date:
            raise SystemExit("--logical-date is for in-process runs; --api triggers manual runs")
        try:
            runs = run_via_api(args, transport)
        except ApiError as exc:
            print(f"make sync: {exc}", file=sys.stderr)
            return 1
        return finish(runs, [], args.json)
    # Airflow 3.3.2's dag.test() round-trips the DAG through serialization, which leaves
    # dag.deadline as dicts; DagRun.update_state then calls DeadlineAlertModel.get_by_id(dict)
    # when the run succeeds and crashes ("'dict' object has no attribute 'hex'"). The scheduler
    # path is unaffected, so only in-process test runs drop the deadline alert.
    os.environ["D365SYNC_DEADLINE_ALERTS"] = "false"
    conf = json.loads(args.conf) if args.conf else None
    logical = datetime.fromisoformat(args.logical_date) if args.logical_date else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ensure_pool()
        init_stats()
        dags = load_dags()
        runs = [run_one(dags[d], logical, conf) for d in resolve_dag_ids(args.dags)]
    seen = {(str(w.category.__name__), str(w.message), w.filename) for w in caught}
    found = [{"category": c, "message": m[:500], "filename": f} for c, m, f in sorted(seen)]
    return finish(runs, found, args.json)


def finish(runs: Sequence[dict[str, Any]], found: list[dict[str, str]], as_json: bool) -> int:
    """Print the runs (table, plus the tasks of runs that did not succeed, or JSON); the exit status."""
    if as_json:
        print(json.dumps({"runs": runs, "warnings": found}, default=str))
    else:
        print(table(runs))
        for run in runs:
            if run["state"] != "success":  # skipped: the lane route did not take, no problem
                bad = {t: s for t, s in (run.get("tasks") or {}).items() if s not in ("success", "skipped")}
                print(f"{run['dag_id']} {run['state']}: {bad or 'no task ran'} (run {run['run_id']})")
    return 0 if all(r["state"] == "success" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
