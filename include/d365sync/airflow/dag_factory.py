"""Build one Airflow DAG per entity file, plus the operations DAGs, from the specs alone.

Parse-time budget: this module and the DAG files import only the Task SDK, the spec models
(pydantic + yaml) and the stdlib. Task bodies import :mod:`d365sync.airflow.tasks` lazily, and
that module imports the engine (pandas, pyarrow, GX, SDK clients) inside its functions.

Per entity DAG ``sync_<entity>``:

* ``CronDataIntervalTimetable(spec.schedule, timezone="UTC")``: real data intervals, which a
  backfill turns into ``modifiedon`` / cursor windows; ``catchup=False``, ``max_active_runs=1``;
  ``D365SYNC_SCHEDULE_OVERRIDE`` (a cron) replaces every entity's schedule (the soak test);
* an entity that looks up another synced entity (orders → customers) also runs when that entity's
  ``commit_state`` emits its :class:`Asset` (``AssetOrTimeSchedule``): parked children are then
  released promptly, and the engine parks rather than fails orders whose customer is missing;
* ``events`` in the entity file add the entity's change signal to that ``AssetOrTimeSchedule``
  (:func:`events_asset`: the Dataverse webhook inbox and/or ERP cursor polling, watched by
  triggers in the triggerer), and a ``route`` branch first: an event-started run with a small
  batch runs every stage in the one task ``sync_events`` (seconds end to end), anything else the
  staged chain below;
* retries with exponential backoff; :class:`SyncRetryPolicy` fails at once on errors a
  retry cannot fix (bad spec, rejected credentials, validation threshold exceeded) — 429s are
  absorbed inside the Dataverse client, so they never burn task retries;
* ``pool="dynamics_api"`` on the tasks that call Dataverse;
* a deadline alert (``DAGRUN_QUEUED_AT`` + the schedule's period, 5 to 120 min) and an
  ``on_failure_callback`` (both off unless a channel is configured); the DAG's own
  ``on_failure_callback`` records the run as ``failed`` in the state store (:mod:`.run_state`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from airflow.sdk import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    AsyncCallback,
    CronDataIntervalTimetable,
    DeadlineAlert,
    DeadlineReference,
    Param,
    task,
)

from d365sync.airflow import alerts, settings
from d365sync.airflow.docs import entity_doc_md
from d365sync.airflow.retry import SyncRetryPolicy
from d365sync.airflow.run_state import record_failed_run
from d365sync.spec import (
    EntitySpec,
    dependencies,
    dependency_order,
    entities_dir,
    load_entities_apart,
)

DAG_PREFIX = "sync_"
TAGS = ("d365sync",)
DYNAMICS_TASKS = frozenset({"extract_dynamics", "transform", "load_dynamics", "sync_events"})
MIN_DEADLINE, MAX_DEADLINE = timedelta(minutes=5), timedelta(minutes=120)
START = datetime(2026, 1, 1, tzinfo=UTC)


def load_specs(directory: str | None = None) -> dict[str, EntitySpec]:
    """Every entity spec that loads (:func:`~d365sync.spec.load_entities_apart`): a file being
    written or broken by an edit stops only its own entity (and those that look it up). Cached per
    process: parse and tasks share it."""
    return _loaded(str(directory or entities_dir()))[0]


def specs_set_aside(directory: str | None = None) -> dict[str, list[str]]:
    """Entity name → the issues that keep its file from loading."""
    return _loaded(str(directory or entities_dir()))[1]


@cache
def _loaded(directory: str) -> tuple[dict[str, EntitySpec], dict[str, list[str]]]:
    return load_entities_apart(directory)


def upstream_of(spec: EntitySpec, specs: Mapping[str, EntitySpec] | None = None) -> list[str]:
    """Entities that must sync first (:func:`d365sync.spec.dependencies`): those looked up through
    their key maps (orders → customers), and those that create the records this one only updates
    in a shared table (products creates the Dynamics products whose quantity inventory sets)."""
    return sorted(dependencies(spec, specs or load_specs()))


def entity_order(specs: Mapping[str, EntitySpec]) -> list[str]:
    """Entity names in dependency order (parents first), alphabetical among equals: the spec
    layer's :func:`d365sync.spec.dependency_order`, the one order every runner uses."""
    return dependency_order(specs)


def dag_id_for(entity: str) -> str:
    return f"{DAG_PREFIX}{entity}"


def entity_asset(entity: str) -> Asset:
    """Emitted by ``commit_state`` of the entity's DAG: its key map and base just moved."""
    return Asset(name=f"d365sync_{entity}", uri=f"d365sync://entities/{entity}", group="d365sync")


def entity_schedule(spec: EntitySpec) -> str:
    """The entity's cron: ``D365SYNC_SCHEDULE_OVERRIDE`` when set (every entity alike), else its file's."""
    return settings.schedule_override() or spec.schedule


def events_asset(spec: EntitySpec) -> Asset | None:
    """The entity's change signal, watched in the triggerer (``events`` in its file), or None.

    :class:`~d365sync.airflow.triggers.InboxTrigger` fires on Dataverse notifications waiting in
    the inbox, :class:`~d365sync.airflow.triggers.ErpChangeTrigger` when the ERP cursor column's
    maximum moves; each firing is an asset event that starts a run of the entity's DAG.
    """
    from airflow.sdk import AssetWatcher

    from d365sync.airflow.triggers import ErpChangeTrigger, InboxTrigger

    events, name = spec.events, spec.name
    watchers = []
    if events.inbox:
        trigger = InboxTrigger(name, poll_seconds=events.inbox_poll_seconds)
        watchers.append(AssetWatcher(name=f"d365sync_{name}_inbox", trigger=trigger))
    if events.erp == "poll":
        trigger = ErpChangeTrigger(name, poll_seconds=events.poll_seconds)  # type: ignore[assignment]
        watchers.append(AssetWatcher(name=f"d365sync_{name}_erp_poll", trigger=trigger))
    if not watchers:
        return None
    return Asset(
        name=f"d365sync_{name}_changes", uri=f"d365sync://events/{name}", group="d365sync", watchers=watchers
    )


def schedule_for(spec: EntitySpec) -> Any:
    """The cron; with upstream entities or ``events``, ``AssetOrTimeSchedule``: the cron or any of
    those assets (an upstream entity's commit, the entity's own change signal)."""
    timetable = CronDataIntervalTimetable(entity_schedule(spec), timezone="UTC")
    assets = [entity_asset(u) for u in upstream_of(spec)]
    if (changes := events_asset(spec)) is not None:
        assets.append(changes)
    if not assets:
        return timetable
    condition = assets[0] if len(assets) == 1 else _any(assets)
    return AssetOrTimeSchedule(timetable=timetable, assets=condition)


def _any(assets: list[Asset]) -> Any:
    from airflow.sdk import AssetAny

    return AssetAny(*assets)


def schedule_period(cron: str) -> timedelta:
    """Time between two consecutive fire times of a cron expression."""
    from croniter import croniter

    it = croniter(cron, START)
    first = it.get_next(datetime)
    return it.get_next(datetime) - first


def deadline_for(spec: EntitySpec, dag_id: str) -> DeadlineAlert:
    interval = settings.deadline_override() or min(
        max(schedule_period(entity_schedule(spec)), MIN_DEADLINE), MAX_DEADLINE
    )
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=interval,
        callback=AsyncCallback(alerts.on_deadline_missed, kwargs={"dag_id": dag_id}),
    )


class EntityDAG(DAG):
    """An entity DAG: a plain :class:`DAG` whose ``test()`` also works with its deadline alert.

    ``DAG.test()`` (``airflow dags test``, :mod:`.runner`) schedules a copy of the DAG made by
    an in-memory serialize/deserialize round trip. Only writing the DAG to the metadata DB
    (``SerializedDagModel.write_dag``) replaces each deadline alert definition by the id of its
    ``deadline_alert`` row, so that copy's ``deadline`` holds encoded alerts (dicts). When the run
    succeeds, ``DagRun.update_state`` passes them to ``DeadlineAlert.get_by_id`` to prune the
    run's deadlines, and the UUID bind fails: ``AttributeError: 'dict' object has no attribute
    'hex'``, exit 1 after every task succeeded (Airflow 3.3.2; apache/airflow#73428, fix proposed
    in #73430). The scheduler reads the DAG from the DB (ids), so it never takes this path.
    While ``test()`` runs, and only then, an encoded alert is read directly, as the upstream fix
    does: the run's deadline is created and pruned as under the scheduler.
    """

    def test(self, *args: Any, **kwargs: Any) -> Any:
        with _encoded_deadline_alerts_readable():
            return super().test(*args, **kwargs)


@contextmanager
def _encoded_deadline_alerts_readable() -> Iterator[None]:
    """Let ``DeadlineAlert.get_by_id`` take an encoded alert (a dict) as well as an id."""
    from unittest import mock

    from airflow.models.deadline_alert import DeadlineAlert as DeadlineAlertModel
    from airflow.serialization.definitions.deadline import DeadlineAlertFields as F
    from airflow.serialization.enums import Encoding

    by_id = DeadlineAlertModel.get_by_id

    def get_by_id(alert: Any, **kwargs: Any) -> DeadlineAlertModel:
        if not isinstance(alert, Mapping):
            return by_id(alert, **kwargs)
        data = alert.get(Encoding.VAR, alert)
        return DeadlineAlertModel(
            name=data.get(F.NAME),
            reference=data[F.REFERENCE],
            interval=data[F.INTERVAL],
            callback_def=data[F.CALLBACK],
        )

    with mock.patch.object(DeadlineAlertModel, "get_by_id", get_by_id):
        yield


def default_args() -> dict[str, Any]:
    r = settings.retries()
    return {
        "owner": "d365sync",
        "retries": r.retries,
        "retry_delay": r.delay,
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": r.max_delay,
        "retry_policy": SyncRetryPolicy(),
        "on_failure_callback": alerts.on_task_failure,
    }


ENTITY_PARAMS = {
    "window_start": Param(
        None, type=["null", "string"], description="Re-sync changes from this ISO time (with window_end)."
    ),
    "window_end": Param(None, type=["null", "string"], description="…up to this ISO time (exclusive)."),
    "dry_run": Param(False, type="boolean", description="Plan only: write nothing anywhere."),
}


# ------------------------------------------------------------------------------ entity DAGs
def build_entity_dag(spec: EntitySpec) -> DAG:
    """``extract_dynamics ∥ extract_erp → validate → transform → resolve → load_erp ∥ load_dynamics
    → commit_state → report``; every body is one call into :mod:`d365sync.airflow.tasks`."""
    entity, dag_id = spec.name, dag_id_for(spec.name)
    pool = settings.dynamics_pool()[0]
    with EntityDAG(
        dag_id=dag_id,
        schedule=schedule_for(spec),
        **_one_run_at_a_time(),
        on_failure_callback=record_failed_run,
        tags=[*TAGS, "entity", entity],
        doc_md=entity_doc_md(spec, upstream_of(spec)),
        description=(spec.description.strip().split(". ")[0])[:200] or None,
        deadline=deadline_for(spec, dag_id) if settings.deadline_alerts() else None,
        params=ENTITY_PARAMS,
        render_template_as_native_obj=False,
    ) as dag:

        def pooled(task_id: str) -> dict[str, Any]:
            return {"task_id": task_id, "pool": pool} if task_id in DYNAMICS_TASKS else {"task_id": task_id}

        @task(**pooled("extract_dynamics"))
        def extract_dynamics() -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.extract(entity, "dynamics")

        @task(**pooled("extract_erp"))
        def extract_erp() -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.extract(entity, "erp")

        @task(**pooled("validate"))
        def validate(dynamics: dict[str, Any], erp: dict[str, Any]) -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.validate(entity, {"dynamics": dynamics, "erp": erp})

        @task(**pooled("transform"))
        def transform(validated: dict[str, Any]) -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.transform(entity, validated)

        @task(**pooled("resolve"))
        def resolve(transformed: dict[str, Any]) -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.resolve(entity, transformed)

        @task(**pooled("load_erp"))
        def load_erp(resolved: dict[str, Any]) -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.load(entity, "erp", resolved)

        @task(**pooled("load_dynamics"))
        def load_dynamics(resolved: dict[str, Any], part: int = 0) -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.load(entity, "dynamics", resolved, part, spec.load_parts)

        @task(**pooled("commit_state"), outlets=[entity_asset(entity)])
        def commit_state(resolved: dict[str, Any], erp: dict[str, Any], dynamics: Any) -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.commit(entity, resolved, {"erp": erp, "dynamics": dynamics})

        @task(**pooled("report"))
        def report(committed: dict[str, Any]) -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.report(entity, committed)

        extracts = (extract_dynamics(), extract_erp())
        resolved = resolve(transform(validate(*extracts)))
        if spec.load_parts > 1:  # one mapped task instance per part; commit joins their manifests
            parts = list(range(spec.load_parts))
            dynamics_loads = load_dynamics.partial(resolved=resolved).expand(part=parts)
        else:
            dynamics_loads = load_dynamics(resolved)
        report(commit_state(resolved, load_erp(resolved), dynamics_loads))
        if spec.events.enabled:
            _event_lanes(entity, pooled, extracts)
    return dag


def _event_lanes(entity: str, pooled: Any, extracts: tuple[Any, ...]) -> None:
    """``route`` ahead of the staged chain: an event-started run with a small batch takes
    ``sync_events`` (every stage in one task) instead, the rest of the DAG being skipped."""

    @task.branch(task_id="route")
    def route() -> str | list[str]:
        from d365sync.airflow import tasks

        return tasks.route(entity)

    @task(**pooled("sync_events"), outlets=[entity_asset(entity)])
    def sync_events() -> dict[str, Any]:
        from d365sync.airflow import tasks

        return tasks.sync_events(entity)

    lanes = route()
    lanes >> sync_events()
    lanes >> list(extracts)


# -------------------------------------------------------------------------- operations DAGs


def who_may_run(scheduled: bool = False, roles: str = "`op` or `admin`") -> str:
    """The ``doc_md`` paragraph of an operations DAG that changes the sync state."""
    first = "Its scheduled runs are Airflow's own; a manual run" if scheduled else "A run"
    return (
        f"\n\n**Who may run it**: an Airflow user whose role is {roles} (the operations UI's roles, "
        f"`D365SYNC_UI_ROLE_MAP` included). {first} checks the user who triggered it (Airflow records the "
        "authenticated caller of its UI or REST API) and, for anyone else, fails at once and changes nothing."
    )


def _one_run_at_a_time() -> dict[str, Any]:
    """What every DAG of the product shares: no catch-up, one active run, the retry policy."""
    return {"start_date": START, "catchup": False, "max_active_runs": 1, "default_args": default_args()}


def _ops_dag(dag_id: str, doc: str, params: dict[str, Param], schedule: Any = None) -> DAG:
    return DAG(
        dag_id=dag_id,
        schedule=schedule,
        **_one_run_at_a_time(),
        tags=[*TAGS, "operations"],
        doc_md=doc,
        params=params,
    )


def build_reconcile_dag(specs: Mapping[str, EntitySpec]) -> DAG:
    """Nightly: full compare per entity by hash, drift report, repairs queued for the next run."""
    doc = (
        "# Reconcile\n\nNightly full comparison of both systems, per entity, by record hash, streamed in "
        "chunks. Writes a drift report (records that differ and why) under the staging root and queues "
        "repairs in the state store; the next entity run applies them. Catches changes that bypassed the "
        "cursors, such as direct SQL updates without `LAST_UPD`.\n\nEntities: "
        + ", ".join(f"`{e}`" for e in entity_order(specs))
        + who_may_run(scheduled=True)
    )
    params = {
        "entities": Param(sorted(specs), type="array", description="Entities to compare."),
        "queue_repairs": Param(True, type="boolean", description="Queue repairs for the next run."),
    }
    cron = CronDataIntervalTimetable("30 2 * * *", timezone="UTC")
    with _ops_dag("reconcile", doc, params, cron) as dag:
        pool = settings.dynamics_pool()[0]
        for entity in entity_order(specs):

            @task(task_id=f"reconcile_{entity}", pool=pool)
            def reconcile_entity(name: str = entity) -> dict[str, Any]:
                from d365sync.airflow import tasks

                return tasks.reconcile(name)

            reconcile_entity()
    return dag


def build_replay_dag(specs: Mapping[str, EntitySpec]) -> DAG:
    doc = (
        "# Replay dead letters\n\nManual run: pick an entity and (optionally) record keys. The selected "
        "dead letters become due at once; the next run of the entity re-injects them. Trigger the entity "
        "DAG afterwards (or wait for its schedule). The dead letters are recorded as replayed by the user "
        "who triggered the run." + who_may_run()
    )
    params = {
        "entity": Param(sorted(specs)[0], type="string", enum=sorted(specs), description="Entity."),
        "keys": Param([], type="array", description="Record keys; empty = every pending dead letter."),
    }
    return _one_task_ops_dag("replay_dead_letters", doc, params)


def build_review_dag(specs: Mapping[str, EntitySpec]) -> DAG:
    doc = (
        "# Apply review decisions\n\nManual run: decide open review items of an entity — keep the Dynamics "
        "value, the ERP value, or the base — by review id. The next entity run writes the decided values. "
        "`decided_by` is the user who triggered the run (a `decided_by` in the conf is ignored)."
        + who_may_run()
    )
    params = {
        "entity": Param(sorted(specs)[0], type="string", enum=sorted(specs), description="Entity."),
        "review_ids": Param([], type="array", description="Review ids to decide."),
        "decision": Param("dynamics", type="string", enum=["dynamics", "erp", "base"], description="Winner."),
    }
    return _one_task_ops_dag("apply_review_decisions", doc, params)


def _one_task_ops_dag(name: str, doc: str, params: dict[str, Param]) -> DAG:
    """A manual operations DAG whose single task (same id) is the ``tasks`` function of that name."""
    with _ops_dag(name, doc, params) as dag:

        @task(task_id=name)
        def operate() -> dict[str, Any]:
            from d365sync.airflow import tasks

            return getattr(tasks, name)()

        operate()
    return dag


def build_health_dag(specs: Mapping[str, EntitySpec]) -> DAG:
    """Daily: the sync health report (HTML with charts + JSON summary), sent when alerts are on."""
    doc = (
        "# Sync health report\n\nDaily. Reads the sync state store's history and reconcile's latest drift "
        "reports, and writes `health-<time>.html` (table and SVG charts) and `health-<time>.json` (the "
        "summary) under `<staging root>/health_report/reports/`. Contents: per-entity success rate, lag "
        "percentiles, volumes, error rate, top failure causes (values blanked), drift from reconcile, open "
        "reviews older than `stale_after_days`. With an alert channel configured (webhook or SMTP) it "
        "sends a summary with the report's address (e-mail: the HTML attached); never record values.\n\n"
        "`purge_expired` applies the retention periods of `privacy.retention` in the entities' "
        "`_defaults.yaml`: old audit rows, closed dead letters, run reports, done or ignored event inbox "
        "rows and staging files.\n\n"
        "Entities: " + ", ".join(f"`{e}`" for e in entity_order(specs))
    )
    params = {
        "days": Param(14, type="integer", minimum=1, description="Window of history, in days."),
        "stale_after_days": Param(7, type="integer", minimum=1, description="Review items older are stale."),
    }
    cron = CronDataIntervalTimetable("0 6 * * *", timezone="UTC")
    with _ops_dag("health_report", doc, params, cron) as dag:

        @task(task_id="health_report")
        def report() -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.health_report()

        @task(task_id="purge_expired")
        def purge() -> dict[str, Any]:
            from d365sync.airflow import tasks

            return tasks.purge_expired()

        report() >> purge()
    return dag


def build_erase_dag(specs: Mapping[str, EntitySpec]) -> DAG:
    doc = (
        "# Erase a data subject\n\nManual run: pick an entity and a record key. Removes or anonymises the "
        "subject in every store the sync owns — merge base (a tombstone keeps the pairing, no values), "
        "dead letters, reviews, parked children, audit values and staging rows — and records an erasure "
        "audit row holding a hash of the key, the actor and the counts. Dynamics and the ERP are not "
        "touched: erase the subject there too. See docs/security.md."
    ) + who_may_run(roles="`admin`")
    params = {
        "entity": Param(sorted(specs)[0], type="string", enum=sorted(specs), description="Entity."),
        "key": Param("", type="string", description="The data subject's record key (required)."),
    }
    return _one_task_ops_dag("privacy_erase", doc, params)


# ----------------------------------------------------------------------- Service Bus intake
SERVICEBUS_DAG = "d365sync_servicebus_inbox"


def servicebus_asset(config: settings.ServiceBus) -> Asset:
    """The asset the provider's ``AzureServiceBusQueueTrigger`` watches: one asset event per message,
    its body in ``extra["payload"]["message"]``. Imported only here (it loads the Azure SDK), so
    parsing costs nothing when no queue is configured."""
    from airflow.providers.microsoft.azure.triggers.message_bus import AzureServiceBusQueueTrigger
    from airflow.sdk import AssetWatcher

    trigger = AzureServiceBusQueueTrigger(
        queues=list(config.queues),
        azure_service_bus_conn_id=config.conn_id,
        poll_interval=config.poll_seconds,
        max_wait_time=config.wait_seconds,
    )
    watcher = AssetWatcher(name="d365sync_servicebus_queue", trigger=trigger)
    return Asset(
        name="d365sync_servicebus", uri="d365sync://events/servicebus", group="d365sync", watchers=[watcher]
    )


def build_servicebus_dag(config: settings.ServiceBus) -> DAG:
    """``servicebus_to_inbox``: the run's Service Bus messages (Dataverse notifications) into the inbox."""
    queues = ", ".join(f"`{q}`" for q in config.queues)
    doc = (
        "# Dataverse notifications from Azure Service Bus\n\nRuns when the queue trigger "
        f"(`AzureServiceBusQueueTrigger`, connection `{config.conn_id}`) receives messages from {queues}. "
        "Each message is a Dataverse `RemoteExecutionContext` (service endpoint message format JSON); the "
        "task parses it as the webhook receiver does and adds one row per syncing entity to the event inbox "
        "(deduplicated by `OperationId`; the sync's own writes are stored `ignored`). The entities' inbox "
        "triggers then start their runs. A message that is not a notification fails the task after the "
        "others are stored, and stays in the run's asset events. See docs/events-servicebus.md."
    )
    with DAG(
        dag_id=SERVICEBUS_DAG,
        schedule=servicebus_asset(config),
        **_one_run_at_a_time(),
        tags=[*TAGS, "events"],
        doc_md=doc,
        description="Dataverse notifications from Azure Service Bus into the sync's event inbox",
    ) as dag:

        @task(task_id="servicebus_to_inbox")
        def servicebus_to_inbox() -> dict[str, Any]:
            from d365sync.airflow import servicebus

            return servicebus.servicebus_to_inbox()

        servicebus_to_inbox()
    return dag


def servicebus_dags() -> dict[str, DAG]:
    """``{"d365sync_servicebus_inbox": DAG}`` when ``D365SYNC_SERVICEBUS_QUEUE`` is set, else ``{}``."""
    config = settings.servicebus()
    return {} if config is None else {SERVICEBUS_DAG: build_servicebus_dag(config)}


def entity_dags() -> dict[str, DAG]:
    """``{dag_id: DAG}`` for every entity file, in dependency order; a file that does not load gets
    :func:`build_set_aside_dag` in place of its entity's DAG, and the others run on."""
    specs, apart = load_specs(), specs_set_aside()
    dags = {dag_id_for(name): build_entity_dag(specs[name]) for name in entity_order(specs)}
    return dags | {
        dag_id_for(name): build_set_aside_dag(name, issues) for name, issues in sorted(apart.items())
    }


def build_set_aside_dag(entity: str, issues: list[str]) -> DAG:
    """``sync_<entity>`` for an entity file that does not load: no schedule, paused, its issues in
    the DAG docs, and one task that fails with them if someone runs it anyway. It stands in the DAG
    list where the entity's DAG would be, so the problem is seen, not missed in a log."""
    text = "\n".join(f"- {issue}" for issue in issues)
    with DAG(
        dag_id=dag_id_for(entity),
        schedule=None,
        start_date=START,
        catchup=False,
        is_paused_upon_creation=True,
        tags=[*TAGS, "spec-error"],
        doc_md=f"**{entity}: the entity file does not load**, so this entity does not sync "
        f"(the other entities do). Fix the file; `d365sync spec check --live {entity}` shows each "
        f"problem with its fix.\n\n{text}",
    ) as dag:

        @task(task_id="spec_error")
        def spec_error() -> None:
            raise ValueError(f"entity {entity}: the entity file does not load:\n" + text)

        spec_error()
    return dag


def operations_dags() -> dict[str, DAG]:
    """``reconcile`` (nightly), ``health_report`` (daily), ``replay_dead_letters``,
    ``apply_review_decisions`` and ``privacy_erase`` (manual). All but ``health_report`` change the
    sync state and act only for a triggering user with the role they need
    (:func:`d365sync.airflow.tasks.acting_user`); reconcile's scheduled runs act as Airflow itself."""
    specs = load_specs()
    builders = (build_reconcile_dag, build_health_dag, build_replay_dag, build_review_dag, build_erase_dag)
    dags = [build(specs) for build in builders]
    return {dag.dag_id: dag for dag in dags}
