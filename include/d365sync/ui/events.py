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
Kept fast: one transaction, no call to the Airflow API. What is stored, and how, is
:class:`~d365sync.engine.intake.Intake`'s, shared with the Service Bus bridge
(:mod:`d365sync.airflow.servicebus`). Notifications of the sync's own writes
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from d365sync.dynamics.notifications import Notification, NotificationError, parse_notification
from d365sync.engine.inbox import InboxQueries
from d365sync.engine.intake import AppUsers, Intake, IntakeUnavailable
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


def whoami(conn_id: str) -> Callable[[], frozenset[str]]:
    """Ask ``WhoAmI`` with the Dynamics connection ``conn_id`` (when first needed)."""

    def resolve() -> frozenset[str]:
        from d365sync.airflow.hook import application_user_ids

        return application_user_ids(conn_id)

    return resolve


# --- the receiver -----------------------------------------------------------------------------


@dataclass
class Receiver:
    """Turns one notification into inbox rows (:class:`~d365sync.engine.intake.Intake`) and an answer."""

    keys: WebhookKeys
    intake: Intake

    @classmethod
    def from_settings(cls, settings: UiSettings) -> Receiver:
        app_users = AppUsers(settings.app_user_ids, whoami(settings.dynamics_conn_id))
        return cls(WebhookKeys(settings.webhook_keys), Intake(SOURCE, app_users))

    def receive(
        self, store: Callable[[], InboxQueries], note: Notification, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, answer) for one parsed notification; stores before it answers 2xx."""
        try:
            (planned,), result = self.intake.add(store, [(note, body)])
        except IntakeUnavailable as exc:  # nothing committed: 503 makes Dataverse retry
            return 503, {"detail": exc.detail}
        if planned.reason is not None:
            answer = {"accepted": True, "duplicate": False, "added": 0, "ignored": 0, "entities": []}
            return 202, answer | {"reason": planned.reason}
        if result.duplicate:
            return 200, {"accepted": True, "duplicate": True}
        answer = {"accepted": True, "duplicate": False, "added": result.added, "ignored": result.ignored}
        return 202, answer | {"entities": list(planned.entities)}


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
