"""Run metrics: names, and a real trip through Airflow's StatsD backend to a UDP receiver."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from d365sync.airflow.metrics import emit_run_metrics, metric_name, run_metrics
from d365sync.engine.state import RunReport

STARTED = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
REPORT = RunReport(
    run_id="scheduled__2025-03-15",
    entity="customers",
    status="success",
    started_at=STARTED,
    finished_at=STARTED + timedelta(seconds=42.5),
    counts={"extracted_dynamics": 120, "erp_update": 7, "conflicts": 2, "dataverse_requests": 31},
    timings={"extract": 3.25, "load": 10.0},
)


def test_metric_names_are_documented_and_safe() -> None:
    assert metric_name("customers", "runs.success") == "d365sync.customers.runs.success"
    assert metric_name("sales orders", "erp/failed") == "d365sync.sales_orders.erp_failed"


def test_run_metrics_of_a_report() -> None:
    assert run_metrics(REPORT) == [
        ("incr", "d365sync.customers.runs.success", 1),
        ("incr", "d365sync.customers.conflicts", 2),
        ("incr", "d365sync.customers.dataverse_requests", 31),
        ("incr", "d365sync.customers.erp_update", 7),
        ("incr", "d365sync.customers.extracted_dynamics", 120),
        ("timing", "d365sync.customers.duration", timedelta(seconds=42.5)),
        ("timing", "d365sync.customers.extract", timedelta(seconds=3.25)),
        ("timing", "d365sync.customers.load", timedelta(seconds=10)),
    ]


def test_run_metrics_of_a_task_summary_mapping() -> None:
    summary = {"entity": "orders", "counts": {"records": 5, "flag": True}, "duration_s": 2}
    assert run_metrics(summary) == [
        ("incr", "d365sync.orders.runs.success", 1),
        ("incr", "d365sync.orders.records", 5),
        ("timing", "d365sync.orders.duration", timedelta(seconds=2)),
    ]


@pytest.fixture
def statsd_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A UDP socket on loopback, and Airflow's stats module pointed at it through ``[metrics]``."""
    from airflow.sdk._shared.observability.metrics import stats as shared
    from airflow.sdk.observability.metrics import stats_utils

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    for name, value in {
        "STATSD_ON": "True",
        "STATSD_HOST": "127.0.0.1",
        "STATSD_PORT": str(sock.getsockname()[1]),
        "STATSD_PREFIX": "airflow",
    }.items():
        monkeypatch.setenv(f"AIRFLOW__METRICS__{name}", value)
    for attr in ("_factory", "_backend", "_export_legacy_names"):
        monkeypatch.setattr(shared, attr, getattr(shared, attr))
    shared.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)
    yield sock
    backend = shared._backend
    if backend is not None and hasattr(backend, "statsd"):
        backend.statsd.close()  # the StatsClient's own UDP socket
    sock.close()


def test_emit_run_metrics_reaches_a_statsd_receiver(statsd_receiver: socket.socket) -> None:
    sent = emit_run_metrics(REPORT)
    packets = sorted(statsd_receiver.recv(4096).decode() for _ in range(sent))
    assert packets == [
        "airflow.d365sync.customers.conflicts:2|c",
        "airflow.d365sync.customers.dataverse_requests:31|c",
        "airflow.d365sync.customers.duration:42500.000000|ms",
        "airflow.d365sync.customers.erp_update:7|c",
        "airflow.d365sync.customers.extract:3250.000000|ms",
        "airflow.d365sync.customers.extracted_dynamics:120|c",
        "airflow.d365sync.customers.load:10000.000000|ms",
        "airflow.d365sync.customers.runs.success:1|c",
    ]
