"""Dataverse change notifications into the event inbox, whatever carried them (webhook, Service Bus).

Why one place: the webhook receiver (:mod:`d365sync.ui.events`) and the Service Bus bridge
(:mod:`d365sync.airflow.servicebus`) must store a notification the same way. The carrier parses
the body (:func:`~d365sync.dynamics.notifications.parse_notification`) and decides what to answer;
:class:`Intake` decides what is stored:

* one inbox row per entity syncing the notification's table (:class:`TableMap`, the entity files);
* deduplicated by ``OperationId`` (else the body's SHA-256): a redelivery adds nothing;
* the sync's own writes (``UserId`` or ``InitiatingUserId`` is one of its application users,
  :class:`AppUsers`) stored ``ignored``: deduplicated and counted, but they start no run;
* a message other than Create/Update/Delete, or a table no entity syncs: accepted, not stored,
  said once per reason in the log.

:class:`IntakeUnavailable` means nothing was stored and a retry may work (entity files unreadable,
state store down): the receiver answers 503, the bridge task fails and is retried.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from d365sync.dynamics.notifications import Notification
from d365sync.engine.inbox import MESSAGES, InboxAddResult, InboxQueries, IncomingEvent, Source
from d365sync.engine.pii import mask_text

log = logging.getLogger(__name__)

APP_USER_IDS_ENV: Final = "D365SYNC_APP_USER_IDS"
WHOAMI_RETRY_SECONDS: Final = 300.0
CARRIERS: Final = {"dataverse_webhook": "webhook receiver", "servicebus": "Service Bus bridge"}


class IntakeUnavailable(RuntimeError):
    """Nothing was stored, and trying again later may work; ``detail`` says what to tell the sender."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# --- the sync's own application users ---------------------------------------------------------


def parse_app_user_ids(raw: str, name: str = APP_USER_IDS_ENV) -> frozenset[str] | None:
    """Comma-separated GUIDs, normalised (lower case, no braces); None when there are none."""
    items = [item.strip() for item in raw.split(",") if item.strip()]
    try:
        return frozenset(str(uuid.UUID(item.strip("{}"))) for item in items) if items else None
    except ValueError:
        raise ValueError(f"{name}: every item must be a GUID") from None


class AppUsers:
    """The sync's application user ids: configured, else resolved once (``WhoAmI``) and cached."""

    def __init__(
        self,
        configured: frozenset[str] | None,
        resolve: Callable[[], frozenset[str]],
        retry_after: float = WHOAMI_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ids, self._resolve = configured, resolve
        self._retry_after, self._clock = retry_after, clock
        self._next_try = 0.0
        self._warned = False
        self._lock = threading.Lock()

    def get(self) -> frozenset[str] | None:
        """The ids, or None while they are unknown (then nothing is ignored)."""
        if self._ids is not None:
            return self._ids
        with self._lock:
            if self._ids is None and self._clock() >= self._next_try:
                self._ids = self._try_resolve()
            return self._ids

    def _try_resolve(self) -> frozenset[str] | None:
        try:
            ids = self._resolve()
        except Exception as exc:  # unreachable, unauthorised, not configured: all the same here
            self._next_try = self._clock() + self._retry_after
            if not self._warned:
                self._warned = True
                reason = mask_text(f"{type(exc).__name__}: {exc}")[:300]
                log.warning(
                    "Dataverse notifications: the sync's application user is unknown (WhoAmI failed: %s); "
                    "its own writes are stored as new events until it is known "
                    "(set %s to avoid asking)",
                    reason,
                    APP_USER_IDS_ENV,
                )
            return None
        log.info("Dataverse notifications: the sync's application user ids are %s", ", ".join(sorted(ids)))
        return ids


# --- tables to entities -----------------------------------------------------------------------


class TableMap:
    """Dataverse table -> the entities syncing it, from the entity files (read once)."""

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory
        self._map: dict[str, tuple[str, ...]] | None = None
        self._apart: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def entities(self, table: str) -> tuple[str, ...]:
        """The entities syncing ``table``. While an entity file does not load, a table no loaded
        entity claims may be that file's: ``LookupError`` (the sender retries), and the files are
        read again on the next call."""
        if self._map is None:
            with self._lock:
                if self._map is None:
                    self._map, self._apart = self._load()
        found = self._map.get(table.lower(), ())
        if not found and self._apart:
            names = ", ".join(self._apart)
            self._map = None
            raise LookupError(f"entity files that do not load ({names}) may sync table {table}")
        return found

    def _load(self) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
        from d365sync.spec import entities_dir, load_entities_apart

        specs, apart = load_entities_apart(self._directory or entities_dir())
        found: dict[str, list[str]] = {}
        for name, spec in specs.items():
            found.setdefault(spec.dynamics.table.lower(), []).append(name)
        return {table: tuple(sorted(names)) for table, names in found.items()}, tuple(sorted(apart))


# --- the intake -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Planned:
    """What one notification becomes: the entities syncing its table and their rows, or why none."""

    note: Notification
    entities: tuple[str, ...] = ()
    events: tuple[IncomingEvent, ...] = ()
    reason: str | None = None  # accepted and not stored: why


@dataclass
class Intake:
    """Stores parsed notifications of one carrier (``source``) in the inbox, by the rules above."""

    source: Source
    app_users: AppUsers
    tables: TableMap = field(default_factory=TableMap)
    _said: set[str] = field(default_factory=set, init=False, repr=False)

    @property
    def carrier(self) -> str:
        return CARRIERS.get(self.source, self.source)

    def plan(self, note: Notification, body: bytes) -> Planned:
        """The rows for one notification (no I/O but the entity files, read once)."""
        if note.message not in MESSAGES:
            reason = f"message {note.message} does not start a sync (Create, Update, Delete)"
            return self._not_stored(note, reason)
        try:
            entities = self.tables.entities(note.table)
        except Exception as exc:  # a broken entity file: the DAGs report it; the sender retries
            log.error("%s: entity files unreadable (%s)", self.carrier, type(exc).__name__)
            raise IntakeUnavailable("entity files unreadable; retry") from exc
        if not entities:
            return self._not_stored(note, f"no entity syncs table {note.table}")
        own = self.app_users.get()
        ignored = own is not None and bool(note.users & own)
        key = note.dedupe_key(body)
        events = tuple(inbox_event(note, entity, self.source, key, ignored) for entity in entities)
        return Planned(note, entities, events)

    def add(
        self, store: Callable[[], InboxQueries], items: Iterable[tuple[Notification, bytes]]
    ) -> tuple[list[Planned], InboxAddResult]:
        """Plan every notification and store all their rows in one transaction (committed on return)."""
        planned = [self.plan(note, body) for note, body in items]
        events = [event for p in planned for event in p.events]
        if not events:  # nothing to store: the store is not even opened
            return planned, InboxAddResult(0, 0, 0)
        try:
            result = store().inbox_add(events)
        except Exception as exc:  # whatever it was, nothing committed: the sender retries
            log.error("%s: events not stored (%s)", self.carrier, type(exc).__name__)
            raise IntakeUnavailable("state store unavailable; retry") from exc
        self._log(planned, result)
        return planned, result

    def _log(self, planned: Sequence[Planned], result: InboxAddResult) -> None:
        counts = f"{result.added} added, {result.ignored} ignored, {result.duplicates} duplicates"
        one = len(planned) == 1  # a batch: one line, the notifications at DEBUG
        level, tail = (logging.INFO, f": {counts}") if one else (logging.DEBUG, "")
        for p in planned:
            if p.events:
                n = p.note
                log.log(
                    level, "%s: dataverse %s of %s %s (correlation %s)%s",
                    self.carrier, n.message, n.table, n.record_id, n.correlation_id, tail,
                )  # fmt: skip
        if not one:
            log.info("%s: %d notifications: %s", self.carrier, len(planned), counts)

    def _not_stored(self, note: Notification, reason: str) -> Planned:
        if reason not in self._said:  # once per reason: a misrouted registration must not flood the log
            if len(self._said) >= 1000:
                self._said.clear()
            self._said.add(reason)
            log.warning("%s: accepted and not stored: %s", self.carrier, reason)
        return Planned(note, reason=reason)


def inbox_event(
    note: Notification, entity: str, source: Source, dedupe_key: str, ignored: bool
) -> IncomingEvent:
    """The inbox row of one notification for one entity: ids and attribute names, no values."""
    return IncomingEvent(
        source=source,
        entity=entity,
        table_name=note.table,
        record_id=note.record_id,
        message=note.message,  # type: ignore[arg-type]  (checked against MESSAGES)
        dedupe_key=dedupe_key,
        attributes=note.attributes,
        correlation_id=note.correlation_id,
        user_id=note.user_id,
        depth=note.depth,
        operation_created_on=note.created_on,
        ignored=ignored,
    )


def entities_of(planned: Sequence[Planned]) -> list[str]:
    """The entities the planned notifications are for, sorted, each once."""
    return sorted({entity for p in planned for entity in p.entities})
