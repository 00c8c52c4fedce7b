"""Cheap change probes for event-driven runs (issue 13): what a trigger may ask between runs.

Airflow-free: the triggers in :mod:`d365sync.airflow.triggers` call these in a worker thread.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from d365sync.engine.state import StateStore


def erp_cursor_max(erp: Any, spec: Any) -> datetime | None:
    """``MAX(<cursor column>)`` of the entity's ERP table: one indexed aggregate, no rows read.

    None for an empty table or a value that is not a timestamp (a trigger then waits for the
    next poll or the cron)."""
    detection = spec.erp.change_detection
    if detection.mode != "cursor":
        raise ValueError(f"{spec.name}: the ERP side has no cursor column (mode {detection.mode})")
    q = erp.dialect.q
    return as_timestamp(erp.scalar(f"SELECT MAX({q(detection.column)}) FROM {q(spec.erp.table)}"))


def committed_erp_cursor(store: StateStore, entity: str) -> datetime | None:
    """The ERP cursor value the last committed run read up to, or None before the first run."""
    mark = store.watermark(entity, "erp")
    if mark is None or not mark.token:
        return None
    return as_timestamp(json.loads(mark.token).get("value"))


def as_timestamp(value: Any) -> datetime | None:
    """A naive-UTC timestamp from what a driver or a JSON token holds (text from SQLite)."""
    if isinstance(value, datetime):
        return value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)
    if isinstance(value, str) and value.strip():
        try:
            return as_timestamp(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
        except ValueError:
            return None
    return None
