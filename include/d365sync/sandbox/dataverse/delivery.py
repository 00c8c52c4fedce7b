"""Sending the queued webhook notifications, as Dataverse's asynchronous service does.

One scheduler thread picks due rows from ``_webhook_delivery`` (see :mod:`.webhooks`) and hands
them to a few sender threads, each with its own keep-alive ``requests.Session``.  A sender builds
the ``RemoteExecutionContext`` JSON, adds the endpoint's authentication (WebhookKey as
``?code=``, HttpHeader as headers, HttpQueryString as query parameters) and POSTs it with the
documented ``x-ms-dynamics-*`` headers.  A 2xx answer delivers it; any other status, a timeout or
a connection error is a failed attempt, retried after ``webhook_backoff_ms`` doubling with each
attempt (capped at :data:`MAX_BACKOFF_MS`) until ``webhook_max_attempts``, when it is marked
failed.  Outcomes are written back in one short transaction per batch, so senders never hold
the write lock.

Order: for one endpoint and record only the oldest pending notification is sent, so a record's
Create reaches the receiver before its Update even across retries; different records go in
parallel and in no guaranteed order.  Delivery is at least once: a notification being sent when
the sandbox stops is sent again after the restart, with the same ``OperationId``.

A notification whose step or endpoint was deleted is cancelled instead of sent; one whose step
was only disabled is still sent (it was queued while the step was enabled).  Finished rows stay
in the log (``GET /_sandbox/webhooks``) up to :data:`LOG_LIMIT`, whatever the step's
``asyncautodelete``.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import sqlite3
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from d365sync.sandbox.dataverse.config import SandboxConfig
from d365sync.sandbox.dataverse.limits import Counters, Knobs
from d365sync.sandbox.dataverse.store import Store
from d365sync.sandbox.dataverse.webhooks import (
    HTTP_HEADER,
    HTTP_QUERY_STRING,
    WEBHOOK_KEY,
    Delivery,
    auth_settings,
    execution_context,
)

log = logging.getLogger(__name__)

SENDERS = 4
TIMEOUT = (5.0, 60.0)  # connect, read: Dataverse waits 60 s for the receiver's answer
MAX_BACKOFF_MS = 300_000
SIZE_LIMIT = 256 * 1024  # over it the context loses its inputs and images (use-webhooks docs)
LOG_LIMIT = 10_000  # finished deliveries kept
IDLE_SECONDS = 1.0
STATUSES = ("pending", "delivered", "failed", "cancelled")
_QUERY = re.compile(r"\?[^\s'\"()]+")

_DUE = """
SELECT d.* FROM _webhook_delivery d
WHERE d.status = 'pending' AND d.next_attempt_ms <= ?
  AND d.id = (SELECT MIN(p.id) FROM _webhook_delivery p
              WHERE p.ordering_key = d.ordering_key AND p.status = 'pending')
ORDER BY d.id LIMIT ?
"""
_ENDPOINT = """
SELECT e.url, e.authtype, e.authvalue FROM sdkmessageprocessingstep s
JOIN serviceendpoint e ON e.serviceendpointid = s.eventhandler
WHERE s.sdkmessageprocessingstepid = ? AND e.serviceendpointid = ?
"""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Outcome:
    """What one attempt came to."""

    delivery: Delivery
    started_ms: int
    duration_ms: float = 0.0
    status: int | None = None
    error: str | None = None
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return not self.cancelled and self.status is not None and 200 <= self.status < 300


@dataclass
class HttpRequest:
    """A notification ready to POST."""

    url: str
    params: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def http_request(delivery: Delivery, endpoint: sqlite3.Row, config: SandboxConfig) -> HttpRequest:
    """The POST Dataverse sends for a notification: context JSON, headers, authentication."""
    context = execution_context(delivery, config)
    headers = {
        "Content-Type": "application/json",
        "x-ms-dynamics-organization": urlsplit(config.env_url or "").hostname or config.tenant,
        "x-ms-dynamics-entity-name": delivery.entity,
        "x-ms-dynamics-request-name": delivery.message,
        "x-ms-correlation-request-id": context["CorrelationId"],
    }
    body = _dumps(context)
    if len(body) > SIZE_LIMIT:
        context.update(InputParameters=[], PreEntityImages=[], PostEntityImages=[], ParentContext=None)
        body = _dumps(context)
        headers["x-ms-dynamics-msg-size-exceeded"] = "true"
    request = HttpRequest(endpoint["url"], headers=headers, body=body)
    kind, value = endpoint["authtype"], endpoint["authvalue"] or ""
    if kind == WEBHOOK_KEY:
        request.params.append(("code", value))
    elif kind == HTTP_HEADER:
        request.headers.update(auth_settings(value))
    elif kind == HTTP_QUERY_STRING:
        request.params.extend(auth_settings(value))
    return request


def _dumps(context: dict[str, Any]) -> bytes:
    return json.dumps(context, separators=(",", ":"), ensure_ascii=False).encode()


def redact(error: str) -> str:
    """An error for the log, without query strings: a WebhookKey or HttpQueryString secret travels
    in the URL, and requests quotes the URL in its exceptions."""
    return _QUERY.sub("?<redacted>", error)[:500]


def backoff_ms(attempts: int, base_ms: float) -> int:
    """The wait after ``attempts`` failed attempts: base, twice that, four times … capped."""
    return int(min(base_ms * 2 ** max(attempts - 1, 0), MAX_BACKOFF_MS))


class Dispatcher:
    """The scheduler and senders; :meth:`start` them with the server, :meth:`stop` before the store
    closes.  :meth:`wake` after a commit that queued notifications."""

    def __init__(
        self, store: Store, config: SandboxConfig, counters: Counters, knobs: Knobs, senders: int = SENDERS
    ) -> None:
        self.store, self.config, self.counters, self.knobs = store, config, counters, knobs
        self.senders = senders
        self._jobs: queue.Queue[Delivery | None] = queue.Queue()
        self._results: queue.Queue[Outcome] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._in_flight: dict[int, Delivery] = {}  # scheduler thread only
        self._threads: list[threading.Thread] = []
        self._local = threading.local()
        self._finished_since_prune = 0

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._schedule, name="webhook-scheduler", daemon=True)]
        self._threads += [
            threading.Thread(target=self._send_loop, name=f"webhook-sender-{i}", daemon=True)
            for i in range(self.senders)
        ]
        self._wake.set()  # what a previous run left pending is due now
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop scheduling; record what has come back.  Senders still waiting on a receiver are
        left behind (daemon threads): their notifications stay pending and go again next start."""
        self._stopping.set()
        self._wake.set()
        for _ in range(self.senders):
            self._jobs.put(None)
        if self._threads:
            self._threads[0].join(timeout=5)
        with suppress(sqlite3.ProgrammingError):  # the store closed first
            self._record()

    def wake(self) -> None:
        self._wake.set()

    # -- scheduler -----------------------------------------------------------------------------
    def _schedule(self) -> None:
        while not self._stopping.is_set():
            try:
                self._wake.wait(self._idle_seconds())
                self._wake.clear()
                if self._stopping.is_set():
                    return
                self._record()
                self._dispatch()
            except sqlite3.ProgrammingError:  # the store closed under us: the server is stopping
                return
            except Exception:  # keep delivering whatever one bad row did
                log.exception("webhook scheduler")
                self._stopping.wait(0.5)

    def _idle_seconds(self) -> float:
        """Until the next retry falls due (due rows that wait for a sender or for the record's
        previous notification are woken by that sender's result)."""
        soonest = self.store.scalar(
            "SELECT MIN(next_attempt_ms) FROM _webhook_delivery"
            " WHERE status = 'pending' AND next_attempt_ms > ?",
            (now_ms(),),
        )
        if soonest is None:
            return IDLE_SECONDS
        return min(max((soonest - now_ms()) / 1000, 0.0), IDLE_SECONDS)

    def _dispatch(self) -> None:
        free = self.senders - len(self._in_flight)
        if free <= 0:
            return
        busy = {d.ordering_key for d in self._in_flight.values()}
        rows = self.store.fetch(_DUE, (now_ms(), free + len(self._in_flight)))
        for row in rows:
            if free <= 0:
                break
            delivery = Delivery.of(row)
            if delivery.id in self._in_flight or delivery.ordering_key in busy:
                continue
            self._in_flight[delivery.id] = delivery
            busy.add(delivery.ordering_key)
            self._jobs.put(delivery)
            free -= 1

    def _record(self) -> None:
        """Write back the outcomes that came in, in one transaction."""
        outcomes: list[Outcome] = []
        while True:
            try:
                outcomes.append(self._results.get_nowait())
            except queue.Empty:
                break
        if not outcomes:
            return
        with self.store.atomic():
            for outcome in outcomes:
                self._record_one(outcome)
        for outcome in outcomes:
            self._in_flight.pop(outcome.delivery.id, None)
        self._prune()

    def _record_one(self, outcome: Outcome) -> None:
        attempts = outcome.delivery.attempts + (0 if outcome.cancelled else 1)
        finished = outcome.ok or outcome.cancelled or attempts >= max(self.knobs.webhook_max_attempts, 1)
        status = (
            "delivered"
            if outcome.ok
            else "cancelled"
            if outcome.cancelled
            else "failed"
            if finished
            else "pending"
        )
        retry_at = outcome.started_ms + backoff_ms(attempts, self.knobs.webhook_backoff_ms)
        self.store.execute(
            "UPDATE _webhook_delivery SET status = ?, attempts = ?, last_attempt_ms = ?, last_status = ?,"
            " last_error = COALESCE(?, last_error), last_duration_ms = ?, completed_ms = ?,"
            " next_attempt_ms = ? WHERE id = ?",
            (
                status,
                attempts,
                outcome.started_ms,
                outcome.status,
                outcome.error,
                round(outcome.duration_ms, 1),
                now_ms() if finished else None,
                retry_at if not finished else outcome.started_ms,
                outcome.delivery.id,
            ),
        )
        if not outcome.cancelled:
            self.counters.webhook(delivered=outcome.ok, abandoned=status == "failed")
        self._finished_since_prune += int(finished)

    def _prune(self) -> None:
        if self._finished_since_prune < 1000:
            return
        self._finished_since_prune = 0
        self.store.execute(
            "DELETE FROM _webhook_delivery WHERE status != 'pending' AND id < (SELECT id FROM"
            " _webhook_delivery WHERE status != 'pending' ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (LOG_LIMIT,),
        )

    # -- senders -------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            delivery = self._jobs.get()
            if delivery is None:
                return
            self._results.put(self._attempt(delivery))
            self._wake.set()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _attempt(self, delivery: Delivery) -> Outcome:
        outcome = Outcome(delivery, now_ms())
        started = time.perf_counter()
        try:
            self._send(outcome)
        except requests.RequestException as exc:
            outcome.error = redact(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bad row must not stop the sender
            log.exception("webhook delivery %s", delivery.id)
            outcome.error = redact(f"{type(exc).__name__}: {exc}")
        outcome.duration_ms = (time.perf_counter() - started) * 1000
        return outcome

    def _send(self, outcome: Outcome) -> None:
        delivery = outcome.delivery
        rows = self.store.fetch(_ENDPOINT, (delivery.step_id, delivery.endpoint_id))
        if not rows:
            outcome.cancelled = True
            outcome.error = "the step or its service endpoint was deleted"
            return
        forced = self.knobs.take_webhook_failure()
        if forced is not None:
            outcome.status = forced or None
            outcome.error = (
                f"simulated {f'HTTP {forced}' if forced else 'connection error'} (webhook_fail_next)"
            )
            return
        request = http_request(delivery, rows[0], self.config)
        with self._session().post(
            request.url,
            params=request.params,
            headers=request.headers,
            data=request.body,
            timeout=TIMEOUT,
            allow_redirects=False,
        ) as response:
            outcome.status = response.status_code
            if not outcome.ok:
                outcome.error = redact(f"HTTP {response.status_code}: {response.text[:200]}")


# -- the admin view ------------------------------------------------------------------------------
def pending(store: Store) -> int:
    return int(store.scalar("SELECT COUNT(*) FROM _webhook_delivery WHERE status = 'pending'") or 0)


def log_view(store: Store, status: str | None = None, limit: int = 100) -> dict[str, Any]:
    """``GET /_sandbox/webhooks``: counts by status and the newest deliveries (``status``,
    ``limit`` ≤ 1000 as query parameters)."""
    counts = {s: 0 for s in STATUSES}
    for row in store.fetch("SELECT status, COUNT(*) AS n FROM _webhook_delivery GROUP BY status"):
        counts[row["status"]] = row["n"]
    where, params = ("WHERE status = ?", [status]) if status else ("", [])
    rows = store.fetch(
        f"SELECT * FROM _webhook_delivery {where} ORDER BY id DESC LIMIT ?",
        [*params, max(0, min(limit, 1000))],
    )
    return {**counts, "deliveries": [_shown(row) for row in rows]}


def _shown(row: sqlite3.Row) -> dict[str, Any]:
    def stamp(ms: int | None) -> str | None:
        return (
            None
            if ms is None
            else time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"
        )

    return {
        "id": row["id"],
        "operation_id": row["operation_id"],
        "step_id": row["step_id"],
        "endpoint_id": row["endpoint_id"],
        "message": row["message"],
        "entity": row["entity"],
        "record_id": row["record_id"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_status": row["last_status"],
        "last_error": row["last_error"],
        "last_duration_ms": row["last_duration_ms"],
        "created_on": stamp(row["created_ms"]),
        "last_attempt_on": stamp(row["last_attempt_ms"]),
        "next_attempt_on": stamp(row["next_attempt_ms"]) if row["status"] == "pending" else None,
        "completed_on": stamp(row["completed_ms"]),
    }
