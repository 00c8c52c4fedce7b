"""Sync health from the state store's history: figures, SVG charts, an HTML report and JSON.

Why in the engine: the daily ``health_report`` DAG, the UI dashboard and ``make``-level tools
all need the same figures, and none of them should need Airflow to compute them. Charts are
inline SVG drawn here (no JavaScript, no CDN): they render in the Airflow iframe, in an e-mail
attachment and in a file opened from disk alike.

Figures, per entity, over the last ``days``:

* **runs / success rate**: finished run reports (``success`` vs anything else);
* **last success**: finish time of the newest successful run;
* **records per run**: ``records`` of the run counts (records the merge looked at), else the
  extracted rows of both sides;
* **error rate**: (quarantined + failed loads) / extracted rows, per run and over the window;
* **lag**: for records saved in the window, the time from the newest source change
  (``dynamics_modified``/``erp_modified`` of the base) to the save (``updated_at``): p50, p95, max.
  Never measured from before the sync could see the record: the change time is raised to the
  record's *visibility floor* — the start of the entity's last run before the run that first
  stored it (``first_seen_at``): that run looked at the source and the record was not in it yet;
  the first run itself when there was none. An initial load of legacy rows whose ``LAST_UPD`` is
  years old so shows the run's duration, a record created between two runs the time from its
  creation (its wait for the next run included), and an update of a known record the time from
  the update;
* **quarantines, conflicts, review items, API requests, throttles**: run counts ``quarantined``,
  ``conflicts``, ``review``, ``dataverse_requests``, ``dataverse_throttles`` (or ``throttles``);
* **open reviews over time**: items open at the end of each day; **stale**: open longer than
  ``stale_after_days``;
* **top failure causes**: failed runs' errors and pending dead letters, grouped by message with
  digits and quoted values blanked;
* **drift**: the newest ``*.json`` reconcile report per entity in ``drift_dir`` (reports carry
  ``entity`` and a ``counts`` mapping, e.g. ``{"differ": 3, "missing_erp": 1}``); ``None`` when no
  directory is given or it holds no report.
"""

from __future__ import annotations

import html
import json
import math
import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select

from d365sync.engine.migrations import schema as t
from d365sync.engine.state import StateStore, decode

LAG_SAMPLE = 50_000
STALE_LIST = 100  # stale items listed in the summary (all are counted)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class RunPoint:
    """One finished run as the charts plot it."""

    entity: str
    run_id: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    records: int
    extracted: int
    errors: int
    quarantined: int
    conflicts: int
    reviews: int
    api_requests: int
    throttles: int
    error: str | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.extracted if self.extracted else 0.0


@dataclass
class EntityHealth:
    """One entity's figures over the window."""

    entity: str
    runs: int = 0
    successes: int = 0
    last_success_at: datetime | None = None
    last_status: str | None = None
    records_per_run: float = 0.0
    records_total: int = 0
    error_rate: float = 0.0
    lag_p50_s: float | None = None
    lag_p95_s: float | None = None
    lag_max_s: float | None = None
    open_reviews: int = 0
    stale_reviews: int = 0
    dead_letters: int = 0
    api_requests: int = 0
    throttles: int = 0

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.runs if self.runs else None


@dataclass
class HealthReport:
    """Everything the dashboard and the report show."""

    generated_at: datetime
    days: int
    stale_after_days: int
    entities: dict[str, EntityHealth]
    runs: dict[str, list[RunPoint]]
    open_reviews_daily: dict[str, list[tuple[datetime, int]]]
    top_failures: list[dict[str, Any]]
    stale_reviews: list[dict[str, Any]]
    drift: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


# --- building -------------------------------------------------------------------------------


def build_health(
    store: StateStore,
    now: datetime | None = None,
    days: int = 14,
    stale_after_days: int = 7,
    drift_dir: Path | str | None = None,
    entities: Iterable[str] = (),
) -> HealthReport:
    """Compute the health figures from the store (read-only)."""
    now = now or datetime.now(UTC)
    since = now - timedelta(days=days)
    runs = _runs(store, since)
    names = sorted(set(entities) | set(runs) | set(_known_entities(store)))
    report = HealthReport(now, days, stale_after_days, {n: EntityHealth(n) for n in names}, runs, {}, [], [])
    for name in names:
        _fill_runs(report.entities[name], runs.get(name, []))
        _fill_lag(report.entities[name], _lags(store, name, since))
    _fill_reviews(store, report, since)
    _fill_dead_letters(store, report)
    report.top_failures = top_failures(store, runs)
    report.drift = read_drift(drift_dir)
    if report.drift is None:
        report.notes.append("no reconcile drift report found" + (f" in {drift_dir}" if drift_dir else ""))
    return report


def _known_entities(store: StateStore) -> set[str]:
    with store.engine.connect() as conn:
        found: set[str] = set()
        for table in (t.review, t.dead_letter):
            found.update(conn.execute(select(table.c.entity).distinct()).scalars())
    return found


def _runs(store: StateStore, since: datetime) -> dict[str, list[RunPoint]]:
    query = select(t.run).where(t.run.c.started_at >= since).order_by(t.run.c.started_at)
    out: dict[str, list[RunPoint]] = {}
    with store.engine.connect() as conn:
        for row in conn.execute(query).mappings():
            if row["status"] != "running":
                out.setdefault(row["entity"], []).append(_point(row))
    return out


def _point(row: Mapping[str, Any]) -> RunPoint:
    counts: dict[str, int] = decode(row["counts_json"]) or {}
    c = Counter({k: int(v) for k, v in counts.items() if isinstance(v, (int, float))})
    extracted = c["extracted_dynamics"] + c["extracted_erp"]
    started, finished = row["started_at"], row["finished_at"]
    return RunPoint(
        entity=row["entity"],
        run_id=row["run_id"],
        status=row["status"],
        started_at=started,
        finished_at=finished,
        duration_s=(finished - started).total_seconds() if finished else None,
        records=c["records"] or extracted,
        extracted=extracted,
        errors=c["quarantined"] + c["erp_failed"] + c["dynamics_failed"],
        quarantined=c["quarantined"],
        conflicts=c["conflicts"],
        reviews=c["review"],
        api_requests=c["dataverse_requests"],
        throttles=c["dataverse_throttles"] or c["throttles"],
        error=row["error"],
    )


def _fill_runs(health: EntityHealth, runs: Sequence[RunPoint]) -> None:
    health.runs = len(runs)
    health.successes = sum(1 for r in runs if r.status == "success")
    ok = [r.finished_at for r in runs if r.status == "success" and r.finished_at]
    health.last_success_at = max(ok) if ok else None
    health.last_status = runs[-1].status if runs else None
    health.records_total = sum(r.records for r in runs)
    health.records_per_run = health.records_total / len(runs) if runs else 0.0
    extracted = sum(r.extracted for r in runs)
    health.error_rate = sum(r.errors for r in runs) / extracted if extracted else 0.0
    health.api_requests = sum(r.api_requests for r in runs)
    health.throttles = sum(r.throttles for r in runs)


def _lags(store: StateStore, entity: str, since: datetime) -> list[float]:
    r = t.record
    query = (
        select(r.c.updated_at, r.c.dynamics_modified, r.c.erp_modified, r.c.first_seen_at)
        .where(r.c.entity == entity, r.c.status == "synced", r.c.updated_at >= since)
        .order_by(r.c.updated_at.desc())
        .limit(LAG_SAMPLE)
    )
    starts = select(t.run.c.started_at).where(t.run.c.entity == entity).order_by(t.run.c.started_at)
    lags: list[float] = []
    with store.engine.connect() as conn:
        runs = list(conn.execute(starts).scalars())
        for saved, dyn, erp, first_seen in conn.execute(query):
            changed = max((m for m in (dyn, erp) if m is not None), default=None)
            floor = visibility_floor(first_seen, runs)
            start = max((m for m in (changed, floor) if m is not None), default=None)
            if start is not None and start <= saved:
                lags.append((saved - start).total_seconds())
    return lags


def visibility_floor(first_seen: datetime | None, run_starts: Sequence[datetime]) -> datetime | None:
    """The earliest time the sync can be blamed for not having a record yet.

    ``first_seen`` is the start of the run that first stored the record. The entity's run before
    it (``run_starts`` sorted) read the source without the record, so the record became visible
    after that run started; with no earlier run, the record predates the sync and was first seen
    by ``first_seen``'s run.
    """
    if first_seen is None:
        return None
    before = bisect_left(run_starts, first_seen)
    return run_starts[before - 1] if before else first_seen


def _fill_lag(health: EntityHealth, lags: list[float]) -> None:
    if lags:
        health.lag_p50_s = percentile(lags, 50)
        health.lag_p95_s = percentile(lags, 95)
        health.lag_max_s = max(lags)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (the value a reader can find in the data)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def _fill_reviews(store: StateStore, report: HealthReport, since: datetime) -> None:
    r = t.review
    cols = (r.c.id, r.c.entity, r.c.record_key, r.c.field, r.c.status, r.c.opened_at)
    cols += (r.c.decided_at, r.c.applied_at)
    query = select(*cols).where(or_(r.c.status == "open", r.c.decided_at >= since, r.c.applied_at >= since))
    stale_before = report.generated_at - timedelta(days=report.stale_after_days)
    spans: dict[str, list[tuple[datetime, datetime | None]]] = {}
    with store.engine.connect() as conn:
        for row in conn.execute(query).mappings():
            end = None if row["status"] == "open" else (row["decided_at"] or row["applied_at"])
            if end is not None and end < since:
                continue
            spans.setdefault(row["entity"], []).append((row["opened_at"], end))
            if row["status"] == "open":
                _count_open(report, row, stale_before)
    report.open_reviews_daily = {e: _daily_open(s, since, report.generated_at) for e, s in spans.items()}


def _count_open(report: HealthReport, row: Mapping[str, Any], stale_before: datetime) -> None:
    health = report.entities.setdefault(row["entity"], EntityHealth(row["entity"]))
    health.open_reviews += 1
    if row["opened_at"] < stale_before:
        health.stale_reviews += 1
        if len(report.stale_reviews) >= STALE_LIST:
            return
        report.stale_reviews.append(
            {
                "id": row["id"],
                "entity": row["entity"],
                "record_key": row["record_key"],
                "field": row["field"],
                "opened_at": row["opened_at"].isoformat(),
                "age_days": (report.generated_at - row["opened_at"]).days,
            }
        )


def _daily_open(
    spans: list[tuple[datetime, datetime | None]], since: datetime, now: datetime
) -> list[tuple[datetime, int]]:
    days = int((now - since).total_seconds() // 86400)
    points = []
    for i in range(days, -1, -1):
        at = now - timedelta(days=i)
        points.append((at, sum(1 for opened, end in spans if opened <= at and (end is None or end > at))))
    return points


def _fill_dead_letters(store: StateStore, report: HealthReport) -> None:
    d = t.dead_letter
    with store.engine.connect() as conn:
        query = select(d.c.entity).where(d.c.status.in_(("pending", "replay")))
        for entity in conn.execute(query).scalars():
            report.entities.setdefault(entity, EntityHealth(entity)).dead_letters += 1


# Variable parts blanked in failure causes; e-mails first, so no address reaches a report.
_NOISE = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+|'[^']*'|\"[^\"]*\"|\b[0-9a-f]{8}-[0-9a-f-]{27}\b|\d+")


def failure_cause(message: str) -> str:
    """A message with its variable parts (values, ids, numbers, e-mails) blanked.

    Failures of one kind then group together, and no personal data reaches the report.
    """
    first = (message or "").strip().splitlines()[0] if message and message.strip() else "(no message)"
    return _NOISE.sub("…", first)[:160]


def top_failures(
    store: StateStore, runs: Mapping[str, Sequence[RunPoint]], limit: int = 10
) -> list[dict[str, Any]]:
    """The most frequent failure causes: failed runs (window) and open dead letters, by stage."""
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[str]] = {}
    for entity, points in runs.items():
        for p in points:
            if p.status != "success":
                key = ("run", failure_cause(p.error or p.status))
                counts[key] += 1
                where.setdefault(key, set()).add(entity)
    d = t.dead_letter
    query = select(d.c.entity, d.c.stage, d.c.error).where(d.c.status.in_(("pending", "replay")))
    with store.engine.connect() as conn:
        for entity, stage, error in conn.execute(query):
            key = (stage, failure_cause(error))
            counts[key] += 1
            where.setdefault(key, set()).add(entity)
    return [
        {"stage": stage, "cause": cause, "count": n, "entities": sorted(where[stage, cause])}
        for (stage, cause), n in counts.most_common(limit)
    ]


def read_drift(drift_dir: Path | str | None) -> dict[str, Any] | None:
    """The newest reconcile report per entity found under ``drift_dir`` (``**/*.json``)."""
    if drift_dir is None or not Path(drift_dir).is_dir():
        return None
    newest: dict[str, tuple[float, dict[str, Any]]] = {}
    for path in Path(drift_dir).rglob("*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("entity"), str):
            mtime = path.stat().st_mtime
            if data["entity"] not in newest or newest[data["entity"]][0] < mtime:
                newest[data["entity"]] = (mtime, {"file": str(path), "counts": data.get("counts") or {}})
    return {entity: found for entity, (_, found) in sorted(newest.items())} or None


# --- JSON summary ---------------------------------------------------------------------------


def summary(report: HealthReport) -> dict[str, Any]:
    """The JSON summary: plain types only, datetimes as ISO 8601."""
    entities = {}
    for name, h in sorted(report.entities.items()):
        data = asdict(h)
        data["success_rate"] = h.success_rate
        entities[name] = _plain(data)
    return {
        "generated_at": report.generated_at.isoformat(),
        "window_days": report.days,
        "stale_after_days": report.stale_after_days,
        "entities": entities,
        "top_failures": report.top_failures,
        "stale_reviews": report.stale_reviews,
        "drift": report.drift,
        "notes": report.notes,
    }


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}


# --- SVG charts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    width: int = 560
    height: int = 200
    left: int = 48
    right: int = 12
    top: int = 28
    bottom: int = 34

    @property
    def inner_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def inner_h(self) -> int:
        return self.height - self.top - self.bottom


def line_chart(
    title: str, series: Mapping[str, Sequence[tuple[datetime, float]]], unit: str = "", box: Box = Box()
) -> str:
    """A multi-series time chart as a self-contained ``<svg>`` (x: time, y: value from 0).

    ``unit="duration"``: values are seconds, shown in s, min or h after the largest value. The
    legend sits in its own rows under the time axis, so a long title never runs into it.
    """
    points = [p for s in series.values() for p in s]
    if not points:
        return _no_data(title, box)
    if unit == "duration":
        scale, unit = duration_unit(max(p[1] for p in points))
        series = {n: [(at, v / scale) for at, v in pts] for n, pts in series.items()}
        points = [p for s in series.values() for p in s]
    names = sorted(series)
    rows = legend_rows(names, box.width - box.left - box.right)
    box = _with_legend(box, len(rows))
    parts = [_svg_open(title, box)]
    t0 = min(p[0] for p in points).timestamp()
    t1 = max(p[0] for p in points).timestamp()
    y1 = nice_top(max(p[1] for p in points))
    parts += _axes(box, y1, unit, datetime.fromtimestamp(t0, UTC), datetime.fromtimestamp(t1, UTC))
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    for name in names:
        xy = [(_x(box, p[0].timestamp(), t0, t1), _y(box, p[1], y1)) for p in sorted(series[name])]
        parts.append(_polyline(xy, colors[name], name))
    parts += _legend(box, rows, colors)
    return "".join([*parts, "</svg>"])


def bar_chart(title: str, values: Mapping[str, float], unit: str = "", box: Box = Box()) -> str:
    """One bar per label (e.g. per entity) as a self-contained ``<svg>`` (``unit="duration"``: seconds)."""
    if not values:
        return _no_data(title, box)
    if unit == "duration":
        scale, unit = duration_unit(max(values.values()))
        values = {k: v / scale for k, v in values.items()}
    parts = [_svg_open(title, box)]
    top = nice_top(max(values.values()))
    parts += _axes(box, top, unit, None, None)
    slot = box.inner_w / len(values)
    for i, (label, value) in enumerate(values.items()):
        h = value / top * box.inner_h
        x = box.left + i * slot + slot * 0.15
        y = box.top + box.inner_h - h
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
            f'fill="{PALETTE[i % len(PALETTE)]}"><title>{_e(label)}: {_num(value)}{_e(unit)}</title></rect>'
        )
        parts.append(_text(x + slot * 0.35, box.height - box.bottom + 14, label, "middle"))
    return "".join([*parts, "</svg>"])


def _no_data(title: str, box: Box) -> str:
    return (
        _svg_open(title, box) + _text(box.width / 2, box.height / 2, "no data", "middle", "#888") + "</svg>"
    )


def duration_unit(max_seconds: float) -> tuple[float, str]:
    """(divisor, unit) to show durations up to ``max_seconds``: seconds, minutes or hours."""
    if max_seconds >= 3600:
        return 3600.0, " h"
    if max_seconds >= 60:
        return 60.0, " min"
    return 1.0, " s"


def nice_top(value: float) -> float:
    """The axis top: ``value`` rounded up to 1, 2, 2.5 or 5 times a power of ten (1 when all zero)."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= value * (1 - 1e-12))


def _svg_open(title: str, box: Box) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {box.width} '
        f'{box.height}" width="{box.width}" height="{box.height}" font-family="sans-serif" font-size="11">'
        f"<title>{_e(title)}</title>{_text(box.left, 16, title, 'start', '#222', 13)}"
    )


def _axes(box: Box, y1: float, unit: str, t0: datetime | None, t1: datetime | None) -> list[str]:
    base = box.top + box.inner_h
    out = [
        f'<line x1="{box.left}" y1="{base}" x2="{box.left + box.inner_w}" y2="{base}" stroke="#999"/>',
        f'<line x1="{box.left}" y1="{box.top}" x2="{box.left}" y2="{base}" stroke="#999"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = base - frac * box.inner_h
        out.append(_text(box.left - 4, y + 4, f"{_num(y1 * frac)}{unit}", "end", "#555"))
    if t0 and t1:
        out.append(_text(box.left, base + 14, t0.strftime("%m-%d %H:%M"), "start", "#555"))
        out.append(_text(box.left + box.inner_w, base + 14, t1.strftime("%m-%d %H:%M"), "end", "#555"))
    return out


def _x(box: Box, ts: float, t0: float, t1: float) -> float:
    return box.left + (box.inner_w * (ts - t0) / (t1 - t0) if t1 > t0 else box.inner_w / 2)


def _y(box: Box, value: float, y1: float) -> float:
    return box.top + box.inner_h - box.inner_h * value / y1


def _polyline(xy: list[tuple[float, float]], color: str, name: str) -> str:
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{color}"/>' for x, y in xy[-200:])
    return (
        f'<g class="series" data-series="{_e(name)}"><polyline points="{pts}" fill="none" '
        f'stroke="{color}" stroke-width="1.5"/>{dots}</g>'
    )


LEGEND_ROW = 16  # px per legend row, under the time axis labels


def legend_rows(names: Sequence[str], width: float) -> list[list[tuple[str, float]]]:
    """Legend entries as rows of (name, x offset), wrapped to ``width`` (~6.5 px per character)."""
    rows: list[list[tuple[str, float]]] = [[]]
    x = 0.0
    for name in names:
        w = 14 + 6.5 * len(name) + 14
        if rows[-1] and x + w > width:
            rows.append([])
            x = 0.0
        rows[-1].append((name, x))
        x += w
    return rows if rows[0] else []


def _with_legend(box: Box, rows: int) -> Box:
    extra = rows * LEGEND_ROW
    return replace(box, height=box.height + extra, bottom=box.bottom + extra)


def _legend(box: Box, rows: list[list[tuple[str, float]]], colors: Mapping[str, str]) -> list[str]:
    out = []
    first = box.top + box.inner_h + 18  # under the time labels (at +14)
    for r, row in enumerate(rows):
        y = first + r * LEGEND_ROW
        for name, dx in row:
            x = box.left + dx
            out.append(
                f'<rect class="legend" x="{x:.1f}" y="{y:.1f}" width="10" height="10" fill="{colors[name]}"/>'
                + _text(x + 14, y + 9, name, "start")
            )
    return out


def _text(x: float, y: float, text: str, anchor: str, color: str = "#333", size: int = 11) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{color}" font-size="{size}">'
        f"{_e(text)}</text>"
    )


def _num(value: float) -> str:
    """``0``, ``2.5``, ``0.25``, ``1.5k``: no trailing zeros, so an axis never reads ``0.00``."""
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}".rstrip("0").rstrip(".") + "k"
    if value == int(value):
        return f"{value:.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


# --- charts of a report, HTML, files --------------------------------------------------------


def charts(report: HealthReport) -> dict[str, str]:
    """The dashboard's charts, by name, as SVG strings."""
    per_run = {
        "records": ("Records per run", lambda p: p.records, ""),
        "error_rate": ("Error rate per run", lambda p: p.error_rate * 100, "%"),
        "quarantined": ("Quarantined rows per run", lambda p: p.quarantined, ""),
        "conflicts": ("Conflicts per run", lambda p: p.conflicts, ""),
        "api_requests": ("Dataverse API requests per run", lambda p: p.api_requests, ""),
        "throttles": ("Throttle events (429) per run", lambda p: p.throttles, ""),
        "duration": ("Run duration", lambda p: p.duration_s or 0.0, "duration"),
    }
    out = {}
    for name, (title, value, unit) in per_run.items():
        series = {e: [(p.started_at, float(value(p))) for p in pts] for e, pts in report.runs.items() if pts}
        out[name] = line_chart(title, series, unit)
    daily = {e: list(s) for e, s in report.open_reviews_daily.items()}
    out["open_reviews"] = line_chart("Open review items (end of day)", daily)
    lag = {e: h.lag_p95_s or 0.0 for e, h in report.entities.items() if h.lag_p95_s is not None}
    out["lag_p95"] = bar_chart("Sync lag p95", lag, "duration")
    return out


def render_html(report: HealthReport) -> str:
    """A standalone HTML report: the table, the charts and the failure causes."""
    rows = "".join(_entity_row(h) for _, h in sorted(report.entities.items()))
    figures = "".join(f'<figure id="chart-{n}">{svg}</figure>' for n, svg in charts(report).items())
    failures = "".join(
        f"<tr><td>{_e(f['stage'])}</td><td>{_e(f['cause'])}</td><td>{f['count']}</td>"
        f"<td>{_e(', '.join(f['entities']))}</td></tr>"
        for f in report.top_failures
    )
    drift = _e(json.dumps(report.drift, indent=2)) if report.drift else "no reconcile report"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>d365sync health</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}"
        "figure{display:inline-block;margin:.5em}</style></head><body>"
        f"<h1>Sync health</h1><p>Generated {report.generated_at:%Y-%m-%d %H:%M} UTC, "
        f"last {report.days} days.</p><table><tr>{_HEAD}</tr>{rows}</table>{figures}"
        "<h2>Top failure causes</h2><table><tr><th>stage</th><th>cause</th><th>count</th>"
        f"<th>entities</th></tr>"
        f"{failures}</table><h2>Drift (reconcile)</h2><pre>{drift}</pre>"
        f"<h2>Open reviews older than {report.stale_after_days} days</h2><p>{len(report.stale_reviews)}</p>"
        "</body></html>"
    )


_HEAD = "".join(
    f"<th>{h}</th>"
    for h in (
        "entity", "runs", "success rate", "last success", "records/run", "error rate",
        "lag p50", "lag p95", "open reviews", "stale", "dead letters",
    )
)  # fmt: skip


def _entity_row(h: EntityHealth) -> str:
    rate = "-" if h.success_rate is None else f"{h.success_rate:.0%}"
    last = h.last_success_at.strftime("%Y-%m-%d %H:%M") if h.last_success_at else "never"
    cells = (
        h.entity, str(h.runs), rate, last, f"{h.records_per_run:.0f}", f"{h.error_rate:.2%}",
        fmt_duration(h.lag_p50_s), fmt_duration(h.lag_p95_s), str(h.open_reviews), str(h.stale_reviews),
        str(h.dead_letters),
    )  # fmt: skip
    return "<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"


def fmt_duration(seconds: float | None) -> str:
    """``95 s``, ``12 min``, ``3.5 h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def write_health_report(
    store: StateStore,
    out_dir: Path | str,
    now: datetime | None = None,
    days: int = 14,
    stale_after_days: int = 7,
    drift_dir: Path | str | None = None,
) -> dict[str, Path]:
    """Write ``health-<date>.html`` and ``health-<date>.json`` into ``out_dir``; return both paths."""
    report = build_health(store, now, days, stale_after_days, drift_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = report.generated_at.strftime("%Y%m%dT%H%M%SZ")
    paths = {"html": out / f"health-{stamp}.html", "json": out / f"health-{stamp}.json"}
    paths["html"].write_text(render_html(report), encoding="utf-8")
    paths["json"].write_text(json.dumps(summary(report), indent=2, sort_keys=True), encoding="utf-8")
    return paths
