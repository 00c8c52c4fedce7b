"""The state store's side of a failed Airflow run: its run report says ``failed``.

The ``report`` task closes a run report with ``success``; when a run fails that task never runs, so
this DAG-level ``on_failure_callback`` of the entity DAGs closes the report instead, with the failed
task and the (redacted) reason. DAG-level, not per task: it runs once the run is over, so a sibling
task starting after the failure (``extract_dynamics`` re-opens the report with ``start_run``) cannot
leave it "running". It runs in the dag-processor (in-process under ``dag.test()``) and never
raises: a state store that cannot be reached is logged, not turned into a second failure.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def record_failed_run(context: Any) -> None:
    """``on_failure_callback``: mark the entity run's report failed (dry runs keep no report)."""
    try:
        _record(context)
    except Exception:
        log.exception("could not record the failed run in the state store")


def _record(context: Any) -> None:
    from d365sync.airflow.alerts import redact
    from d365sync.airflow.dag_factory import DAG_PREFIX
    from d365sync.airflow.tasks import state_store  # only the store: Dynamics or the ERP may be down

    ti, run = context.get("ti"), context["dag_run"]
    dag_id = str(getattr(run, "dag_id", None) or getattr(ti, "dag_id", ""))
    if not dag_id.startswith(DAG_PREFIX) or (context.get("params") or {}).get("dry_run"):
        return
    entity, exc = dag_id.removeprefix(DAG_PREFIX), context.get("exception")
    task = getattr(ti, "task_id", None) or "a task"
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else str(context.get("reason") or "failed")
    error = redact(f"{task} failed: {detail}")
    with state_store() as store:
        if store.run_report(run.run_id, entity) is None:
            store.start_run(run.run_id, entity)  # failed before extract opened the report
        store.finish_run(run.run_id, entity, "failed", error=error)
        store.inbox_release(entity, run.run_id)  # its notifications wait for the next run
    log.warning("run %s of %s recorded as failed (%s)", run.run_id, entity, task)
