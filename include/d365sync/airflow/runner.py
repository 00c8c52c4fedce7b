"""Run DAGs in-process with ``dag.test()`` and print what each entity run did.

``make sync``, the DAG tests and the benchmarks use it::

    python -m d365sync.airflow.runner                 # every entity DAG, parents first
    python -m d365sync.airflow.runner sync_customers --conf '{"dry_run": true}'
    python -m d365sync.airflow.runner orders --logical-date 2026-11-20T00:00:00+00:00 --json

It needs a migrated metadata DB and ``AIRFLOW__CORE__DAGS_FOLDER`` pointing at the repo's
``dags/`` (``dag.test()`` refuses DAGs it cannot find there). Runs default to
``logical_date=None``, the way a manual trigger from the UI or API without a date arrives.
The ``dynamics_api`` pool is created when missing. ``--json`` prints one JSON line last:
``{"runs": [...], "warnings": [...]}`` (warnings raised during the runs, for the tests).
Deadline alerts are dropped for these in-process runs (see :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import datetime
from typing import Any

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


def run_one(dag: Any, logical_date: datetime | None, conf: dict[str, Any] | None) -> dict[str, Any]:
    started = time.perf_counter()
    dr = dag.test(logical_date=logical_date, run_conf=conf)
    seconds = round(time.perf_counter() - started, 3)
    tasks = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
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
            f"| {run['dag_id']} | {run['state']} | {run['seconds']} | " + " | ".join(cells) + f" | {res} |"
        )
    return "\n".join(lines)


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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
    if args.json:
        print(json.dumps({"runs": runs, "warnings": found}, default=str))
    else:
        print(table(runs))
    return 0 if all(r["state"] == "success" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
