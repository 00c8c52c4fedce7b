"""The health report from a seeded run history in a real SQLite state store.

The history is written through the store's API, then its timestamps are pinned with plain SQL
(the store stamps rows with the wall clock), so every expected figure can be computed by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from d365sync.engine import health
from d365sync.engine.merge import Base
from d365sync.engine.migrations import schema as t
from d365sync.engine.state import BaseRow, Failure, ReviewItem, StateStore

NOW = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore.open(f"sqlite:///{tmp_path / 'state.db'}") as s:
        yield s


def _run(
    store: StateStore,
    run_id: str,
    entity: str,
    hours_ago: float,
    status: str,
    counts: dict[str, int],
    error: str | None = None,
    minutes: float = 5,
) -> None:
    started = NOW - timedelta(hours=hours_ago)
    store.start_run(run_id, entity, started)
    store.finish_run(run_id, entity, status, counts, error=error)
    where = (t.run.c.run_id == run_id) & (t.run.c.entity == entity)
    with store.engine.begin() as conn:
        conn.execute(update(t.run).where(where).values(finished_at=started + timedelta(minutes=minutes)))


def _counts(
    records: int, extracted: int, quarantined: int = 0, failed: int = 0, **more: int
) -> dict[str, int]:
    half = extracted // 2
    out = {"records": records, "extracted_dynamics": half, "extracted_erp": extracted - half}
    return out | {"quarantined": quarantined, "erp_failed": failed, **more}


def _records(store: StateStore, entity: str, lags_minutes: list[int], saved: datetime) -> None:
    rows = [
        BaseRow(
            f"{i:08x}-0000-0000-0000-000000000000",
            f"K{i}",
            Base({"x": i}, erp_modified=saved - timedelta(minutes=m)),
        )
        for i, m in enumerate(lags_minutes)
    ]
    store.save_base(entity, rows, "run-lag")
    seen = saved - timedelta(days=60)  # known long before these changes: lag counts from the change
    with store.engine.begin() as conn:
        where = t.record.c.entity == entity
        conn.execute(update(t.record).where(where).values(updated_at=saved, first_seen_at=seen))


def _seed(store: StateStore) -> None:
    _run(store, "c1", "customers", 50, "success", _counts(100, 200, quarantined=2, dataverse_requests=40))
    _run(
        store,
        "c2",
        "customers",
        26,
        "success",
        _counts(300, 400, failed=2, dataverse_requests=60, conflicts=3),
    )
    _run(
        store,
        "c3",
        "customers",
        2,
        "failed",
        _counts(0, 0),
        error="HTTP 429 Too Many Requests after 5 retries",
    )
    _run(
        store,
        "c4",
        "customers",
        1,
        "success",
        _counts(200, 400, dataverse_requests=50, dataverse_throttles=4),
    )
    _run(store, "old", "customers", 24 * 30, "success", _counts(999, 999))  # outside the window
    _run(store, "o1", "orders", 3, "failed", {}, error="HTTP 429 Too Many Requests after 7 retries")
    _run(store, "o2", "orders", 1, "running", {})  # still running: not counted
    _records(store, "customers", [1, 2, 3, 4, 5, 6, 7, 8, 9, 100], NOW - timedelta(hours=1))
    store.open_reviews("customers", "c1", [ReviewItem(f"K{i}", "phone", "a", "b", "c") for i in range(3)])
    store.open_reviews("orders", "o1", [ReviewItem("O1", "status", "a", "b", "c")])
    r = t.review
    with store.engine.begin() as conn:
        conn.execute(update(r).where(r.c.entity == "customers").values(opened_at=NOW - timedelta(days=10)))
        conn.execute(update(r).where(r.c.entity == "orders").values(opened_at=NOW - timedelta(days=1)))
    store.decide_review(1, "b", by="oscar", now=NOW - timedelta(days=2))
    failures = [
        Failure(f"K{i}", f"HTTP 400 option set value {i} for 'statuscode' is not valid") for i in range(4)
    ]
    store.dead_letter("customers", "load", "c2", failures, now=NOW)
    store.dead_letter("orders", "transform", "o1", [Failure("O9", "missing parent customer C42")], now=NOW)


def test_summary_has_the_expected_figures(store: StateStore, tmp_path: Path) -> None:
    _seed(store)
    paths = health.write_health_report(store, tmp_path / "reports", now=NOW, days=7, stale_after_days=7)
    data = json.loads(paths["json"].read_text())
    c, o = data["entities"]["customers"], data["entities"]["orders"]

    assert (c["runs"], c["successes"], c["success_rate"]) == (4, 3, 0.75)
    assert c["last_success_at"] == (NOW - timedelta(hours=1) + timedelta(minutes=5)).isoformat()
    assert c["last_status"] == "success"
    assert c["records_total"] == 600 and c["records_per_run"] == 150
    assert c["error_rate"] == pytest.approx(4 / 1000)  # (2 quarantined + 2 failed) / 1000 extracted
    assert (c["api_requests"], c["throttles"]) == (150, 4)
    assert (c["lag_p50_s"], c["lag_p95_s"], c["lag_max_s"]) == (300, 6000, 6000)  # 5 min, 100 min
    assert (c["open_reviews"], c["stale_reviews"], c["dead_letters"]) == (2, 2, 4)

    assert (o["runs"], o["successes"], o["success_rate"], o["last_success_at"]) == (1, 0, 0.0, None)
    assert (o["open_reviews"], o["stale_reviews"], o["dead_letters"]) == (1, 0, 1)
    assert o["lag_p50_s"] is None

    top = data["top_failures"]
    assert top[0] == {
        "stage": "load",
        "cause": "HTTP … option set value … for … is not valid",
        "count": 4,
        "entities": ["customers"],
    }
    assert {k: v for k, v in top[1].items() if k != "entities"} == {
        "stage": "run",
        "cause": "HTTP … Too Many Requests after … retries",
        "count": 2,
    }
    assert top[1]["entities"] == ["customers", "orders"]
    assert sorted(s["record_key"] for s in data["stale_reviews"]) == ["K1", "K2"]
    assert all(s["age_days"] == 10 for s in data["stale_reviews"])
    assert data["drift"] is None and data["notes"] == ["no reconcile drift report found"]


def test_open_reviews_over_time(store: StateStore) -> None:
    _seed(store)
    report = health.build_health(store, now=NOW, days=14)
    daily = dict(report.open_reviews_daily["customers"])
    assert daily[NOW - timedelta(days=11)] == 0
    assert daily[NOW - timedelta(days=9)] == 3
    assert daily[NOW - timedelta(days=1)] == 2  # one decided two days ago
    assert dict(report.open_reviews_daily["orders"])[NOW] == 1


def test_html_report_has_charts_and_no_personal_data(store: StateStore, tmp_path: Path) -> None:
    _seed(store)
    store.dead_letter(
        "customers", "load", "c4", [Failure("K9", "duplicate e-mail jane.doe@example.com")], now=NOW
    )
    paths = health.write_health_report(store, tmp_path, now=NOW)
    page = paths["html"].read_text()
    assert page.count("<svg") == 9 and "customers" in page and "Top failure causes" in page
    assert "jane.doe" not in page and "jane.doe" not in paths["json"].read_text()
    assert paths["html"].name == "health-20250315T120000Z.html"


def test_drift_reports_are_read_newest_per_entity(store: StateStore, tmp_path: Path) -> None:
    drift = tmp_path / "reconcile"
    drift.mkdir()
    (drift / "a.json").write_text(json.dumps({"entity": "customers", "counts": {"differ": 1}}))
    newer = drift / "b.json"
    newer.write_text(json.dumps({"entity": "customers", "counts": {"differ": 3, "missing_erp": 1}}))
    os.utime(drift / "a.json", (NOW.timestamp(), NOW.timestamp()))
    os.utime(newer, (NOW.timestamp() + 10, NOW.timestamp() + 10))
    (drift / "junk.json").write_text("{not json")
    data = health.summary(health.build_health(store, now=NOW, drift_dir=drift))
    assert data["drift"] == {"customers": {"file": str(newer), "counts": {"differ": 3, "missing_erp": 1}}}


def test_empty_store_gives_an_empty_report(store: StateStore) -> None:
    report = health.build_health(store, now=NOW)
    assert report.entities == {} and report.top_failures == []
    assert "no data" in health.charts(report)["records"]


def _landed(store: StateStore, run_id: str, key: str, changed: datetime, saved: datetime) -> None:
    """Save one customer in ``run_id`` (through the store) and pin its save time."""
    row = BaseRow(None, key, Base({"k": key}, erp_modified=changed))
    store.save_base("customers", [row], run_id)
    with store.engine.begin() as conn:
        conn.execute(update(t.record).where(t.record.c.erp_key == key).values(updated_at=saved))


def test_lag_never_counts_from_before_the_sync_could_see_the_record(store: StateStore) -> None:
    first, second = NOW - timedelta(hours=2), NOW - timedelta(hours=1)
    years_ago = NOW - timedelta(days=365 * 4)
    # run 1, the initial load: a legacy row whose LAST_UPD is years old lands 3 minutes in
    _run(store, "r1", "customers", 2, "success", {}, minutes=4)
    _landed(store, "r1", "LEGACY", years_ago, first + timedelta(minutes=3))
    lags = health._lags(store, "customers", NOW - timedelta(days=1))
    assert lags == [180.0]  # the run's 3 minutes, not 4 years

    # run 2: a record created 20 minutes after run 1 started waited for run 2: lag from creation;
    # a row that appeared after run 1 with a back-dated LAST_UPD: lag from run 1's start at most;
    # an update of the legacy row 10 minutes before run 2: lag from the update
    _run(store, "r2", "customers", 1, "success", {}, minutes=5)
    _landed(store, "r2", "NEW", first + timedelta(minutes=20), second + timedelta(minutes=2))
    _landed(store, "r2", "BACKDATED", years_ago, second + timedelta(minutes=2))
    _landed(store, "r2", "LEGACY", second - timedelta(minutes=10), second + timedelta(minutes=2))
    lags = sorted(health._lags(store, "customers", NOW - timedelta(days=1)))
    assert lags == [12 * 60.0, (60 - 20 + 2) * 60.0, 62 * 60.0]
    report = health.build_health(store, now=NOW)
    assert report.entities["customers"].lag_max_s == 62 * 60


def test_visibility_floor_is_the_previous_run_or_the_first_sight() -> None:
    starts = [NOW - timedelta(hours=h) for h in (3, 2, 1)]
    assert health.visibility_floor(None, starts) is None
    assert health.visibility_floor(starts[0], starts) == starts[0]  # first run: first sight
    assert health.visibility_floor(starts[2], starts) == starts[1]  # later: the run before
    assert health.visibility_floor(NOW - timedelta(days=9), starts) == NOW - timedelta(days=9)


def test_percentile_is_nearest_rank() -> None:
    assert health.percentile([5, 1, 3], 50) == 3
    assert health.percentile(list(range(1, 101)), 95) == 95
    assert health.percentile([7], 99) == 7


def test_health_module_imports_no_airflow_or_ui() -> None:
    import ast

    source = Path(health.__file__).read_text()
    modules = {n.module or "" for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names
    }
    assert not {
        m for m in modules if m.split(".")[0] == "airflow" or m.startswith(("d365sync.ui", "fastapi"))
    }


# --- chart text (glitches seen in screenshots) --------------------------------------------------


def _texts(svg: str) -> list[tuple[float, float, int, str]]:
    """(x, y, font size, text) of every ``<text>`` of a chart."""
    import xml.etree.ElementTree as ET

    ns = "{http://www.w3.org/2000/svg}"
    root = ET.fromstring(svg)
    return [
        (float(e.get("x", 0)), float(e.get("y", 0)), int(e.get("font-size", 11)), e.text or "")
        for e in root.iter(f"{ns}text")
    ]


def _y_labels(svg: str) -> list[str]:
    return [text for x, _, _, text in _texts(svg) if x == health.Box().left - 4]


SERIES_AT = [NOW - timedelta(hours=2), NOW - timedelta(hours=1), NOW]


def test_legend_never_overlaps_a_long_title() -> None:
    title = "Throttle events (429) per run, every entity, last fourteen days of history"
    names = ["customers", "inventory", "invoices", "orders", "products", "sales_order_lines"]
    svg = health.line_chart(title, {n: [(at, 1.0) for at in SERIES_AT] for n in names})
    texts = _texts(svg)
    (title_y,) = [y for _, y, size, text in texts if size == 13 and text == title]
    legend = [(x, y) for x, y, _, text in texts if text in names]
    assert len(legend) == len(names)
    axis_y = max(y for x, y, _, text in texts if "-" in text and ":" in text)  # the time labels
    assert all(y > axis_y + 8 > title_y for _, y in legend), legend
    width = float(svg.split('width="', 1)[1].split('"', 1)[0])
    assert all(x + 6.5 * len(n) <= width for (x, _), n in zip(legend, names, strict=True))


def test_an_all_zero_series_gets_plain_y_labels() -> None:
    svg = health.line_chart("Throttle events (429) per run", {"customers": [(at, 0.0) for at in SERIES_AT]})
    assert _y_labels(svg) == ["0", "0.5", "1"]
    assert "0.00" not in svg


def test_y_labels_are_round_numbers() -> None:
    svg = health.line_chart("Conflicts per run", {"customers": [(NOW, 3.0), (NOW + timedelta(hours=1), 7.0)]})
    assert _y_labels(svg) == ["0", "5", "10"]
    rate = health.line_chart("Error rate per run", {"orders": [(NOW, 0.3)]}, "%")
    assert _y_labels(rate) == ["0%", "0.25%", "0.5%"]


@pytest.mark.parametrize(
    ("seconds", "labels"),
    [
        (45.0, ["0 s", "25 s", "50 s"]),
        (600.0, ["0 min", "5 min", "10 min"]),
        (3600.0, ["0 h", "0.5 h", "1 h"]),
        (5400.0, ["0 h", "1 h", "2 h"]),
    ],
)
def test_durations_are_shown_in_seconds_minutes_or_hours(seconds: float, labels: list[str]) -> None:
    svg = health.line_chart("Run duration", {"customers": [(NOW, seconds)]}, "duration")
    assert _y_labels(svg) == labels
    assert "ks" not in svg and "k s" not in svg
    bars = health.bar_chart("Sync lag p95", {"customers": seconds}, "duration")
    assert _y_labels(bars) == labels
