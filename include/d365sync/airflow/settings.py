"""Deployment settings of the DAGs, read from ``D365SYNC_*`` environment variables.

Why environment variables and not Airflow Variables: the DAG files read these at parse time
(retries, deadline, staging root), and ``Variable.get`` at parse time is a metadata-DB query per
parse. Every setting has a default that makes the embedded demo work with nothing set.

=====================================  =========================================================
``D365SYNC_DYNAMICS_CONN_ID``          Dataverse connection (``dynamics_default``)
``D365SYNC_ERP_CONN_ID``               ERP ODBC connection (``erp_default``)
``D365SYNC_STATE_CONN_ID``             sync state store connection (``sync_state_default``)
``D365SYNC_PII_CONN_ID``               connection whose password holds the personal-data keys
                                       (``d365sync_pii``; else ``D365SYNC_PII_KEYS``, docs/security.md)
``D365SYNC_STAGING_ROOT``              ``file:///…`` (default ``$AIRFLOW_HOME/d365sync/staging``)
                                       or ``abfs://container@account.dfs.core.windows.net/path``
``D365SYNC_STAGING_CONN_ID``           connection for the staging store (e.g. ``wasb_default``)
``D365SYNC_STAGING_RETENTION_HOURS``   keep a committed run's staging files this long (0)
``D365SYNC_CHUNK_SIZE``                rows per staging file and write batch (5000)
``D365SYNC_RETRIES_PER_RUN``           due dead letters one run retries, replays first (2000)
``D365SYNC_DATA_DOCS_DIR``             GX Data Docs of each validation batch, under
                                       ``<dir>/<entity>/<side>/`` (unset: none are built);
                                       the UI serves them from ``D365SYNC_UI_DATA_DOCS_DIR``
``D365SYNC_TASK_RETRIES``              task retries (3), exponential backoff from
``D365SYNC_RETRY_DELAY_SECONDS``       (30) up to ``D365SYNC_MAX_RETRY_DELAY_SECONDS`` (900)
``D365SYNC_EVENT_DRAIN_SECONDS``       a fast-lane task syncs notifications that arrived while it
                                       ran, in further passes, for up to this long (30; 0: one pass)
``D365SYNC_SCHEDULE_OVERRIDE``         one cron for every entity DAG instead of the entity files'
                                       ``schedule`` (soak tests: ``* * * * *``); unset = per file
``D365SYNC_DEADLINE_MINUTES``          run deadline; default: the schedule's period, 5 to 120 min
``D365SYNC_DEADLINE_ALERTS``           ``false`` drops the DeadlineAlert (the runner does, see there)
``D365SYNC_DYNAMICS_POOL``             pool capping tasks that call Dataverse (``dynamics_api``)
``D365SYNC_DYNAMICS_POOL_SLOTS``       its size when the runner or ``make demo`` creates it (2)
``D365SYNC_ALERT_WEBHOOK_URL``         alerts to a webhook (off when empty)
``D365SYNC_ALERT_WEBHOOK_FORMAT``      ``slack`` | ``teams`` | ``generic`` (default)
``D365SYNC_ALERT_SMTP_CONN_ID``        alerts by e-mail through this smtp connection (off when empty)
``D365SYNC_ALERT_EMAIL_TO``            comma-separated recipients (required with SMTP)
``D365SYNC_ALERT_EMAIL_FROM``          sender (else the connection's ``from_email``)
``D365SYNC_SERVICEBUS_QUEUE``          Azure Service Bus queue(s) Dataverse posts notifications
                                       to, comma-separated; set: the ``d365sync_servicebus_inbox``
                                       DAG exists (docs/events-servicebus.md); unset: it does not
``D365SYNC_SERVICEBUS_CONN_ID``        its connection (``azure_service_bus_default``)
``D365SYNC_SERVICEBUS_POLL_SECONDS``   the trigger's pause after each receive (1); it takes at
                                       most one message per pause
``D365SYNC_SERVICEBUS_WAIT_SECONDS``   how long one receive waits for a message (5)
``D365SYNC_APP_USER_IDS``              the sync's Dataverse application user id(s): notifications
                                       of its writes are stored ``ignored`` (else ``WhoAmI``)
=====================================  =========================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, "").strip() or default


def _number(name: str, default: float) -> float:
    raw = _env(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class Connections:
    dynamics: str
    erp: str
    state: str


@dataclass(frozen=True)
class Staging:
    root: str
    conn_id: str | None
    retention: timedelta


@dataclass(frozen=True)
class Retries:
    retries: int
    delay: timedelta
    max_delay: timedelta


@dataclass(frozen=True)
class ServiceBus:
    """Where Dataverse's Service Bus notifications are read (the provider's queue trigger)."""

    queues: tuple[str, ...]
    conn_id: str
    poll_seconds: float
    wait_seconds: float


@dataclass(frozen=True)
class AlertChannels:
    webhook_url: str | None
    webhook_format: str
    smtp_conn_id: str | None
    email_to: tuple[str, ...]
    email_from: str | None

    @property
    def enabled(self) -> bool:
        return bool(self.webhook_url or (self.smtp_conn_id and self.email_to))


def connections() -> Connections:
    return Connections(
        _env("D365SYNC_DYNAMICS_CONN_ID", "dynamics_default"),
        _env("D365SYNC_ERP_CONN_ID", "erp_default"),
        _env("D365SYNC_STATE_CONN_ID", "sync_state_default"),
    )


def pii_conn_id() -> str:
    """Connection whose password holds the Fernet keys, newest first (``D365SYNC_PII_CONN_ID``)."""
    return _env("D365SYNC_PII_CONN_ID", "d365sync_pii")


def staging() -> Staging:
    home = _env("AIRFLOW_HOME", os.path.expanduser("~/airflow"))
    root = _env("D365SYNC_STAGING_ROOT", f"file://{os.path.abspath(home)}/d365sync/staging")
    hours = _number("D365SYNC_STAGING_RETENTION_HOURS", 0)
    return Staging(root.rstrip("/"), _env("D365SYNC_STAGING_CONN_ID") or None, timedelta(hours=hours))


def retries() -> Retries:
    return Retries(
        int(_number("D365SYNC_TASK_RETRIES", 3)),
        timedelta(seconds=_number("D365SYNC_RETRY_DELAY_SECONDS", 30)),
        timedelta(seconds=_number("D365SYNC_MAX_RETRY_DELAY_SECONDS", 900)),
    )


def schedule_override() -> str | None:
    """``D365SYNC_SCHEDULE_OVERRIDE``: a cron applied to every entity DAG (None: each file's own)."""
    cron = _env("D365SYNC_SCHEDULE_OVERRIDE")
    if not cron:
        return None
    from croniter import croniter

    if not croniter.is_valid(cron):
        raise ValueError(f"D365SYNC_SCHEDULE_OVERRIDE={cron!r} is not a cron expression")
    return cron


def deadline_override() -> timedelta | None:
    minutes = _number("D365SYNC_DEADLINE_MINUTES", 0)
    return timedelta(minutes=minutes) if minutes > 0 else None


def event_drain_seconds() -> float:
    """How long a fast-lane task keeps taking notifications that arrive while it runs (30 s)."""
    return max(0.0, _number("D365SYNC_EVENT_DRAIN_SECONDS", 30))


def chunk_size() -> int:
    """Rows per staging file / write batch (``D365SYNC_CHUNK_SIZE``, default 5000)."""
    return max(1, int(_number("D365SYNC_CHUNK_SIZE", 5000)))


def retries_per_run() -> int:
    """Due dead letters one run retries (``D365SYNC_RETRIES_PER_RUN``, default 2000)."""
    return max(1, int(_number("D365SYNC_RETRIES_PER_RUN", 2000)))


def data_docs_dir() -> str | None:
    """Where the validate task builds GX Data Docs (``D365SYNC_DATA_DOCS_DIR``; unset: nowhere)."""
    return _env("D365SYNC_DATA_DOCS_DIR") or None


def deadline_alerts() -> bool:
    return _env("D365SYNC_DEADLINE_ALERTS", "true").lower() not in ("0", "false", "no", "off")


def dynamics_pool() -> tuple[str, int]:
    return _env("D365SYNC_DYNAMICS_POOL", "dynamics_api"), int(_number("D365SYNC_DYNAMICS_POOL_SLOTS", 2))


def alert_channels() -> AlertChannels:
    recipients = tuple(a.strip() for a in _env("D365SYNC_ALERT_EMAIL_TO").split(",") if a.strip())
    return AlertChannels(
        _env("D365SYNC_ALERT_WEBHOOK_URL") or None,
        _env("D365SYNC_ALERT_WEBHOOK_FORMAT", "generic").lower(),
        _env("D365SYNC_ALERT_SMTP_CONN_ID") or None,
        recipients,
        _env("D365SYNC_ALERT_EMAIL_FROM") or None,
    )


def servicebus() -> ServiceBus | None:
    """The Service Bus source (``D365SYNC_SERVICEBUS_*``), or None when no queue is configured."""
    queues = tuple(
        dict.fromkeys(q.strip() for q in _env("D365SYNC_SERVICEBUS_QUEUE").split(",") if q.strip())
    )
    if not queues:
        return None
    poll = _number("D365SYNC_SERVICEBUS_POLL_SECONDS", 1.0)
    wait = _number("D365SYNC_SERVICEBUS_WAIT_SECONDS", 5.0)
    if poll <= 0 or wait <= 0:  # the provider's trigger reads 0 as "unset" (60 s)
        raise ValueError("D365SYNC_SERVICEBUS_POLL_SECONDS and _WAIT_SECONDS must be above 0")
    conn_id = _env("D365SYNC_SERVICEBUS_CONN_ID", "azure_service_bus_default")
    return ServiceBus(queues, conn_id, poll, wait)
