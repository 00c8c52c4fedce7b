"""Alerts: a task-failure callback and a deadline-miss callback, sent to a webhook and/or SMTP.

Both are off unless configured (see :mod:`d365sync.airflow.settings`): ``D365SYNC_ALERT_WEBHOOK_URL``
(Slack, Teams or generic JSON) and ``D365SYNC_ALERT_SMTP_CONN_ID`` + ``D365SYNC_ALERT_EMAIL_TO``
(the smtp provider's :class:`SmtpHook`). Alert text carries identifiers only (DAG, run, task, try,
exception type) plus an error message with e-mail addresses, URLs, credentials and long digit
runs redacted, so an alert never leaks a secret or a customer's personal data.

The deadline callback runs in the triggerer, so it is a coroutine (``AsyncCallback``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from d365sync.airflow import settings
from d365sync.engine import pii

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 300
TIMEOUT_SECONDS = 10
# On top of :mod:`d365sync.engine.pii`'s credentials, e-mails and phones, an alert leaves the
# project: it also drops every URL and every long digit run (account, card, order numbers).
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s\"'<>]+")
_DIGITS = re.compile(r"\+?\d[\d\s().-]{6,}\d")


@dataclass(frozen=True)
class Alert:
    """What an alert says: identifiers, never record values."""

    kind: str
    dag_id: str
    run_id: str | None
    task_id: str | None = None
    try_number: int | None = None
    error_type: str | None = None
    error: str | None = None
    lines: tuple[str, ...] = ()  # a report's figures (kind "health"): names and numbers only
    link: str | None = None  # where the full report is
    attachment: str | None = None  # a local file mailed along (never posted to a webhook)

    @property
    def title(self) -> str:
        what = {
            "failure": "task failed",
            "health": "daily sync health report",
            "invalid_share": "invalid rows over the threshold (dead-lettered, the run went on)",
        }.get(self.kind, "run overran its deadline")
        return f"[d365sync] {self.dag_id}: {what}"

    @property
    def text(self) -> str:
        lines = [self.title, f"DAG: {self.dag_id}", f"Run: {self.run_id or '-'}", *self.lines]
        if self.link:
            lines.append(f"Report: {self.link}")
        if self.task_id:
            lines.append(f"Task: {self.task_id} (try {self.try_number or '?'})")
        if self.error_type:
            lines.append(f"Error: {self.error_type}: {self.error or ''}".rstrip(": "))
        return "\n".join(lines)


def redact(message: str) -> str:
    """Strip what could be a secret or personal data from an error message, and cap its length.

    Credentials (``PWD=``, ``Password:``, ``AccountKey=``, ``SharedAccessKey=``, ``client_secret``,
    tokens, URL userinfo…) become ``***`` (:func:`d365sync.engine.pii.redact_secrets`), e-mails
    ``<email>``, URLs ``<url>``, phones and long digit runs ``<number>``.
    """
    message = pii.redact_secrets(message)
    message = pii.EMAIL_IN_TEXT.sub("<email>", message)
    message = _URL.sub("<url>", message)
    message = pii.PHONE_IN_TEXT.sub("<number>", message)
    message = _DIGITS.sub("<number>", message)
    message = " ".join(message.split())
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 1] + "…"


def failure_alert(context: Any) -> Alert:
    """An :class:`Alert` from a task callback context."""
    ti = context.get("ti") or context.get("task_instance")
    run = context.get("dag_run")
    exc = context.get("exception")
    return Alert(
        kind="failure",
        dag_id=getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?"),
        run_id=getattr(run, "run_id", None) or getattr(ti, "run_id", None),
        task_id=getattr(ti, "task_id", None),
        try_number=getattr(ti, "try_number", None),
        error_type=type(exc).__name__ if isinstance(exc, BaseException) else None,
        error=redact(str(exc)) if exc is not None else None,
    )


def on_invalid_share(summaries: list[str], dag_id: str, run_id: str | None) -> list[str]:
    """Alert that a run's invalid share passed its threshold (validate went on); never raises."""
    channels = settings.alert_channels()
    if not summaries or not channels.enabled:
        return []
    lines = tuple(redact(s) for s in summaries)
    return send(Alert(kind="invalid_share", dag_id=dag_id, run_id=run_id, lines=lines), channels)


def health_alert(
    summary: Mapping[str, Any], dag_id: str, run_id: str | None, link: str, attachment: str | None = None
) -> Alert:
    """The health report's message: per-entity figures from the JSON summary, no record values."""
    lines = [f"Window: last {summary.get('window_days')} days, generated {summary.get('generated_at')}"]
    for name, h in sorted((summary.get("entities") or {}).items()):
        lines.append(_entity_line(name, h))
    failures = sum(int(f.get("count", 0)) for f in summary.get("top_failures") or [])
    lines.append(f"Failure causes: {len(summary.get('top_failures') or [])} ({failures} occurrences)")
    for name, found in sorted((summary.get("drift") or {}).items()):
        counts = ", ".join(f"{k} {v}" for k, v in sorted((found.get("counts") or {}).items()))
        lines.append(f"Drift {name}: {counts or 'none'}")
    return Alert(
        kind="health",
        dag_id=dag_id,
        run_id=run_id,
        lines=tuple(lines),
        link=link,
        attachment=attachment,
    )


def _entity_line(name: str, h: Mapping[str, Any]) -> str:
    rate = h.get("success_rate")
    shown = "-" if rate is None else f"{rate:.0%}"
    last = h.get("last_success_at") or "never"
    return (
        f"{name}: {h.get('runs', 0)} runs, {shown} success, last success {last}, "
        f"error rate {float(h.get('error_rate') or 0):.2%}, open reviews {h.get('open_reviews', 0)} "
        f"({h.get('stale_reviews', 0)} stale), dead letters {h.get('dead_letters', 0)}, "
        f"throttles {h.get('throttles', 0)}"
    )


def deadline_alert_from(context: dict[str, Any] | None, dag_id: str) -> Alert:
    """An :class:`Alert` from the simple context the scheduler hands deadline callbacks."""
    run = (context or {}).get("dag_run") or {}
    return Alert(kind="deadline", dag_id=run.get("dag_id") or dag_id, run_id=run.get("dag_run_id"))


# ------------------------------------------------------------------------------ channels
def webhook_body(alert: Alert, fmt: str) -> dict[str, Any]:
    """JSON for Slack (``text``), Teams (a MessageCard) or a generic receiver (fields + text)."""
    if fmt == "slack":
        return {"text": alert.text}
    if fmt == "teams":
        return {
            "@type": "MessageCard",
            "@context": "https://schema.org/extensions",
            "summary": alert.title,
            "title": alert.title,
            "text": alert.text.replace("\n", "<br>"),
        }
    fields = {k: v for k, v in asdict(alert).items() if k != "attachment"}
    return {"text": alert.text, "title": alert.title, "alert": fields}


def post_webhook(alert: Alert, channels: settings.AlertChannels) -> None:
    import requests

    assert channels.webhook_url
    response = requests.post(
        channels.webhook_url, json=webhook_body(alert, channels.webhook_format), timeout=TIMEOUT_SECONDS
    )
    response.raise_for_status()


def send_email(alert: Alert, channels: settings.AlertChannels) -> None:
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    assert channels.smtp_conn_id
    with SmtpHook(smtp_conn_id=channels.smtp_conn_id) as hook:
        hook.send_email_smtp(**_email_fields(alert, channels, hook.from_email))


async def asend_email(alert: Alert, channels: settings.AlertChannels) -> None:
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    assert channels.smtp_conn_id
    async with SmtpHook(smtp_conn_id=channels.smtp_conn_id) as hook:
        await hook.asend_email_smtp(**_email_fields(alert, channels, hook.from_email))


def _email_fields(alert: Alert, channels: settings.AlertChannels, default_from: str | None) -> dict[str, Any]:
    html = "<pre>" + alert.text.replace("&", "&amp;").replace("<", "&lt;") + "</pre>"
    sender = channels.email_from or default_from or "d365sync@localhost"
    fields: dict[str, Any] = {
        "to": list(channels.email_to),
        "subject": alert.title,
        "html_content": html,
        "from_email": sender,
    }
    if alert.attachment:
        fields["files"] = [alert.attachment]
    return fields


def send(alert: Alert, channels: settings.AlertChannels | None = None) -> list[str]:
    """Send through every configured channel; a broken channel is logged, never raised."""
    channels = channels or settings.alert_channels()
    sent = []
    for name, configured, sender in (
        ("webhook", channels.webhook_url, post_webhook),
        ("smtp", channels.smtp_conn_id and channels.email_to, send_email),
    ):
        if not configured:
            continue
        try:
            sender(alert, channels)
            sent.append(name)
        except Exception as exc:  # an alert must never fail the task's own failure handling
            log.warning("d365sync alert via %s failed: %s", name, type(exc).__name__)
    return sent


async def asend(alert: Alert, channels: settings.AlertChannels | None = None) -> list[str]:
    """:func:`send` for the triggerer's event loop (webhook in a thread, SMTP with aiosmtplib)."""
    channels = channels or settings.alert_channels()
    sent = []
    if channels.webhook_url:
        try:
            await asyncio.to_thread(post_webhook, alert, channels)
            sent.append("webhook")
        except Exception as exc:
            log.warning("d365sync alert via webhook failed: %s", type(exc).__name__)
    if channels.smtp_conn_id and channels.email_to:
        try:
            await asend_email(alert, channels)
            sent.append("smtp")
        except Exception as exc:
            log.warning("d365sync alert via smtp failed: %s", type(exc).__name__)
    return sent


# ----------------------------------------------------------------------------- callbacks
def on_task_failure(context: Any) -> None:
    """``on_failure_callback`` of every sync task (runs in the worker's task runner)."""
    channels = settings.alert_channels()
    if channels.enabled:
        send(failure_alert(context), channels)


async def on_deadline_missed(context: dict[str, Any] | None = None, *, dag_id: str = "?") -> None:
    """``AsyncCallback`` of the DAG's ``DeadlineAlert`` (runs in the triggerer)."""
    channels = settings.alert_channels()
    alert = deadline_alert_from(context, dag_id)
    log.warning("%s", alert.title)
    if channels.enabled:
        await asend(alert, channels)


def describe(alert: Alert) -> str:
    """The alert as JSON, for logs."""
    return json.dumps(asdict(alert), sort_keys=True)
