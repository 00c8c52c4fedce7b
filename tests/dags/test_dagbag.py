"""The DAG files: they import cleanly and cheaply, and every DAG is what an operator expects."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.dags.conftest import DAGS_FOLDER, ENTITY_TASKS, EVENT_TASKS

HEAVY = (
    "pandas",
    "pyarrow",
    "great_expectations",
    "msal",
    "azure.identity",
    "azure.storage",
    "pyodbc.drivers",
)


@pytest.fixture(scope="module")
def dagbag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))


def test_no_import_errors_and_all_dags_present(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    entities = sorted(p.stem for p in (DAGS_FOLDER.parent / "include" / "entities").glob("[!_]*.yaml"))
    expected = {f"sync_{e}" for e in entities} | {
        "reconcile",
        "health_report",
        "replay_dead_letters",
        "apply_review_decisions",
        "privacy_erase",
    }
    assert set(dagbag.dags) == expected


def test_every_dag_has_tags_retries_one_active_run_and_docs(dagbag: Any) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags and "d365sync" in dag.tags, dag_id
        assert dag.max_active_runs == 1, dag_id
        assert dag.catchup is False, dag_id
        assert dag.doc_md and len(dag.doc_md) > 100, dag_id
        for t in dag.tasks:
            assert t.retries >= 1, (dag_id, t.task_id)
            assert t.retry_exponential_backoff == 2.0, (dag_id, t.task_id)
            assert t.retry_policy is not None and t.on_failure_callback, (dag_id, t.task_id)


def test_entity_dag_shape(dagbag: Any) -> None:
    """The shipped customers DAG: events on in its file (``dynamics: webhook, erp: poll``), so the
    cron or its change signal starts it, and ``route`` picks the fast lane or the staged chain."""
    from airflow.sdk import AssetOrTimeSchedule, CronDataIntervalTimetable

    dag = dagbag.dags["sync_customers"]
    assert sorted(t.task_id for t in dag.tasks) == sorted(ENTITY_TASKS + EVENT_TASKS)
    up = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
    assert up["route"] == []
    assert up["extract_dynamics"] == up["extract_erp"] == up["sync_events"] == ["route"]
    assert up["validate"] == ["extract_dynamics", "extract_erp"]
    assert up["load_erp"] == up["load_dynamics"] == ["resolve"]
    assert up["commit_state"] == ["load_dynamics", "load_erp", "resolve"]
    assert up["report"] == ["commit_state"]
    pools = {t.task_id: t.pool for t in dag.tasks}
    assert {k for k, v in pools.items() if v == "dynamics_api"} == {
        "extract_dynamics",
        "transform",
        "load_dynamics",
        "sync_events",
    }
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert isinstance(dag.timetable.timetable, CronDataIntervalTimetable)
    assert dag.timetable.timetable.expression == "*/10 * * * *"  # the safety net
    changes = dag.timetable.asset_condition
    assert changes.uri == "d365sync://events/customers"
    triggers = {type(w.trigger).__name__: w.trigger.serialize()[1] for w in changes.watchers}
    assert triggers == {
        "InboxTrigger": {"entity": "customers", "poll_seconds": 1.0},
        "ErpChangeTrigger": {"entity": "customers", "poll_seconds": 5.0},
    }
    for lane in ("commit_state", "sync_events"):
        assert [a.uri for a in dag.get_task(lane).outlets] == ["d365sync://entities/customers"]
    orders = dagbag.dags["sync_orders"]
    assert sorted(t.task_id for t in orders.tasks) == sorted(ENTITY_TASKS + EVENT_TASKS)
    assert isinstance(orders.timetable, AssetOrTimeSchedule)
    assert orders.timetable.timetable.expression == "*/5 * * * *"
    condition = repr(orders.timetable.asset_condition)  # the customers commit, or its own change signal
    assert "d365sync://entities/customers" in condition and "d365sync://events/orders" in condition
    for dag_id in ("sync_invoices", "sync_products", "sync_inventory"):  # no events in their files
        assert sorted(t.task_id for t in dagbag.dags[dag_id].tasks) == sorted(ENTITY_TASKS), dag_id


def test_entity_dag_shape_without_events() -> None:
    """No ``events`` in an entity file: the staged chain alone, on the cron alone; with ERP
    polling only, one watcher."""
    from airflow.sdk import CronDataIntervalTimetable

    from d365sync.airflow.dag_factory import build_entity_dag, load_specs
    from d365sync.spec import Events

    spec = load_specs()["customers"]
    dag = build_entity_dag(spec.model_copy(update={"events": Events()}))

    assert sorted(t.task_id for t in dag.tasks) == sorted(ENTITY_TASKS)
    up = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
    assert up["extract_dynamics"] == up["extract_erp"] == []
    assert up["validate"] == ["extract_dynamics", "extract_erp"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable.expression == "*/10 * * * *"
    assert [a.uri for a in dag.get_task("commit_state").outlets] == ["d365sync://entities/customers"]
    erp_only = build_entity_dag(spec.model_copy(update={"events": Events(erp="poll", poll_seconds=3)}))
    (watcher,) = erp_only.timetable.asset_condition.watchers
    assert watcher.name == "d365sync_customers_erp_poll"
    assert watcher.trigger.serialize()[1] == {"entity": "customers", "poll_seconds": 3.0}
    # notifications through Service Bus land in the same inbox: the same trigger and lanes
    servicebus = build_entity_dag(spec.model_copy(update={"events": Events(dynamics="servicebus")}))
    (watcher,) = servicebus.timetable.asset_condition.watchers
    inbox = {"entity": "customers", "poll_seconds": 1.0}
    assert watcher.trigger.serialize() == ("d365sync.airflow.triggers.InboxTrigger", inbox)
    assert {"route", "sync_events"} <= {t.task_id for t in servicebus.tasks}


def test_doc_md_shows_ownership_mapping_and_policies(dagbag: Any) -> None:
    doc = dagbag.dags["sync_customers"].doc_md
    assert "## Ownership and conflict policies" in doc and "## Mapping" in doc
    assert "| `credit_limit` | erp | creditlimit | CREDIT_LIMIT | owner_wins" in doc
    assert "last_write_wins (skew 120s, winner dynamics)" in doc
    assert "email(max_length=80)" in doc
    assert "Depends on" in dagbag.dags["sync_orders"].doc_md
    assert "* **Events**: Dataverse webhook notifications (inbox checked every 1s) and ERP `LAST_UPD` " in doc
    assert "`route` runs first" in doc and "`sync_events`" in doc
    invoices = dagbag.dags["sync_invoices"].doc_md  # no events in its file
    assert "**Events**" not in invoices and "`route`" not in invoices


def test_operations_dags_take_params(dagbag: Any) -> None:
    replay = dagbag.dags["replay_dead_letters"]
    assert type(replay.timetable).__name__ == "NullTimetable"
    assert set(replay.params) == {"entity", "keys"}
    review = dagbag.dags["apply_review_decisions"]
    assert set(review.params) == {"entity", "review_ids", "decision"}  # decided_by: the triggering user
    for dag_id in ("replay_dead_letters", "apply_review_decisions", "reconcile"):
        assert (
            "**Who may run it**: an Airflow user whose role is `op` or `admin`" in dagbag.dags[dag_id].doc_md
        )
    assert "Who may run it" not in dagbag.dags["health_report"].doc_md
    erase = dagbag.dags["privacy_erase"]
    assert type(erase.timetable).__name__ == "NullTimetable"
    assert set(erase.params) == {"entity", "key"} and [t.task_id for t in erase.tasks] == ["privacy_erase"]
    assert "**Who may run it**: an Airflow user whose role is `admin`" in erase.doc_md
    reconcile = dagbag.dags["reconcile"]
    assert {t.task_id for t in reconcile.tasks} >= {"reconcile_customers", "reconcile_orders"}


def test_health_report_runs_daily(dagbag: Any) -> None:
    from airflow.sdk import CronDataIntervalTimetable

    dag = dagbag.dags["health_report"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable.expression == "0 6 * * *"
    assert [t.task_id for t in dag.tasks] == ["health_report", "purge_expired"]
    assert dag.get_task("purge_expired").upstream_task_ids == {"health_report"}
    assert set(dag.params) == {"days", "stale_after_days"}


def test_parsing_imports_nothing_heavy() -> None:
    code = (
        "import json, sys, time\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "t = time.perf_counter()\n"
        f"bag = DagBag(dag_folder={str(DAGS_FOLDER)!r})\n"
        "elapsed = time.perf_counter() - t\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'seconds': elapsed, 'heavy': heavy, 'dags': len(bag.dags),\n"
        "                  'errors': len(bag.import_errors)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"parse time of every DAG file: {result['seconds']:.3f}s")
    assert result["errors"] == 0 and result["dags"] >= 8
    assert result["heavy"] == []  # the parse time itself is a benchmark figure (BENCHMARKS.md), not a test


def test_entity_order_puts_parents_first() -> None:
    from d365sync.airflow.dag_factory import entity_order, load_specs

    order = entity_order(load_specs())
    assert order.index("customers") < order.index("orders")


def test_deadline_follows_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    from d365sync.airflow.dag_factory import deadline_for, load_specs, schedule_period

    assert schedule_period("*/10 * * * *") == timedelta(minutes=10)
    assert schedule_period("0 * * * *") == timedelta(hours=1)
    monkeypatch.delenv("D365SYNC_DEADLINE_MINUTES", raising=False)
    alert = deadline_for(load_specs()["customers"], "sync_customers")
    assert alert.interval == timedelta(minutes=10)
    assert alert.callback.path == "d365sync.airflow.alerts.on_deadline_missed"
    assert type(alert.reference).__name__ == "DagRunQueuedAtDeadline"
    monkeypatch.setenv("D365SYNC_DEADLINE_MINUTES", "45")
    assert deadline_for(load_specs()["customers"], "sync_customers").interval == timedelta(minutes=45)


def test_schedule_override_applies_to_every_entity_dag(monkeypatch: pytest.MonkeyPatch) -> None:
    from d365sync.airflow.dag_factory import build_entity_dag, deadline_for, load_specs

    specs = load_specs()
    monkeypatch.delenv("D365SYNC_DEADLINE_MINUTES", raising=False)
    monkeypatch.setenv("D365SYNC_SCHEDULE_OVERRIDE", "* * * * *")
    for spec in specs.values():
        dag = build_entity_dag(spec)
        timetable = getattr(dag.timetable, "timetable", dag.timetable)  # AssetOrTimeSchedule wraps it
        assert timetable.expression == "* * * * *", spec.name
    assert deadline_for(specs["customers"], "sync_customers").interval == timedelta(minutes=5)  # the minimum
    monkeypatch.setenv("D365SYNC_SCHEDULE_OVERRIDE", "every minute")
    with pytest.raises(ValueError, match="D365SYNC_SCHEDULE_OVERRIDE"):
        build_entity_dag(specs["customers"])
    monkeypatch.delenv("D365SYNC_SCHEDULE_OVERRIDE")
    assert build_entity_dag(specs["customers"]).timetable.timetable.expression == "*/10 * * * *"


def test_retry_policy_fails_fast_waits_out_throttling_and_backs_off_otherwise() -> None:
    from airflow.sdk import RetryAction

    from d365sync.airflow.retry import THROTTLED_DELAY, SyncRetryPolicy
    from d365sync.dynamics.errors import DynamicsApiError, DynamicsAuthError
    from d365sync.spec import SpecError

    policy = SyncRetryPolicy()
    assert policy.evaluate(SpecError(["bad"]), 1, 4).action is RetryAction.FAIL
    assert policy.evaluate(DynamicsAuthError("no"), 1, 4).action is RetryAction.FAIL
    throttled = policy.evaluate(DynamicsApiError(429, "", "slow down", "GET", "http://x"), 1, 4)
    assert throttled.action is RetryAction.RETRY and throttled.retry_delay == THROTTLED_DELAY
    assert policy.evaluate(ConnectionError("reset"), 1, 4).action is RetryAction.DEFAULT


def test_staging_cleanup_respects_retention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from d365sync.airflow import staging

    monkeypatch.setenv("D365SYNC_STAGING_ROOT", f"file://{tmp_path}")
    for run in ("run_a", "run_b"):
        (tmp_path / "sync_x" / run / "customers").mkdir(parents=True)
        (tmp_path / "sync_x" / run / "customers" / "0.parquet").write_bytes(b"x")
    monkeypatch.setenv("D365SYNC_STAGING_RETENTION_HOURS", "24")
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    assert staging.finish_run("sync_x", "run_a", now=t0)["removed"] is False
    assert (tmp_path / "sync_x" / "run_a" / "_committed").exists()
    later = staging.finish_run("sync_x", "run_b", now=t0 + timedelta(hours=25))
    assert later["swept"] == 1 and not (tmp_path / "sync_x" / "run_a").exists()
    assert (tmp_path / "sync_x" / "run_b").exists()
    monkeypatch.setenv("D365SYNC_STAGING_RETENTION_HOURS", "0")
    assert staging.finish_run("sync_x", "run_b")["removed"] is True
    assert not (tmp_path / "sync_x" / "run_b").exists()


def test_servicebus_dag_exists_only_when_a_queue_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dags/d365sync_servicebus.py``: no queue, no DAG (and no Azure SDK import); a queue: the
    ``d365sync_servicebus_inbox`` DAG on an asset watched by the provider's Service Bus queue trigger."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import AssetWatcher
    from airflow.serialization.serialized_objects import DagSerialization

    path = str(DAGS_FOLDER / "d365sync_servicebus.py")
    monkeypatch.delenv("D365SYNC_SERVICEBUS_QUEUE", raising=False)
    unset = DagBag(dag_folder=path)
    assert (unset.import_errors, unset.dags) == ({}, {})

    monkeypatch.setenv("D365SYNC_SERVICEBUS_QUEUE", "d365sync, d365sync-orders,d365sync")
    monkeypatch.setenv("D365SYNC_SERVICEBUS_CONN_ID", "asb_dataverse")
    monkeypatch.setenv("D365SYNC_SERVICEBUS_POLL_SECONDS", "2")
    bag = DagBag(dag_folder=path)
    assert bag.import_errors == {} and set(bag.dags) == {"d365sync_servicebus_inbox"}
    dag = bag.dags["d365sync_servicebus_inbox"]
    assert [t.task_id for t in dag.tasks] == ["servicebus_to_inbox"]
    assert "d365sync" in dag.tags and dag.max_active_runs == 1 and dag.catchup is False
    assert dag.doc_md and "docs/events-servicebus.md" in dag.doc_md
    task = dag.get_task("servicebus_to_inbox")
    assert task.retries >= 1 and task.retry_policy is not None and task.on_failure_callback

    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"
    asset = dag.timetable.asset_condition
    assert (asset.name, asset.uri) == ("d365sync_servicebus", "d365sync://events/servicebus")
    (watcher,) = asset.watchers
    assert isinstance(watcher, AssetWatcher) and watcher.name == "d365sync_servicebus_queue"
    trigger_class = "airflow.providers.microsoft.azure.triggers.message_bus.AzureServiceBusQueueTrigger"
    kwargs = {
        "azure_service_bus_conn_id": "asb_dataverse",
        "queues": ["d365sync", "d365sync-orders"],
        "poll_interval": 2.0,
        "max_wait_time": 5.0,
    }
    assert watcher.trigger.serialize() == (trigger_class, kwargs)
    # what the DAG processor stores, and the triggerer starts the trigger from
    encoded = DagSerialization.to_dict(dag)["dag"]["timetable"]["__var"]["asset_condition"]
    assert encoded["watchers"] == [
        {"name": "d365sync_servicebus_queue", "trigger": {"classpath": trigger_class, "kwargs": kwargs}}
    ]

    monkeypatch.setenv("D365SYNC_SERVICEBUS_WAIT_SECONDS", "0")  # the provider would read 0 as 60 s
    refused = DagBag(dag_folder=path)
    assert "WAIT_SECONDS must be above 0" in str(refused.import_errors)


def test_an_entity_file_that_does_not_load_stops_only_its_own_dag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scaffold written into the entity directory with ``owner: TODO`` still in it: no import error
    that would take every entity DAG down, the other DAGs as before, and in its place a paused DAG
    without a schedule whose docs list the problems."""
    import shutil

    from airflow.dag_processing.dagbag import DagBag

    entities = tmp_path / "entities"
    shutil.copytree(DAGS_FOLDER.parent / "include" / "entities", entities)
    draft = (entities / "customers.yaml").read_text().replace("owner: dynamics", "owner: TODO", 1)
    (entities / "contacts.yaml").write_text(draft.replace("table: account", "table: contact", 1))
    monkeypatch.setenv("D365SYNC_ENTITIES_DIR", str(entities))

    bag = DagBag(dag_folder=str(DAGS_FOLDER / "d365sync_entities.py"))

    assert bag.import_errors == {}
    assert {"sync_customers", "sync_orders", "sync_contacts"} <= set(bag.dags)
    from airflow.sdk import AssetOrTimeSchedule
    from airflow.sdk.definitions.timetables.simple import NullTimetable

    assert isinstance(bag.dags["sync_customers"].timetable, AssetOrTimeSchedule)  # scheduled as before
    aside = bag.dags["sync_contacts"]
    assert isinstance(aside.timetable, NullTimetable) and aside.is_paused_upon_creation is True
    assert "spec-error" in aside.tags and [t.task_id for t in aside.tasks] == ["spec_error"]
    assert "the entity file does not load" in aside.doc_md and "field 'name': owner" in aside.doc_md
