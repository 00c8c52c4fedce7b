"""Dataverse notifications from an Azure Service Bus queue into the event inbox (issue 13).

The production alternative to the webhook receiver (docs/events-servicebus.md): Dataverse posts
each change, a ``RemoteExecutionContext`` in the service endpoint's JSON message format, to a
queue, which keeps it while Airflow is down or unreachable from Microsoft's cloud. The path:

1. the provider's ``AzureServiceBusQueueTrigger``, run by the triggerer as the
   :class:`~airflow.sdk.AssetWatcher` of the asset ``d365sync://events/servicebus``, receives one
   message (peek-lock, completed at once) and yields ``{"message": <body as text>, "queue": <name>}``;
2. Airflow stores that as an asset event, ``extra = {"from_trigger": True, "payload": <it>}``, and
   starts ``d365sync_servicebus_inbox``; a run gets every asset event since the previous run;
3. :func:`store_messages` parses every body with the webhook's own parser and stores them all
   through :class:`~d365sync.engine.intake.Intake` (source ``servicebus``): the same rows, the same
   deduplication by ``OperationId``, the sync's own writes ``ignored``; one transaction;
4. the entity's :class:`~d365sync.airflow.triggers.InboxTrigger` sees the rows and starts its run.

A message that is not a JSON ``RemoteExecutionContext`` does not hold back the others: they are
stored first, then the task fails with :class:`RejectedMessages`, which names every rejected
message (its place in the run, queue, asset event time, and OperationId or body hash; never a
value) and is not retried. The message itself stays in the run's asset event in Airflow's metadata
DB, where an operator reads it. A state store that is down fails the task before anything is
stored; its retries store everything (a redelivery adds nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from functools import cache, partial
from typing import Any, Final

from d365sync.dynamics.notifications import Notification, NotificationError, parse_notification
from d365sync.engine.inbox import InboxQueries
from d365sync.engine.intake import APP_USER_IDS_ENV, AppUsers, Intake, entities_of, parse_app_user_ids

log = logging.getLogger(__name__)

SOURCE: Final = "servicebus"
JSON_HINT: Final = "the Dataverse service endpoint's message format must be JSON"


@dataclass(frozen=True, slots=True)
class Message:
    """One Service Bus message as its asset event carries it (``body`` None: not such an event)."""

    position: int  # 1-based, in the order Airflow recorded the events
    queue: str | None
    at: datetime | None  # when Airflow recorded the asset event
    body: str | None

    def describe(self, total: int) -> str:
        """Which message: enough to find its asset event and its Dataverse system job, no value."""
        where = [f"queue {self.queue or '?'}"]
        if self.at is not None:
            where.append(f"asset event {self.at.isoformat()}")
        if self.body is not None:
            operation = _operation_id(self.body)
            digest = hashlib.sha256(self.body.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            where.append(f"OperationId {operation}" if operation else f"body sha256:{digest}")
        return f"message {self.position} of {total} ({', '.join(where)})"


class RejectedMessages(ValueError):
    """Messages that are not JSON RemoteExecutionContexts; the others were stored. Not retried:
    the same body would fail again. Each line names a message and what is wrong, never a value."""

    def __init__(self, rejected: Sequence[str], total: int) -> None:
        self.rejected = tuple(rejected)
        lines = "\n".join(f"- {line}" for line in self.rejected)
        super().__init__(
            f"{len(self.rejected)} of {total} Service Bus message(s) rejected, not stored; the others "
            f"are in the inbox. Each stays in this run's asset events (docs/events-servicebus.md):\n{lines}"
        )


def messages_of(events: Iterable[Any]) -> list[Message]:
    """The messages in asset events (Task SDK ``AssetEventDagRunReference``s or plain mappings)."""
    out = []
    for position, event in enumerate(events, start=1):
        extra = _field(event, "extra") or {}
        payload = extra.get("payload") if isinstance(extra, Mapping) else None
        payload = payload if isinstance(payload, Mapping) else {}
        body, queue, at = payload.get("message"), payload.get("queue"), _field(event, "timestamp")
        out.append(
            Message(
                position=position,
                queue=queue if isinstance(queue, str) else None,
                at=at if isinstance(at, datetime) else None,
                body=body if isinstance(body, str) else None,
            )
        )
    return out


def store_messages(
    events: Iterable[Any], intake: Intake, store: Callable[[], InboxQueries]
) -> dict[str, Any]:
    """Put the notifications of a run's asset events in the inbox; raise :class:`RejectedMessages`
    after storing the good ones when some are not notifications."""
    messages = messages_of(events)
    parsed: list[tuple[Notification, bytes]] = []
    rejected: list[str] = []
    for message in messages:
        try:
            parsed.append(_parse(message))
        except NotificationError as exc:
            rejected.append(f"{message.describe(len(messages))}: {exc}")
    planned, result = intake.add(store, parsed)
    summary = {
        "messages": len(messages),
        "added": result.added,
        "ignored": result.ignored,
        "duplicates": result.duplicates,
        "not_stored": sum(p.reason is not None for p in planned),
        "rejected": len(rejected),
        "entities": entities_of(planned),
    }
    log.info("Service Bus messages to the inbox: %s", summary)
    if rejected:
        for line in rejected:
            log.error("Service Bus message rejected: %s", line)
        raise RejectedMessages(rejected, len(messages))
    return summary


def _parse(message: Message) -> tuple[Notification, bytes]:
    if message.body is None:
        raise NotificationError("not a message of the Service Bus queue trigger (no payload.message)")
    body = message.body.encode("utf-8", "surrogatepass")
    try:
        return parse_notification(body), body
    except NotificationError as exc:
        if message.body.lstrip().startswith("{"):
            raise
        raise NotificationError(f"{exc} ({JSON_HINT})") from None


def _operation_id(body: str) -> str | None:
    """The ``OperationId`` of a body that is JSON at least (Dataverse's system job id), else None."""
    try:
        context = json.loads(body)
        value = context.get("OperationId") if isinstance(context, dict) else None
        return str(uuid.UUID(str(value).strip("{}"))) if value else None
    except (ValueError, TypeError):
        return None


def _field(event: Any, name: str) -> Any:
    return event.get(name) if isinstance(event, Mapping) else getattr(event, name, None)


# --- the task ---------------------------------------------------------------------------------


def servicebus_intake() -> Intake:
    """The Service Bus intake: ``D365SYNC_APP_USER_IDS``, else ``WhoAmI`` of the Dynamics connection
    (asked when a notification first needs it)."""
    from d365sync.airflow import settings
    from d365sync.airflow.hook import application_user_ids

    configured = parse_app_user_ids(os.environ.get(APP_USER_IDS_ENV, ""))
    resolve = partial(application_user_ids, settings.connections().dynamics)
    return Intake(SOURCE, AppUsers(configured, resolve))


def servicebus_to_inbox() -> dict[str, Any]:
    """The task: this run's asset events (one per message) into the inbox. A manual run has none."""
    from d365sync.airflow.tasks import airflow_context, state_store

    triggering = airflow_context()["triggering_asset_events"]
    events = [event for asset in triggering for event in triggering[asset]]
    with ExitStack() as stack:
        opened = cache(lambda: stack.enter_context(state_store()))  # only when there is a row to add
        return store_messages(events, servicebus_intake(), opened)
