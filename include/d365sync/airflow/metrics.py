"""Per-run counters and timings through Airflow's metrics (StatsD, Datadog or OpenTelemetry).

Why Airflow's ``stats`` and not a client of our own: the task process already has it set up
from ``[metrics]`` (``statsd_on``/``statsd_host``/``statsd_port``/``statsd_prefix``,
``otel_on`` …, allow/block lists), so the sync's figures land next to Airflow's own, in the
same backend, with no second configuration. With metrics off, every call is a no-op.

Names (the backend adds Airflow's prefix, ``airflow.`` by default with StatsD):

=====================================  =======  ================================================
``d365sync.<entity>.runs.<status>``    counter  1 per finished run (``success``, ``failed`` …)
``d365sync.<entity>.<count>``          counter  every count of the run report: ``extracted_dynamics``,
                                                ``extracted_erp``, ``erp_create``, ``dynamics_update`` …,
                                                ``conflicts``, ``review``, ``quarantined``, ``parked``,
                                                ``erp_failed``, ``dynamics_failed``,
                                                ``dataverse_requests``, ``dataverse_throttles`` …
``d365sync.<entity>.duration``         timer    wall time of the run (start to finish)
``d365sync.<entity>.<timing>``         timer    every timing of the run report (seconds in the
                                                report, sent as a duration): the stages
                                                ``extract_dynamics``, ``extract_erp``, ``validate``,
                                                ``transform``, ``resolve``, ``load_erp``,
                                                ``load_dynamics``, ``commit``
=====================================  =======  ================================================

The same counts and timings are stored in the run report (``StateStore.finish_run``), which the
dashboard and the health report read, so both views agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

PREFIX = "d365sync"
_INVALID = re.compile(r"[^a-zA-Z0-9_\-]")

Metric = tuple[Literal["incr", "timing"], str, int | timedelta]


def metric_name(entity: str, name: str) -> str:
    """``d365sync.<entity>.<name>`` with characters StatsD does not allow replaced by ``_``."""
    parts = [PREFIX, _INVALID.sub("_", entity), *(_INVALID.sub("_", p) for p in name.split("."))]
    return ".".join(parts)


def run_metrics(report: Any) -> list[Metric]:
    """The metrics of one run report (a ``RunReport`` or a mapping with the same keys)."""
    entity, status = _get(report, "entity"), _get(report, "status", "success")
    counts: Mapping[str, Any] = _get(report, "counts", {}) or {}
    timings: Mapping[str, Any] = _get(report, "timings", {}) or {}
    out: list[Metric] = [("incr", metric_name(entity, f"runs.{status}"), 1)]
    out += [("incr", metric_name(entity, k), int(v)) for k, v in sorted(counts.items()) if _number(v)]
    if (duration := _duration(report)) is not None:
        out.append(("timing", metric_name(entity, "duration"), duration))
    out += [
        ("timing", metric_name(entity, k), timedelta(seconds=float(v)))
        for k, v in sorted(timings.items())
        if _number(v) and k != "duration"
    ]
    return out


def emit_run_metrics(report: Any, stats: Any = None) -> int:
    """Send the run's metrics through Airflow's stats backend; returns how many were sent."""
    if stats is None:
        from airflow.sdk.observability import stats
    metrics = run_metrics(report)
    for kind, name, value in metrics:
        if kind == "incr":
            stats.incr(name, value)
        else:
            stats.timing(name, value)
    return len(metrics)


def _get(report: Any, key: str, default: Any = None) -> Any:
    if isinstance(report, Mapping):
        return report.get(key, default)
    return getattr(report, key, default)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _duration(report: Any) -> timedelta | None:
    started, finished = _get(report, "started_at"), _get(report, "finished_at")
    if started is not None and finished is not None:
        return finished - started
    seconds = _get(report, "duration_s")
    return timedelta(seconds=float(seconds)) if _number(seconds) else None
