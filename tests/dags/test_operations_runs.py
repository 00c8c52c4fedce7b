"""The daily ``health_report`` DAG and the entity runs' metrics, through ``dag.test()``.

A small sync environment (Dataverse sandbox, SQLite ERP and state store): one entity run with a
forced 429 burst fills the run report with stage timings and the Dataverse throttle/retry counts,
and sends its metrics to a StatsD receiver on loopback UDP; then the health report DAG writes its
HTML + JSON under the staging root, reads reconcile's drift reports, and posts its summary to a
webhook receiver on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dags.conftest import DAG_TEST_USER, AirflowEnv, assert_success, triggered_as
from tests.dags.sync_env import SyncEnv, connections_env, init_erp, sqlite_backend, tidy_erp
from tests.dags.test_alerts import webhook  # noqa: F401  (the loopback webhook receiver fixture)

ERP_ROWS = 120
STAGE_TIMINGS = {
    "extract_dynamics",
    "extract_erp",
    "validate",
    "transform",
    "resolve",
    "load_erp",
    "load_dynamics",
    "commit",
}
SUMMARY_KEYS = {
    "generated_at",
    "window_days",
    "stale_after_days",
    "entities",
    "top_failures",
    "stale_reviews",
    "drift",
    "notes",
}


@pytest.fixture(scope="module")
def env(
    airflow_env: AirflowEnv, dataverse_sandbox_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SyncEnv]:
    backend = sqlite_backend(tmp_path_factory.mktemp("ops-sqlite"))
    init_erp(backend, ERP_ROWS)
    tidy_erp(backend)
    sandbox = dataverse_sandbox_factory(seed=20)
    staging = tmp_path_factory.mktemp("ops-staging")
    airflow = airflow_env.with_env(
        **connections_env(sandbox, backend), D365SYNC_STAGING_ROOT=f"file://{staging}"
    )
    yield SyncEnv(airflow, sandbox, backend)
    sandbox.stop()
    shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture
def statsd() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(1)
    yield sock
    sock.close()


def _packets(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536).decode())
        except TimeoutError:
            return out


def _staging(env: SyncEnv) -> Path:
    return Path(env.airflow.env["D365SYNC_STAGING_ROOT"].removeprefix("file://"))


def test_entity_run_stores_timings_and_throttles_and_emits_metrics(
    env: SyncEnv, statsd: socket.socket
) -> None:
    env.sandbox.set_knobs(throttle_next=2, throttle_retry_after=1)
    metrics_env = {
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd.getsockname()[1]),
        "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
    }
    (run,) = env.run("sync_customers", env=metrics_env)
    assert_success([run])
    counts = run.report["counts"]
    assert counts["dataverse_throttles"] >= 1 and counts["dataverse_retries"] >= 1, counts
    assert counts["dataverse_requests"] > counts["dataverse_throttles"]

    with env.store() as store:
        report = store.run_report(run.run_id, "customers")
    assert report is not None and report.status == "success"
    assert set(report.timings) == STAGE_TIMINGS, report.timings
    assert all(isinstance(s, float) and s >= 0 for s in report.timings.values())
    assert report.counts["dataverse_throttles"] == counts["dataverse_throttles"]
    assert report.counts["dataverse_retries"] == counts["dataverse_retries"]
    assert run.report["metrics"] > len(STAGE_TIMINGS)

    ours = {p.split(":", 1)[0]: p for p in _packets(statsd) if p.startswith("airflow.d365sync.customers.")}
    prefix = "airflow.d365sync.customers."
    assert ours[prefix + "runs.success"] == prefix + "runs.success:1|c"
    assert (
        ours[prefix + "dataverse_throttles"]
        == f"{prefix}dataverse_throttles:{counts['dataverse_throttles']}|c"
    )
    assert ours[prefix + "dataverse_retries"].endswith("|c")
    assert ours[prefix + "duration"].endswith("|ms")
    assert all(ours[prefix + t].endswith("|ms") for t in STAGE_TIMINGS), sorted(ours)


def test_health_report_dag_writes_html_and_json_and_posts_a_summary(
    env: SyncEnv,
    webhook: tuple[str, list[dict[str, Any]]],  # noqa: F811
) -> None:
    url, bodies = webhook
    drift_dir = _staging(env) / "reconcile" / "reports"  # where the reconcile DAG writes its reports
    drift_dir.mkdir(parents=True, exist_ok=True)
    (drift_dir / "customers-test.json").write_text(
        json.dumps({"entity": "customers", "counts": {"differ": 2, "missing_erp": 1}, "drift": []})
    )
    expired = _staging(env) / "sync_customers" / "failed_run" / "customers" / "plan" / "b00000.parquet"
    expired.parent.mkdir(parents=True)
    expired.write_bytes(b"rows of a failed run, a month old")
    month_ago = time.time() - 30 * 86400
    os.utime(expired, (month_ago, month_ago))
    (run,) = env.run("health_report", env={"D365SYNC_ALERT_WEBHOOK_URL": url})
    assert_success([run])
    assert run.tasks["purge_expired"] == "success"
    assert not (_staging(env) / "sync_customers" / "failed_run").exists()  # staging_days: 14

    reports = _staging(env) / "health_report" / "reports"
    (html,) = sorted(reports.glob("health-*.html"))
    (summary_file,) = sorted(reports.glob("health-*.json"))
    summary = json.loads(summary_file.read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["window_days"] == 14 and summary["stale_after_days"] == 7
    customers = summary["entities"]["customers"]
    assert customers["runs"] >= 1 and customers["success_rate"] == 1.0
    assert customers["throttles"] >= 1 and customers["last_success_at"]
    assert summary["drift"]["customers"]["counts"] == {"differ": 2, "missing_erp": 1}
    page = html.read_text()
    assert page.count("<svg") >= 8 and "Sync health" in page

    (body,) = bodies
    text = body["text"]
    assert "health_report: daily sync health report" in text
    assert "customers: " in text and "Drift customers: differ 2, missing_erp 1" in text
    assert f"Report: file://{html}" in text
    assert "attachment" not in body["alert"]
    assert "@" not in json.dumps(body), "no e-mail address (or any record value) in the alert"


def test_privacy_erase_dag_erases_one_subject_and_the_next_run_succeeds(env: SyncEnv) -> None:
    from sqlalchemy import select

    from d365sync.engine.migrations import schema as t

    with env.store() as store:
        key = next(r.erp_key for chunk in store.iter_base("customers") for r in chunk if r.status == "synced")
    conf = {"entity": "customers", "key": key}
    (refused,) = env.run("privacy_erase", conf=conf, env=triggered_as("op"))  # irreversible: admins only
    assert refused.state == "failed"
    with env.store() as store:
        assert store.load_base("customers", "erp", [key])[key].status == "synced"  # type: ignore[union-attr]
    (run,) = env.run("privacy_erase", conf=conf, env=triggered_as("admin"))
    assert_success([run])
    with env.store() as store:
        assert store.load_base("customers", "erp", [key])[key].status == "erased"  # type: ignore[union-attr]
        with store.engine.connect() as conn:
            assert key not in {k for (k,) in conn.execute(select(t.record.c.erp_key))}
            assert key not in {k for (k,) in conn.execute(select(t.audit.c.record_key))}
        erasure = store.audit_log("customers", limit=1)[0]
        assert erasure["operation"] == "erase" and erasure["actor"].startswith(f"airflow:{DAG_TEST_USER}:")
        assert key not in json.dumps(erasure, default=str)
    assert_success(env.run("sync_customers"))
