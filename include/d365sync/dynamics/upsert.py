"""Bulk upsert by alternate key, with per-record outcomes.

Fast path: ``UpsertMultiple`` per chunk (one request per up to 1000 rows). Dataverse answers
204 without saying which rows were created, so fast-path outcomes are ``upserted``. Any 4xx
fails the whole call, so such a chunk is re-sent as a ``$batch`` with
``Prefer: odata.continue-on-error``: one PATCH per record to its alternate-key URL with
``Prefer: return=representation`` (and a ``$select`` of the key only, to keep responses small),
which isolates the bad rows and tells ``created`` (201) from ``updated`` (200). Callers that need
created-vs-updated for every row can choose ``strategy="batch"`` to use that path throughout;
with an ``id_attribute`` that path also returns each row's GUID. Both paths are idempotent
(upsert by key), so retrying a chunk after a lost response is safe.

``strategy="create"`` is for rows that must be new: ``CreateMultiple`` per chunk, whose answer
lists the new GUIDs in input order, so a caller never has to read its own creates back. A chunk
it refuses (one row failing fails the call) is re-sent as a continue-on-error ``$batch`` of one
``POST`` per row: a row whose key already exists fails alone (duplicate key) and is never turned
into an update of somebody else's record.
Key values go percent-encoded into request URLs but only quote-doubled into ``@odata.id``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from d365sync.dynamics import multipart
from d365sync.dynamics.errors import DynamicsApiError, DynamicsError, parse_error_body
from d365sync.dynamics.odata import KeyValue, dumps_json, entity_id, entity_path, key_of, select_clause
from d365sync.dynamics.retry import Verdict, retry_after_seconds
from d365sync.dynamics.transport import Transport
from d365sync.engine.pii import mask_text

log = logging.getLogger(__name__)

Status = Literal["created", "updated", "upserted", "failed"]
Strategy = Literal["multiple", "batch", "create"]
_PART_STATUS: dict[int, Status] = {201: "created", 200: "updated", 204: "upserted"}
_RETRIABLE_PART = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class UpsertOutcome:
    """What happened to one input record (``index`` is its position in the input)."""

    index: int
    key: dict[str, KeyValue]
    status: Status
    http_status: int | None = None
    code: str = ""
    message: str = ""
    id: str | None = None  # the row's GUID, where the answer tells it

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class _Chunk:
    indices: list[int]
    keys: list[dict[str, KeyValue]]
    bodies: list[dict[str, Any]]
    outcomes: dict[int, UpsertOutcome] = field(default_factory=dict)
    id_attribute: str | None = None  # also $select the GUID on the $batch path


class Upserter:
    """Runs chunks in a small thread pool; the transport's limiter adapts the real parallelism."""

    def __init__(self, transport: Transport, batch_size: int, max_workers: int) -> None:
        self._transport = transport
        self._batch_size = batch_size
        self._max_workers = max_workers

    def upsert(
        self,
        entity_set: str,
        logical_name: str,
        key_attributes: Sequence[str],
        records: Sequence[Mapping[str, Any]],
        strategy: Strategy = "multiple",
        id_attribute: str | None = None,
    ) -> list[UpsertOutcome]:
        outcomes, chunks = self._prepare(key_attributes, records)
        for chunk in chunks:
            chunk.id_attribute = id_attribute
        run = {"multiple": self._run_multiple, "batch": self._run_batch, "create": self._run_create}[strategy]

        def guarded(chunk: _Chunk) -> dict[int, UpsertOutcome]:
            """A chunk that still fails after retries reports its rows; other chunks keep theirs."""
            try:
                return run(entity_set, logical_name, key_attributes, chunk)
            except DynamicsApiError as exc:
                log.error(
                    "Chunk of %d rows for %s failed: %s", len(chunk.indices), entity_set, mask_text(str(exc))
                )
                return _chunk_failed(chunk, exc)

        with ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="dv-upsert") as pool:
            for chunk_outcomes in pool.map(guarded, chunks):
                outcomes.update(chunk_outcomes)
        result = [outcomes[i] for i in range(len(records))]
        log.info("Upserted into %s: %s", entity_set, _summary(result))
        return result

    def _prepare(
        self, key_attributes: Sequence[str], records: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[int, UpsertOutcome], list[_Chunk]]:
        """Split valid records into chunks; records without a key fail here, before any I/O."""
        outcomes: dict[int, UpsertOutcome] = {}
        chunks: list[_Chunk] = []
        for index, record in enumerate(records):
            try:
                key = key_of(record, key_attributes)
            except ValueError as exc:
                outcomes[index] = UpsertOutcome(index, {}, "failed", message=str(exc))
                continue
            if not chunks or len(chunks[-1].indices) >= self._batch_size:
                chunks.append(_Chunk([], [], []))
            body = {k: v for k, v in record.items() if k not in key_attributes}
            chunks[-1].indices.append(index)
            chunks[-1].keys.append(key)
            chunks[-1].bodies.append(body)
        return outcomes, chunks

    def _run_multiple(
        self, entity_set: str, logical_name: str, keys: Sequence[str], chunk: _Chunk
    ) -> dict[int, UpsertOutcome]:
        targets = [
            {
                "@odata.type": f"Microsoft.Dynamics.CRM.{logical_name}",
                "@odata.id": entity_id(entity_set, key),
                **body,
            }
            for key, body in zip(chunk.keys, chunk.bodies, strict=True)
        ]
        url = f"{entity_set}/Microsoft.Dynamics.CRM.UpsertMultiple"
        try:
            self._send_json("POST", url, {"Targets": targets}, operations=len(targets))
        except DynamicsApiError as exc:
            if not 400 <= exc.status < 500:
                raise
            log.info("UpsertMultiple of %d rows failed (%s); isolating via $batch", len(targets), exc.code)
            return self._run_batch(entity_set, logical_name, keys, chunk)
        return {
            i: UpsertOutcome(i, k, "upserted", 204) for i, k in zip(chunk.indices, chunk.keys, strict=True)
        }

    def _run_create(
        self, entity_set: str, logical_name: str, keys: Sequence[str], chunk: _Chunk
    ) -> dict[int, UpsertOutcome]:
        targets = [
            {"@odata.type": f"Microsoft.Dynamics.CRM.{logical_name}", **key, **body}
            for key, body in zip(chunk.keys, chunk.bodies, strict=True)
        ]
        url = f"{entity_set}/Microsoft.Dynamics.CRM.CreateMultiple"
        try:
            answer = self._send_json("POST", url, {"Targets": targets}, operations=len(targets))
        except DynamicsApiError as exc:
            if not 400 <= exc.status < 500:
                raise
            log.info("CreateMultiple of %d rows failed (%s); isolating via $batch", len(targets), exc.code)
            return self._run_batch(entity_set, logical_name, keys, chunk, create=True)
        ids = answer.get("Ids") if isinstance(answer, dict) else None
        if not isinstance(ids, list) or len(ids) != len(targets):
            raise DynamicsError(f"CreateMultiple answered {answer!r:.200} for {len(targets)} target(s)")
        return {
            i: UpsertOutcome(i, k, "created", 200, id=str(guid).lower())
            for i, k, guid in zip(chunk.indices, chunk.keys, ids, strict=True)
        }

    def _run_batch(
        self, entity_set: str, logical_name: str, keys: Sequence[str], chunk: _Chunk, *, create: bool = False
    ) -> dict[int, UpsertOutcome]:
        """Send one PATCH (or POST) per record in a continue-on-error $batch; re-send throttled parts."""
        pending = list(range(len(chunk.indices)))
        max_attempts = self._transport.policy.settings.max_attempts
        for attempt in range(1, max_attempts + 1):
            parts = self._send_batch(entity_set, keys, chunk, pending, create)
            retry: list[tuple[int, multipart.BatchPart]] = []
            for pos, part in zip(pending, parts, strict=True):
                if part.status in _RETRIABLE_PART and attempt < max_attempts:
                    retry.append((pos, part))
                else:
                    chunk.outcomes[chunk.indices[pos]] = _part_outcome(
                        chunk.indices[pos], chunk.keys[pos], part, chunk.id_attribute, create
                    )
            if not retry:
                break
            pending = [pos for pos, _ in retry]
            self._pause_for_parts(attempt, [part for _, part in retry])
        return chunk.outcomes

    def _send_batch(
        self, entity_set: str, keys: Sequence[str], chunk: _Chunk, positions: list[int], create: bool
    ) -> list[multipart.BatchPart]:
        base_path = urlsplit(self._transport.config.api_url).path
        select = [*keys, *([chunk.id_attribute] if chunk.id_attribute else [])]
        query = f"?$select={select_clause(select)}"
        parts: list[multipart.BatchItem] = [
            multipart.BatchPart(
                method="POST",
                url=f"{base_path}/{entity_set}",
                headers={"Content-Type": "application/json"},
                body=dumps_json({**chunk.keys[pos], **chunk.bodies[pos]}),
            )
            if create
            else multipart.BatchPart(
                method="PATCH",
                url=f"{base_path}/{entity_path(entity_set, chunk.keys[pos])}{query}",
                headers={"Content-Type": "application/json", "Prefer": "return=representation"},
                body=dumps_json(chunk.bodies[pos]),
            )
            for pos in positions
        ]
        content_type, body = multipart.build_batch_request(parts)
        headers = {"Content-Type": content_type, "Prefer": "odata.continue-on-error"}
        response = self._transport.request(
            "POST", "$batch", headers=headers, data=body, operations=len(parts)
        )
        with response:
            items = multipart.parse_batch_response(response.headers.get("Content-Type", ""), response.content)
        return _flatten(items, expected=len(parts))

    def _pause_for_parts(self, attempt: int, parts: list[multipart.BatchPart]) -> None:
        """Wait before re-sending parts that came back 429/5xx inside an otherwise fine $batch."""
        policy = self._transport.policy
        hints = [retry_after_seconds(multipart.header(p.headers, "Retry-After")) for p in parts]
        throttled = any(p.status == 429 for p in parts)
        verdict = Verdict.THROTTLED if throttled else Verdict.TRANSIENT
        wait = policy.wait_for(verdict, attempt, max((h for h in hints if h is not None), default=None))
        log.warning("%d $batch part(s) throttled or failed transiently; retrying in %.1fs", len(parts), wait)
        self._transport.counters.add(retries=1, throttles=int(throttled), wait_seconds=wait)
        if throttled:
            self._transport.limiter.on_throttle(pause=wait)
        else:
            policy.sleep(wait)

    def _send_json(self, method: str, url: str, payload: Any, operations: int) -> Any:
        """The answer's JSON body (None for 204)."""
        headers = {"Content-Type": "application/json"}
        response = self._transport.request(
            method, url, headers=headers, data=dumps_json(payload), operations=operations
        )
        with response:
            return _loads(response.content)


def _flatten(items: list[multipart.BatchItem], expected: int) -> list[multipart.BatchPart]:
    parts: list[multipart.BatchPart] = []
    for item in items:
        parts.extend(item.parts if isinstance(item, multipart.Changeset) else [item])
    if len(parts) != expected:
        raise DynamicsError(f"$batch answered {len(parts)} part(s) for {expected} request(s)")
    return parts


def _chunk_failed(chunk: _Chunk, exc: DynamicsApiError) -> dict[int, UpsertOutcome]:
    return {
        index: UpsertOutcome(index, key, "failed", exc.status or None, exc.code, exc.message)
        for index, key in zip(chunk.indices, chunk.keys, strict=True)
    }


def _part_outcome(
    index: int,
    key: dict[str, KeyValue],
    part: multipart.BatchPart,
    id_attribute: str | None = None,
    create: bool = False,
) -> UpsertOutcome:
    status = part.status or 0
    if status in _PART_STATUS:
        done = "created" if create else _PART_STATUS[status]  # a POST only ever creates
        return UpsertOutcome(index, key, done, status, id=_part_id(part, id_attribute))
    code, message = parse_error_body(_loads(part.body))
    return UpsertOutcome(index, key, "failed", status, code, message or f"HTTP {status}")


def _part_id(part: multipart.BatchPart, id_attribute: str | None) -> str | None:
    """A written row's GUID: ``OData-EntityId`` (a create) or the representation's id column."""
    location = multipart.header(part.headers, "OData-EntityId") or ""
    if location.endswith(")") and "(" in location:
        return location.rsplit("(", 1)[1][:-1].lower()
    body = _loads(part.body) if id_attribute else None
    guid = body.get(id_attribute) if isinstance(body, dict) and id_attribute else None
    return str(guid).lower() if guid else None


def _summary(outcomes: list[UpsertOutcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return counts


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None
