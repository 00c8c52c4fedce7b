"""The bodies of the DAGs' tasks: Airflow context in, one engine stage call, a small manifest out.

Each function rebuilds a :class:`~d365sync.engine.stages.context.RunContext` from the task's
context (run id, data interval, params) and the three connections, calls one stage of
:mod:`d365sync.engine.pipeline`, and returns the stage's manifest (file names and counts — XCom
never carries rows). The engine does the work; nothing here is business logic.

Heavy modules (pandas, pyarrow, GX, the Dataverse client) are imported inside the functions, so
importing this module at DAG-parse time costs nothing.

Runs and windows:

* a scheduled or manual run is incremental (delta token / cursor), whatever its data interval;
* a **backfill** run (``run_type == "backfill"``) re-reads its data interval as a ``modifiedon``
  window on Dynamics and a cursor window on the ERP; the store stages its watermarks as
  ``backfill=True``, so the live delta token and cursor never move backwards;
* ``params.window_start`` / ``window_end`` turn a manual run into the same kind of window run;
* ``logical_date`` may be None (manual runs): nothing here reads it; the run time, when needed,
  is ``context.get("data_interval_start") or dag_run.run_after``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import datetime
from typing import Any

from d365sync.airflow import settings
from d365sync.airflow.staging import finish_run, staging_root

log = logging.getLogger(__name__)
STAGE_TASKS = (
    "extract_dynamics",
    "extract_erp",
    "validate",
    "transform",
    "resolve",
    "load_erp",
    "load_dynamics",
)
# Run-report timing names, the same as the engine's own run_entity (task ids otherwise).
TIMING_NAMES = {"commit_state": "commit"}


# ------------------------------------------------------------------------------ context
def airflow_context() -> Any:
    from airflow.sdk import get_current_context

    return get_current_context()


def run_time(context: Mapping[str, Any]) -> datetime:
    """The run's reference time; manual runs may have no logical date or data interval."""
    return context.get("data_interval_start") or context["dag_run"].run_after


def window_of(context: Mapping[str, Any]) -> Any:
    """The backfill window of this run, or None for an incremental run."""
    from d365sync.engine.stages.context import Window

    params = context.get("params") or {}
    if params.get("window_start") and params.get("window_end"):
        return Window(_aware(params["window_start"]), _aware(params["window_end"]))
    if run_type(context["dag_run"]) == "backfill":
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is not None and end is not None:
            return Window(start, end)
    return None


def run_type(run: Any) -> str:
    """``"backfill"``, ``"scheduled"``…: the Task SDK's ``DagRunType`` is a str Enum whose ``str()``
    is ``"DagRunType.BACKFILL"``, so compare its value."""
    kind = getattr(run, "run_type", "")
    return str(getattr(kind, "value", kind))


def _aware(text: str) -> datetime:
    from d365sync.engine.stages.context import aware

    value = aware(text)
    if value is None:
        raise ValueError(f"not an ISO date/time: {text!r}")
    return value


def _engine_conn(conn_id: str) -> Any:
    """An Airflow connection (any secrets backend) as the engine's plain :class:`Conn`."""
    from airflow.sdk import BaseHook

    from d365sync.engine.connections import Conn

    c = BaseHook.get_connection(conn_id)
    return Conn.of(conn_id, c, c.extra_dejson)


@contextmanager
def clients() -> Iterator[tuple[Any, Any, Any]]:
    """(Dataverse client, ERP client, state store) from the configured connections, closed after."""
    from d365sync.airflow.erp_hook import ErpOdbcHook
    from d365sync.airflow.hook import DynamicsWebApiHook
    from d365sync.engine.connections import state_url
    from d365sync.engine.state import StateStore

    conns = settings.connections()
    with ExitStack() as stack:
        dynamics = DynamicsWebApiHook(conns.dynamics).get_conn()
        stack.callback(dynamics.close)
        erp = stack.enter_context(ErpOdbcHook(erp_conn_id=conns.erp).get_client())
        url, schema = state_url(_engine_conn(conns.state))
        store = stack.enter_context(StateStore.open(url, schema=schema, privacy=privacy()))
        yield dynamics, erp, store


def privacy() -> Any:
    """The personal-data keys: the ``d365sync_pii`` connection's password through any secrets
    backend (``D365SYNC_PII_CONN_ID``), else ``AIRFLOW_CONN_D365SYNC_PII`` / ``D365SYNC_PII_KEYS``."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from d365sync.engine.privacy import Privacy

    conn_id = settings.pii_conn_id()
    try:
        password = BaseHook.get_connection(conn_id).password
    except AirflowNotFoundException:
        password = None
    if password:
        return Privacy.from_keys(password, f"connection {conn_id}")
    return Privacy.from_env()


@contextmanager
def run_context(entity: str) -> Iterator[Any]:
    """The engine's RunContext for this task instance."""
    from d365sync.airflow.dag_factory import load_specs
    from d365sync.engine.stages.context import RunContext, fewer_collections

    context = airflow_context()
    run = context["dag_run"]
    params = context.get("params") or {}
    with clients() as (dynamics, erp, store), fewer_collections():
        ctx = RunContext(
            spec=load_specs()[entity],
            dynamics=dynamics,
            erp=erp,
            store=store,
            staging_root=staging_root(run.dag_id),
            run_id=run.run_id,
            dry_run=bool(params.get("dry_run")),
            window=window_of(context),
            actor=f"airflow:{run.dag_id}",
            chunk_size=settings.chunk_size(),
            retries_per_run=settings.retries_per_run(),
            data_docs_dir=settings.data_docs_dir(),
        )
        yield ctx
        _log_requests(ctx)


def _log_requests(ctx: Any) -> None:
    counters = getattr(ctx.dynamics, "counters", None)
    if counters is not None:
        log.info("Dataverse: %s", counters.snapshot())


# Manifest keys whose values are free text about records (quarantine reasons, alert summaries,
# samples): XCom is readable by the Viewer role and the returned value is also written to the
# task log, so these are masked once more here, whatever the stage put in them.
TEXT_KEYS = frozenset({"samples", "alerts", "parked_items", "reason", "error", "errors"})


def xcom_safe(value: Any) -> Any:
    """A manifest as it may go to XCom and the task log: free text masked (:mod:`d365sync.engine.pii`).

    File names, counts and timings pass untouched (masking a staging path would lose the file);
    the values under :data:`TEXT_KEYS` keep record keys, fields and rules readable.
    """
    from d365sync.engine.pii import mask_any

    if isinstance(value, dict):
        return {
            k: mask_any(str(k), v, by_shape=False) if k in TEXT_KEYS else xcom_safe(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [xcom_safe(v) for v in value]
    return value


def _with_requests(manifest: dict[str, Any], ctx: Any, started: float | None = None) -> dict[str, Any]:
    """The manifest (:func:`xcom_safe`) plus this task's Dataverse counters and, given ``started``,
    its stage seconds."""
    counters = getattr(ctx.dynamics, "counters", None)
    snap = counters.snapshot() if counters is not None else {}
    manifest["dataverse"] = {
        "requests": int(snap.get("requests", 0)),
        "tokens": int(snap.get("token_acquisitions", 0)),
        "throttles": int(snap.get("throttles", 0)),
        "retries": int(snap.get("retries", 0)),
    }
    if started is not None:
        manifest["seconds"] = round(time.perf_counter() - started, 3)
    return xcom_safe(manifest)


def _arm_fault(ctx: Any, side: str) -> None:
    """Test hook: ``D365SYNC_FAULT=load_<side>:<n>`` SIGKILLs the process after the n-th write call.

    A real crash in the middle of a load (not an exception the task could handle), to prove the
    retried run ends with no duplicates and no lost updates.
    """
    task, _, after = os.environ.get("D365SYNC_FAULT", "").partition(":")
    if task != f"load_{side}":
        return
    target, name = (ctx.dynamics, "upsert_many") if side == "dynamics" else (ctx.erp, "upsert")
    original, calls, limit = getattr(target, name), [0], int(after or 1)

    def crashing(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] >= limit:
            log.warning("D365SYNC_FAULT: killing the process after %s write(s) in %s", calls[0], task)
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(target, name, crashing)


# -------------------------------------------------------------------------------- stages
def extract(entity: str, side: str) -> dict[str, Any]:
    from d365sync.engine.stages import extract as stage

    with run_context(entity) as ctx:
        if not ctx.dry_run:
            ctx.store.start_run(ctx.run_id, entity)  # idempotent: both extracts open the same report
            if side == "dynamics":
                _claim_events(ctx.store, ctx.spec, ctx.run_id)
        started = time.perf_counter()
        return _with_requests(stage(ctx, side), ctx, started)


def validate(entity: str, extracts: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    from d365sync.engine.stages import validate as stage

    with run_context(entity) as ctx:
        started = time.perf_counter()
        manifest = stage(ctx, extracts)
        if manifest.get("alerts"):
            from d365sync.airflow.alerts import on_invalid_share

            on_invalid_share(manifest["alerts"], airflow_context()["ti"].dag_id, ctx.run_id)
        return _with_requests(manifest, ctx, started)


def transform(entity: str, validated: dict[str, Any]) -> dict[str, Any]:
    from d365sync.engine.stages import transform as stage

    with run_context(entity) as ctx:
        started = time.perf_counter()
        return _with_requests(stage(ctx, validated), ctx, started)


def resolve(entity: str, transformed: dict[str, Any]) -> dict[str, Any]:
    from d365sync.engine.stages import resolve as stage

    with run_context(entity) as ctx:
        started = time.perf_counter()
        return _with_requests(stage(ctx, transformed), ctx, started)


def load(entity: str, side: str, resolved: dict[str, Any], part: int = 0, parts: int = 1) -> dict[str, Any]:
    from d365sync.engine.stages import load as stage

    with run_context(entity) as ctx:
        if ctx.dry_run:
            return {"side": side, "dry_run": True, "results": [], "counts": {}, "failed": 0}
        _arm_fault(ctx, side)
        started = time.perf_counter()
        return _with_requests(stage(ctx, resolved, side, part, parts), ctx, started)


def joined(manifest: Any) -> dict[str, Any]:
    """A task's manifest: the one task's, or the parts of a mapped load joined."""
    from d365sync.engine.stages.load import merge_loads

    if isinstance(manifest, dict):
        return manifest
    parts = [m for m in manifest if m]
    return merge_loads(parts) if parts else {}


def commit(entity: str, resolved: dict[str, Any], loads: Mapping[str, Any]) -> dict[str, Any]:
    from d365sync.engine.stages import commit as stage

    with run_context(entity) as ctx:
        if ctx.dry_run:
            return {"dry_run": True}
        started = time.perf_counter()
        manifest = stage(ctx, resolved, {side: joined(m) for side, m in loads.items()})
        manifest["events"] = ctx.store.inbox_done(entity, ctx.run_id)
        return _with_requests(manifest, ctx, started)


# ---------------------------------------------------------------------------- event runs
FAST_LANE = "sync_events"
STAGED_LANE = ["extract_dynamics", "extract_erp"]
INBOX_DRAIN = 100_000  # a run takes every waiting notification: bursts coalesce into one run


def _claim_events(store: Any, spec: Any, run_id: str) -> int:
    """Mark the waiting Dataverse notifications as this run's, *before* its change feed is read:
    every notification claimed here is for a change committed before that read."""
    if not spec.events.inbox:
        return 0
    return len(store.inbox_claim(spec.name, run_id, limit=INBOX_DRAIN))


def route(entity: str) -> str | list[str]:
    """Which lane this run takes: an event-started run (an asset event from the entity's inbox or
    ERP trigger, or from an upstream entity) with at most ``events.fast_lane_max`` waiting
    notifications runs every stage in one task (:func:`sync_events`); anything else, and every
    scheduled, manual, backfill or dry run, takes the staged chain of tasks."""
    from d365sync.airflow.dag_factory import load_specs

    context = airflow_context()
    spec, run = load_specs()[entity], context["dag_run"]
    params = context.get("params") or {}
    if run_type(run) != "asset_triggered" or params.get("dry_run") or window_of(context) is not None:
        return STAGED_LANE
    limit = spec.events.fast_lane_max
    with state_store() as store:
        waiting = len(store.inbox_pending(entity, limit=limit + 1))
    lane = FAST_LANE if waiting <= limit else STAGED_LANE
    log.info("%s: %d waiting notification(s) (fast lane up to %d): %s", entity, waiting, limit, lane)
    return lane


def sync_events(entity: str) -> dict[str, Any]:
    """The fast lane: the same stages, merge, echo guard and audit as the staged chain, in one task
    (no task start-ups or XCom between stages), for the few records an event brings.

    A run drains what arrives while it runs: when a pass has committed and notifications are
    waiting again (no more than ``events.fast_lane_max``), another pass takes them at once, for up
    to ``D365SYNC_EVENT_DRAIN_SECONDS``, instead of leaving them to a run queued behind this one.
    Each further pass is an engine run of its own (``<run id>.pass<n>``: its own report, watermarks and
    staging); the notifications are claimed under the Airflow run's id, so a failed or retried
    run gives back or takes back every one of them."""
    from d365sync.airflow.dag_factory import load_specs
    from d365sync.engine.pipeline import run_entity

    context = airflow_context()
    run = context["dag_run"]
    spec = load_specs()[entity]
    deadline = time.monotonic() + settings.event_drain_seconds()
    passes: list[dict[str, Any]] = []
    with clients() as (dynamics, erp, store):
        while True:
            engine_run = run.run_id if not passes else f"{run.run_id}.pass{len(passes) + 1}"
            claimed = _claim_events(store, spec, run.run_id)
            result = run_entity(
                spec,
                dynamics=dynamics,
                erp=erp,
                store=store,
                staging=staging_root(run.dag_id),
                run_id=engine_run,
                chunk_size=settings.chunk_size(),
                retries_per_run=settings.retries_per_run(),
                actor=f"airflow:{run.dag_id}",
                keep_staging=True,  # cleaned below as the staged chain's report does (a remote root too)
            )
            passes.append(
                {
                    "run_id": engine_run,
                    "events": {"claimed": claimed, "done": store.inbox_done(entity, run.run_id)},
                    "counts": result.counts,
                    "timings": result.timings,
                    "metrics": _emit_metrics(store.run_report(engine_run, entity)),
                    "staging": finish_run(run.dag_id, engine_run),
                }
            )
            if time.monotonic() >= deadline or not _more_waiting(store, spec):
                break
    summary = {
        "entity": entity,
        "lane": "fast",
        "events": _totals(p["events"] for p in passes),
        "counts": _totals(p["counts"] for p in passes),
        "timings": _totals(p["timings"] for p in passes),
        "metrics": sum(p["metrics"] for p in passes),
        "passes": len(passes),
        "run_time": run_time(context).isoformat(),
        "staging": passes[0]["staging"],
    }
    summary = xcom_safe(summary)
    log.info("summary: %s", summary)
    return summary


def _totals(parts: Iterator[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for name, value in part.items():
            total[name] = total.get(name, 0) + value
    return total


def _more_waiting(store: Any, spec: Any) -> bool:
    """Notifications waiting for a run, and few enough for the fast lane."""
    if not spec.events.inbox:
        return False
    waiting = store.inbox_pending(spec.name, limit=spec.events.fast_lane_max + 1)
    return 0 < len(waiting) <= spec.events.fast_lane_max


def report(entity: str, committed: dict[str, Any]) -> dict[str, Any]:
    """The run summary (one row of ``make sync``'s table) into the run report, then staging cleanup."""
    context = airflow_context()
    ti, run = context["ti"], context["dag_run"]
    manifests = {t: joined(ti.xcom_pull(task_ids=t) or {}) for t in STAGE_TASKS}
    manifests["commit_state"] = committed
    dry_run = bool((context.get("params") or {}).get("dry_run"))
    summary = summarize(entity, manifests, dry_run)
    if not dry_run:
        with clients() as (_dv, _erp, store):
            store.finish_run(run.run_id, entity, "success", summary["counts"], summary["timings"])
            summary["metrics"] = _emit_metrics(store.run_report(run.run_id, entity))
    summary["run_time"] = run_time(context).isoformat()
    summary["window"] = window_of(context) is not None
    summary["staging"] = finish_run(run.dag_id, run.run_id)
    summary = xcom_safe(summary)
    log.info("summary: %s", summary)
    return summary


def _emit_metrics(run_report: Any) -> int:
    """The run report's counters and timings through Airflow's metrics; never fails the run."""
    from d365sync.airflow.metrics import emit_run_metrics

    try:
        return emit_run_metrics(run_report) if run_report is not None else 0
    except Exception as exc:  # a metrics backend hiccup must not fail a committed sync
        log.warning("d365sync metrics not sent: %s", type(exc).__name__)
        return 0


def stage_timings(by_task: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Seconds of each stage task (engine stage names), from the manifests' ``seconds``."""
    return {
        TIMING_NAMES.get(task_id, task_id): float(m["seconds"])
        for task_id, m in by_task.items()
        if isinstance(m.get("seconds"), (int, float))
    }


def summarize(entity: str, by_task: Mapping[str, Mapping[str, Any]], dry_run: bool = False) -> dict[str, Any]:
    """Flat counts (the engine's own RunResult.counts) plus the Dataverse counters summed over tasks
    (``dataverse_requests``, ``token_requests``, ``dataverse_throttles``, ``dataverse_retries``)."""
    from types import SimpleNamespace

    from d365sync.engine.pipeline import Plan, RunResult

    m: dict[str, Any] = {
        "extract": {"dynamics": by_task["extract_dynamics"], "erp": by_task["extract_erp"]},
        "validate": by_task["validate"],
        "transform": by_task["transform"],
        "resolve": by_task["resolve"],
    }
    if not dry_run:
        m["load"] = {"erp": by_task["load_erp"], "dynamics": joined(by_task["load_dynamics"])}
        m["commit"] = by_task.get("commit_state") or {}
    plan = Plan.of(SimpleNamespace(entity=entity, dry_run=dry_run), m)  # type: ignore[arg-type]
    counts = dict(RunResult("", plan, m, {}).counts)
    counts |= {name: _dataverse_total(by_task, key) for key, name in DATAVERSE_COUNTS.items()}
    resolutions: dict[str, int] = {}
    for item in plan.resolved:
        label = f"{item.get('winner')} wins"
        resolutions[label] = resolutions.get(label, 0) + 1
    return {
        "entity": entity,
        "dry_run": dry_run,
        "counts": counts,
        "timings": stage_timings(by_task),
        "resolutions": resolutions,
    }


DATAVERSE_COUNTS = {
    "requests": "dataverse_requests",
    "tokens": "token_requests",
    "throttles": "dataverse_throttles",
    "retries": "dataverse_retries",
}


def _dataverse_total(by_task: Mapping[str, Mapping[str, Any]], key: str) -> int:
    return sum(int((m.get("dataverse") or {}).get(key, 0)) for m in by_task.values())


# ---------------------------------------------------------------------------- operations
def acting_user(system_run_types: tuple[str, ...] = (), needed: str = "op") -> str:
    """Whom this run of an operations DAG acts for, checked with the operations UI's role map.

    The user is the run's ``triggering_user_name``: Airflow sets it from the authenticated caller
    of its REST API or UI (the Task SDK's ``dag_run`` carries it), never from the conf or Params.
    Their role (:func:`d365sync.roles.role_of_name`: SimpleAuthManager's users, FAB's roles,
    ``D365SYNC_UI_ROLE_MAP``) must be ``op`` or ``admin``. A run without a triggering user is
    refused, except a run type in ``system_run_types`` (reconcile's nightly schedule), which acts
    as ``airflow:<dag_id>``. A refusal raises :class:`~d365sync.roles.AccessDenied` (not retried)
    before anything is opened or changed.
    """
    from d365sync import roles

    run = airflow_context()["dag_run"]
    role_map = roles.configured_role_map()
    user = roles.acting_user(
        run.dag_id,
        run.triggering_user_name,
        run_type(run),
        lambda name: roles.role_of_name(name, role_map),
        needed=needed,
        system_run_types=system_run_types,
    )
    log.info("%s run %s acts for %s", run.dag_id, run.run_id, user)
    return user


def reconcile(entity: str) -> dict[str, Any]:
    from d365sync.engine import reconcile as engine

    acting_user(system_run_types=("scheduled",))  # it queues repairs: the nightly run, or an operator
    context = airflow_context()
    params = context.get("params") or {}
    if entity not in (params.get("entities") or [entity]):
        return {"entity": entity, "skipped": True}
    with run_context(entity) as ctx:
        report_dir = staging_root("reconcile") / "reports"
        result = engine.reconcile(ctx, report_dir, queue_repairs=bool(params.get("queue_repairs", True)))
        return _with_requests(result, ctx)


def replay_dead_letters() -> dict[str, Any]:
    """Make dead letters due, recorded as done by the operator who triggered the run."""
    from d365sync.engine import operations

    by = acting_user()
    params = airflow_context()["params"]
    with state_store() as store:
        return operations.replay_dead_letters(store, params["entity"], params.get("keys") or [], by=by)


def apply_review_decisions() -> dict[str, Any]:
    """Decide review items as the operator who triggered the run (``decided_by``; no Param for it)."""
    from d365sync.engine import operations

    by = acting_user()
    params = airflow_context()["params"]
    if "decided_by" in params:
        log.warning(
            "decided_by=%r in the run's conf is ignored: decisions are recorded as the user who "
            "triggered the run (%s)",
            params["decided_by"],
            by,
        )
    with state_store() as store:
        return operations.apply_review_decisions(
            store, params["entity"], params.get("review_ids") or [], params["decision"], by=by
        )


# -------------------------------------------------------------------------------- health
HEALTH_DAG = "health_report"


@contextmanager
def state_store() -> Iterator[Any]:
    """The sync state store alone (the health report needs neither Dataverse nor the ERP)."""
    from d365sync.engine.connections import state_url
    from d365sync.engine.state import StateStore

    url, schema = state_url(_engine_conn(settings.connections().state))
    with StateStore.open(url, schema=schema, privacy=privacy()) as store:
        yield store


def health_report() -> dict[str, Any]:
    """HTML report + JSON summary under ``<staging root>/health_report/reports/``; alert when configured.

    Drift comes from reconcile's reports (``<staging root>/reconcile/reports``). The engine writes
    local files; a remote staging root (``abfs://``) gets copies, and reads drift from local copies.
    """
    import tempfile
    from pathlib import Path

    from d365sync.engine import health

    context = airflow_context()
    params, run = context.get("params") or {}, context["dag_run"]
    out_root = staging_root(HEALTH_DAG) / "reports"
    with tempfile.TemporaryDirectory(prefix="d365sync-health-") as tmp, state_store() as store:
        out_dir = _local(out_root) or Path(tmp) / "out"
        drift_dir = _local_copy(staging_root("reconcile") / "reports", Path(tmp) / "drift")
        paths = health.write_health_report(
            store,
            out_dir,
            days=int(params.get("days") or 14),
            stale_after_days=int(params.get("stale_after_days") or 7),
            drift_dir=drift_dir,
        )
        targets = {kind: _publish(path, out_root) for kind, path in paths.items()}
        summary = json.loads(paths["json"].read_text(encoding="utf-8"))
        sent = _send_health(summary, run, targets["html"], str(paths["html"]))
    log.info("health report: %s (alerts: %s)", targets, sent or "off")
    return {
        "html": targets["html"],
        "json": targets["json"],
        "entities": len(summary["entities"]),
        "sent": sent,
    }


def _local(path: Any) -> Any:
    """A local ``Path`` for a ``file://`` ObjectStoragePath, else None."""
    from pathlib import Path

    return Path(path.path) if path.protocol in ("file", "local") else None


def _local_copy(path: Any, into: Any) -> Any:
    """Reconcile's drift reports as a local folder (the folder itself when already local)."""
    if (local := _local(path)) is not None or not path.exists():
        return local
    into.mkdir(parents=True)
    for child in path.rglob("*.json"):
        (into / child.name).write_bytes(child.read_bytes())
    return into


def _publish(path: Any, out_root: Any) -> str:
    """The report file's address under the staging root (copied there when the root is remote)."""
    if _local(out_root) is not None:
        return f"file://{path}"
    target = out_root / path.name
    target.write_bytes(path.read_bytes())
    return str(target)


def _send_health(summary: dict[str, Any], run: Any, link: str, attachment: str) -> list[str]:
    from d365sync.airflow import alerts

    channels = settings.alert_channels()
    if not channels.enabled:
        return []
    alert = alerts.health_alert(summary, run.dag_id, run.run_id, link, attachment)
    return alerts.send(alert, channels)


# ------------------------------------------------------------------------------- privacy
def purge_expired() -> dict[str, Any]:
    """The health DAG's retention purge: old audit rows, closed dead letters, run reports, done or
    ignored inbox events, staging files.

    Periods come from ``privacy.retention`` in the entities' ``_defaults.yaml``.
    """
    from d365sync.airflow.dag_factory import entities_dir
    from d365sync.engine import data_subjects
    from d365sync.spec import load_privacy_settings

    retention = load_privacy_settings(entities_dir()).retention
    with state_store() as store:
        counts = data_subjects.purge(store, retention)
    root = _staging_base()
    counts |= data_subjects.purge_staging([root], retention.staging_days)
    log.info("retention purge: %s", counts)
    return counts


def privacy_erase() -> dict[str, Any]:
    """The ``privacy_erase`` DAG: erase one data subject (``params.entity``, ``params.key``) from every
    store the sync owns; returns the counts (the key itself never goes to XCom or the log).
    Irreversible, so only an ``admin`` may trigger it."""
    from d365sync.airflow.dag_factory import load_specs
    from d365sync.engine import data_subjects

    user = acting_user(needed="admin")
    context = airflow_context()
    params, run = context.get("params") or {}, context["dag_run"]
    entity, key = str(params.get("entity") or ""), str(params.get("key") or "").strip()
    specs = load_specs()
    if entity not in specs:
        raise ValueError(f"no entity {entity!r} (have {', '.join(sorted(specs))})")
    if not key:
        raise ValueError("params.key is empty: name the record key of the data subject")
    with state_store() as store:
        report = data_subjects.erase(
            store,
            entity,
            key,
            actor=f"airflow:{user}:{run.run_id}",
            fields=specs[entity].pii_fields,
            staging_roots=[_staging_base()],
        )
    log.info("erased one %s subject (key hash %s): %s", entity, report["key_hash"], report["counts"])
    return report


def _staging_base() -> Any:
    """The staging root above every DAG's folder (``ObjectStoragePath``)."""
    from airflow.sdk import ObjectStoragePath

    config = settings.staging()
    return ObjectStoragePath(config.root, conn_id=config.conn_id)
