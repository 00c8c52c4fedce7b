"""The Dataverse webhook receiver: ``POST /d365sync/events/dataverse`` puts change notifications
in the state store's event inbox (:mod:`d365sync.engine.inbox`), where triggers pick them up.

Machine to machine (:func:`~d365sync.ui.auth.machine_to_machine`): no user session, no CSRF
token, but never anonymous. The caller proves a shared key, compared in constant time, given as
``?code=<key>`` (Dataverse "WebhookKey" authentication) or the ``x-d365sync-webhook-key`` header
("HttpHeader" authentication). Keys: ``D365SYNC_WEBHOOK_KEY`` (comma-separated: the old and the
new one during a rotation), else the Airflow Variable ``d365sync_webhook_key`` (re-read every
minute). No key at all: 503 "webhook receiver not configured", never an open door.

Answers (Dataverse retries once, and only on 502/503/504):

====  ==============================================================================
202   stored (``added``/``ignored`` counts), or accepted and not stored: a table no
      entity syncs, or a message other than Create/Update/Delete (``reason``)
200   ``{"duplicate": true}``: delivered before; nothing added
400   not a RemoteExecutionContext (the reason names the key, never a value)
401   wrong or missing key (logged without the key)
413   body over 1 MB (Dataverse itself caps notifications at 256 KB)
503   no key configured, or the inbox row could not be committed: retry
====  ==============================================================================

A 2xx is sent only after the row has committed, so an acknowledged notification is never lost.
Kept fast: one transaction, no call to the Airflow API. Notifications of the sync's own writes
(``UserId`` or ``InitiatingUserId`` is one of the sync's application users:
``D365SYNC_APP_USER_IDS``, else ``WhoAmI`` of the Dynamics connection, asked once) are stored
``ignored``: deduplicated and counted, but they start no run. If ``WhoAmI`` cannot be asked, they
are stored ``new`` (the run's echo guard still recognises its own writes) and a warning is
logged; ``WhoAmI`` is asked again five minutes later.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from d365sync.dynamics.notifications import Notification, NotificationError, parse_notification
from d365sync.engine.inbox import MESSAGES, InboxQueries, IncomingEvent
from d365sync.engine.pii import mask_text
from d365sync.ui.auth import Principal, machine_to_machine
from d365sync.ui.settings import UiSettings

log = logging.getLogger(__name__)
router = APIRouter()

DATAVERSE_PATH: Final = "/events/dataverse"
KEY_HEADER: Final = "x-d365sync-webhook-key"
KEY_PARAM: Final = "code"
KEY_VARIABLE: Final = "d365sync_webhook_key"
MIN_KEY_LENGTH: Final = 16
MAX_BODY: Final = 1024 * 1024
KEY_TTL_SECONDS: Final = 60.0
WHOAMI_RETRY_SECONDS: Final = 300.0
SOURCE: Final = "dataverse_webhook"


# --- keys -------------------------------------------------------------------------------------


class WebhookKeys:
    """The accepted keys: the configured ones, else the Airflow Variable (cached a minute)."""

    def __init__(
        self,
        configured: Iterable[str] = (),
        variable: str = KEY_VARIABLE,
        ttl: float = KEY_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._configured = _usable(configured, "D365SYNC_WEBHOOK_KEY")
        self._variable, self._ttl, self._clock = variable, ttl, clock
        self._cached: tuple[tuple[str, ...], float] | None = None
        self._lock = threading.Lock()

    def get(self) -> tuple[str, ...]:
        """The keys now (may read the Variable: call it off the event loop)."""
        if self._configured:
            return self._configured
        with self._lock:
            if self._cached is None or self._clock() >= self._cached[1]:
                self._cached = (
                    _usable(_variable_keys(self._variable), self._variable),
                    self._clock() + self._ttl,
                )
            return self._cached[0]

    @staticmethod
    def matches(given: str, keys: Iterable[str]) -> bool:
        """Constant time per key, and every key is compared (no hint which one matched)."""
        found = False
        for key in keys:
            found |= hmac.compare_digest(given.encode(), key.encode())
        return found


def _usable(keys: Iterable[str], origin: str) -> tuple[str, ...]:
    given = tuple(keys)
    out = tuple(k for k in given if len(k) >= MIN_KEY_LENGTH)
    if len(out) < len(given):
        log.error("%s: a webhook key shorter than %d characters is ignored", origin, MIN_KEY_LENGTH)
    return out


def _variable_keys(name: str) -> tuple[str, ...]:
    """The Variable's comma-separated keys; none when Airflow is absent or the lookup fails."""
    try:
        from airflow.sdk import Variable

        raw = Variable.get(name, default=None)
    except Exception as exc:  # fail closed: no key, the receiver answers 503
        log.warning("webhook keys: Variable %s unreadable (%s)", name, type(exc).__name__)
        return ()
    return tuple(k.strip() for k in str(raw or "").split(",") if k.strip())


async def webhook_key(request: Request) -> Principal:
    """Authenticate a webhook call by its key (``?code=`` or the header); 503 with no key set."""
    receiver: Receiver = request.app.state.ctx.events
    keys = await run_in_threadpool(receiver.keys.get)
    if not keys:
        raise HTTPException(503, "webhook receiver not configured")
    given = [v for v in (request.headers.get(KEY_HEADER), request.query_params.get(KEY_PARAM)) if v]
    if not any(WebhookKeys.matches(value, keys) for value in given):
        client = request.client.host if request.client else "?"
        log.warning("webhook call refused: %s key (from %s)", "wrong" if given else "no", client)
        raise HTTPException(401, "invalid or missing webhook key")
    return Principal("dataverse-webhook", "none", "machine", "")


# --- the sync's own application users ---------------------------------------------------------


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
                    "webhook receiver: the sync's application user is unknown (WhoAmI failed: %s); "
                    "its own writes are stored as new events until it is known "
                    "(set D365SYNC_APP_USER_IDS to avoid asking)",
                    reason,
                )
            return None
        log.info("webhook receiver: the sync's application user ids are %s", ", ".join(sorted(ids)))
        return ids


def whoami(conn_id: str) -> Callable[[], frozenset[str]]:
    """Ask ``WhoAmI`` with the Dynamics connection ``conn_id`` (short timeouts, two tries)."""

    def resolve() -> frozenset[str]:
        from d365sync.airflow.hook import DynamicsWebApiHook
        from d365sync.dynamics import DynamicsClient
        from d365sync.dynamics.config import RetrySettings

        config = DynamicsWebApiHook(conn_id).get_config()
        retry = RetrySettings(max_attempts=2, max_total_seconds=15.0, backoff_cap=2.0)
        quick = replace(config, connect_timeout=3.0, read_timeout=10.0, retry=retry)
        with DynamicsClient(quick) as client:
            user = client.whoami().get("UserId")
        return frozenset({str(uuid.UUID(str(user)))})

    return resolve


# --- tables to entities -----------------------------------------------------------------------


class TableMap:
    """Dataverse table -> the entities syncing it, from the entity files (read once)."""

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory
        self._map: dict[str, tuple[str, ...]] | None = None
        self._lock = threading.Lock()

    def entities(self, table: str) -> tuple[str, ...]:
        if self._map is None:
            with self._lock:
                if self._map is None:
                    self._map = self._load()
        return self._map.get(table.lower(), ())

    def _load(self) -> dict[str, tuple[str, ...]]:
        from d365sync.spec import entities_dir, load_entities

        found: dict[str, list[str]] = {}
        for name, spec in load_entities(self._directory or entities_dir()).items():
            found.setdefault(spec.dynamics.table.lower(), []).append(name)
        return {table: tuple(sorted(names)) for table, names in found.items()}


# --- the receiver -----------------------------------------------------------------------------


@dataclass
class Receiver:
    """Turns one notification into inbox rows (one per entity syncing its table)."""

    keys: WebhookKeys
    app_users: AppUsers
    tables: TableMap = field(default_factory=TableMap)
    _said: set[str] = field(default_factory=set, init=False, repr=False)

    @classmethod
    def from_settings(cls, settings: UiSettings) -> Receiver:
        keys = WebhookKeys(settings.webhook_keys)
        return cls(keys, AppUsers(settings.app_user_ids, whoami(settings.dynamics_conn_id)))

    def receive(
        self, store: Callable[[], InboxQueries], note: Notification, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, answer) for one parsed notification; stores before it answers 2xx."""
        if note.message not in MESSAGES:
            return self._not_stored(f"message {note.message} does not start a sync (Create, Update, Delete)")
        try:
            entities = self.tables.entities(note.table)
        except Exception as exc:  # a broken entity file: the DAGs report it; Dataverse retries once
            log.error("webhook receiver: entity files unreadable (%s)", type(exc).__name__)
            return 503, {"detail": "entity files unreadable; retry"}
        if not entities:
            return self._not_stored(f"no entity syncs table {note.table}")
        ignored = self._own_write(note)
        events = [_event(note, entity, note.dedupe_key(body), ignored) for entity in entities]
        try:
            result = store().inbox_add(events)
        except Exception as exc:  # whatever it was, nothing committed: 503 makes Dataverse retry
            log.error("webhook receiver: event not stored, answered 503 (%s)", type(exc).__name__)
            return 503, {"detail": "state store unavailable; retry"}
        log.info(
            "dataverse %s of %s %s (correlation %s): %d added, %d ignored, %d duplicates",
            note.message, note.table, note.record_id, note.correlation_id,
            result.added, result.ignored, result.duplicates,
        )  # fmt: skip
        if result.duplicate:
            return 200, {"accepted": True, "duplicate": True}
        answer = {"accepted": True, "duplicate": False, "added": result.added, "ignored": result.ignored}
        return 202, answer | {"entities": list(entities)}

    def _own_write(self, note: Notification) -> bool:
        own = self.app_users.get()
        return own is not None and bool(note.users & own)

    def _not_stored(self, reason: str) -> tuple[int, dict[str, Any]]:
        if reason not in self._said:  # once per reason: a misrouted webhook must not flood the log
            if len(self._said) >= 1000:
                self._said.clear()
            self._said.add(reason)
            log.warning("webhook receiver: accepted and not stored: %s", reason)
        answer = {"accepted": True, "duplicate": False, "added": 0, "ignored": 0, "entities": []}
        return 202, answer | {"reason": reason}


def _event(note: Notification, entity: str, dedupe_key: str, ignored: bool) -> IncomingEvent:
    return IncomingEvent(
        source=SOURCE,
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


async def _body(request: Request) -> bytes:
    """The body, refused with 413 past :data:`MAX_BODY` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise HTTPException(413, f"notification larger than {MAX_BODY} bytes")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise HTTPException(413, f"notification larger than {MAX_BODY} bytes")
        parts.append(chunk)
    return b"".join(parts)


@router.post(DATAVERSE_PATH, status_code=202)
@machine_to_machine(webhook_key)
async def dataverse_event(request: Request) -> JSONResponse:
    """A Dataverse webhook delivery (RemoteExecutionContext JSON) into the event inbox."""
    body = await _body(request)
    try:
        note = parse_notification(body)
    except NotificationError as exc:
        log.info("webhook receiver: malformed notification refused (%s)", exc)
        return JSONResponse({"detail": f"not a Dataverse RemoteExecutionContext: {exc}"}, status_code=400)
    ctx = request.app.state.ctx
    status, answer = await run_in_threadpool(ctx.events.receive, lambda: ctx.store, note, body)
    return JSONResponse(answer, status_code=status)
