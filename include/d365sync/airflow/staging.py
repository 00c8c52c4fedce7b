"""The staging root of the DAGs: an ``ObjectStoragePath`` (``file://`` by default, ``abfs://`` by config).

Layout: ``<root>/<dag_id>/<run_id>/<entity>/…`` (the engine's :class:`~d365sync.engine.staging.Staging`
owns everything below ``<dag_id>``). After ``commit_state`` a run's files are removed, or, with
``D365SYNC_STAGING_RETENTION_HOURS`` > 0, kept and marked ``_committed``; every later cleanup
sweeps committed runs older than the retention. Uncommitted (failed) runs are never swept: their
files are what a retry resumes from and what an operator debugs.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from d365sync.airflow import settings

log = logging.getLogger(__name__)
MARKER = "_committed"


def staging_root(dag_id: str) -> Any:
    """``ObjectStoragePath`` of one DAG's staging area (created on first write)."""
    from airflow.sdk import ObjectStoragePath

    config = settings.staging()
    return ObjectStoragePath(f"{config.root}/{dag_id}", conn_id=config.conn_id)


def run_dir(dag_id: str, run_id: str) -> Any:
    from d365sync.engine.staging import _safe

    return staging_root(dag_id) / _safe(run_id)


def finish_run(dag_id: str, run_id: str, now: datetime | None = None) -> dict[str, Any]:
    """After commit: drop or mark this run's files, then sweep committed runs past retention."""
    now = now or datetime.now(UTC)
    retention = settings.staging().retention
    here = run_dir(dag_id, run_id)
    if retention <= timedelta(0):
        removed = _remove(here)
    else:
        if here.exists():
            (here / MARKER).write_text(now.isoformat())
        removed = False
    swept = sweep(dag_id, retention, now)
    return {"removed": removed, "kept_for_hours": retention.total_seconds() / 3600, "swept": swept}


def sweep(dag_id: str, retention: timedelta, now: datetime) -> int:
    """Remove committed runs whose marker is older than ``retention``."""
    root = staging_root(dag_id)
    if not root.exists():
        return 0
    swept = 0
    for child in root.iterdir():
        marker = child / MARKER
        if not marker.exists():
            continue
        committed = datetime.fromisoformat(marker.read_text().strip())
        if now - committed >= retention and _remove(child):
            swept += 1
    return swept


def _remove(path: Any) -> bool:
    if not path.exists():
        return False
    path.rmdir(recursive=True)
    log.info("staging removed: %s", path)
    return True
