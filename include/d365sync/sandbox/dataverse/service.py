"""The Web API dispatcher: one entry point for every operation, HTTP or ``$batch``.

``Dataverse.operation(ApiRequest) -> ApiResponse`` routes an operation (method + path relative to
``/api/data/<version>/`` + headers + body) to the read, write, bulk or metadata code and turns
every :class:`DataverseError` into the Dataverse JSON error shape.  The FastAPI layer calls it for
ordinary requests; the ``$batch`` handler parses the multipart body with the shared codec and calls
it once per part, wrapping changesets in a SAVEPOINT so they are atomic.  Because both paths
share this function, a write behaves identically whichever way it arrives.

Requests run in parallel (one worker thread each); only the SQLite write transaction is
serialised (:class:`~.store.Store`).  The cost knobs (``record_cost_ms`` per record written,
``request_cost_ms`` per request) are spent as a sleep outside the write lock — inside a
changeset's transaction the cost is owed and paid once the request's transaction has ended — and
every request's measured time is charged to the caller's execution-time window.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from d365sync.dynamics.multipart import (
    BatchFormatError,
    BatchItem,
    BatchPart,
    Changeset,
    build_batch_response,
    parse_batch_request,
)
from d365sync.sandbox.dataverse import errors, metadata, writes
from d365sync.sandbox.dataverse.config import SandboxConfig
from d365sync.sandbox.dataverse.errors import DataverseError
from d365sync.sandbox.dataverse.limits import Counters, Knobs, ServiceProtection
from d365sync.sandbox.dataverse.projection import points_at
from d365sync.sandbox.dataverse.protocol import (
    API_VERSIONS,
    MAX_BATCH_URL_LENGTH,
    ApiRequest,
    ApiResponse,
    empty_response,
    error_response,
    json_response,
    parse_prefer,
    parse_query,
    parse_segment,
    split_path,
)
from d365sync.sandbox.dataverse.query import Reader, parse_options
from d365sync.sandbox.dataverse.records import etag, render
from d365sync.sandbox.dataverse.schema import ENTITY_SETS, TABLES, Column, NavLink, Table
from d365sync.sandbox.dataverse.store import Store

log = logging.getLogger(__name__)

MAX_BATCH_OPERATIONS = 1000
BULK_ACTIONS = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple")


@dataclass
class Outcome:
    """A response plus what the batch handler needs: operation count and the row written."""

    response: ApiResponse
    operations: int = 1
    entity: tuple[Table, str] | None = None


class _ChangesetFailed(Exception):
    def __init__(self, part: BatchPart) -> None:
        super().__init__("changeset failed")
        self.part = part


def route_name(method: str, path: str) -> str:
    """A counter key: method plus the path with keys elided (``PATCH accounts()``)."""
    segments = split_path(path)
    shown = []
    for segment in segments[:2]:
        name, key = parse_segment(segment) if "(" in segment and segment.endswith(")") else (segment, None)
        shown.append(f"{name}()" if key is not None else name)
    return f"{method} {'/'.join(shown)}".strip()


class Dataverse:
    """Routes Web API operations; owns the reader and the write context factory."""

    def __init__(
        self,
        config: SandboxConfig,
        store: Store,
        counters: Counters,
        limiter: ServiceProtection,
        knobs: Knobs | None = None,
        listener: writes.WriteListener | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.counters = counters
        self.limiter = limiter
        self.knobs = knobs or Knobs()
        self.listener = listener
        self.reader = Reader(store, config.retention_seconds)
        self._owed = threading.local()  # cost incurred inside a write transaction, paid after it

    # -- entry points ---------------------------------------------------------------------------
    def handle(self, req: ApiRequest) -> ApiResponse:
        """One HTTP request (a ``$batch`` counts its parts itself).

        Its server time — from here to the answer, cost knobs included — is measured and charged
        to the caller's execution-time window.
        """
        start = time.perf_counter()
        try:
            with self.counters.executing():
                self._cost(self.knobs.request_cost_ms)
                try:
                    return self.execute(req).response
                finally:
                    self._cost(getattr(self._owed, "ms", 0.0))
                    self._owed.ms = 0.0
        finally:
            elapsed = (time.perf_counter() - start) * 1000
            self.counters.server_time(elapsed)
            self.limiter.spend(req.caller.user.systemuserid, elapsed)

    def _records_cost(self, records: int) -> None:
        """Spend ``record_cost_ms`` per record written: now, outside the write lock, or — inside a
        changeset's transaction — once the request has left it (so the lock is never held
        while sleeping)."""
        milliseconds = records * self.knobs.record_cost_ms
        if milliseconds <= 0:
            return
        if self.store.in_transaction():
            self._owed.ms = getattr(self._owed, "ms", 0.0) + milliseconds
        else:
            self._cost(milliseconds)

    def _cost(self, milliseconds: float) -> None:
        """Simulated server work: a sleep that holds no lock, so parallel requests overlap."""
        if milliseconds > 0:
            with self.counters.costing():
                time.sleep(milliseconds / 1000)

    def execute(self, req: ApiRequest) -> Outcome:
        """Run one operation and count it; never raises for client mistakes."""
        try:
            outcome = self._route(req)
        except DataverseError as exc:
            if exc.status == 429:
                self.counters.refused(exc.code)
            outcome = Outcome(error_response(exc))
        except sqlite3.IntegrityError as exc:
            outcome = Outcome(error_response(DataverseError(412, errors.DUPLICATE_RECORD, str(exc))))
        except Exception as exc:  # never answer a client with a bare 500 trace
            log.exception("unexpected error for %s %s", req.method, req.path)
            outcome = Outcome(
                error_response(DataverseError(500, errors.UNEXPECTED, f"Unexpected sandbox error: {exc!r}"))
            )
        if split_path(req.path)[:1] != ["$batch"]:
            self.counters.operation(
                route_name(req.method, req.path), outcome.response.status, outcome.operations
            )
        return outcome

    # -- routing -------------------------------------------------------------------------------
    def _route(self, req: ApiRequest) -> Outcome:
        segments = split_path(req.path)
        if not segments:
            return Outcome(self._only(req, "GET", metadata.service_document))
        first = segments[0]
        if first == "$metadata":
            self._require(req, "GET")
            return Outcome(
                ApiResponse(200, {"Content-Type": "application/xml", "OData-Version": "4.0"}, metadata.csdl())
            )
        if first == "$batch":
            self._require(req, "POST")
            return self._batch(req)
        if first in ("WhoAmI", "WhoAmI()"):
            self._require(req, "GET")
            return Outcome(metadata.who_am_i(req, self.config))
        if first.startswith("EntityDefinitions"):
            return Outcome(metadata.entity_definitions(req, segments))
        name, key = parse_segment(first)
        table = ENTITY_SETS.get(name)
        if table is None:
            raise errors.segment_not_found(name)
        if key is None:
            return self._collection(req, table, segments[1:])
        return self._entity(req, table, writes.locate(table, key), segments[1:])

    @staticmethod
    def _require(req: ApiRequest, *methods: str) -> None:
        if req.method not in methods:
            raise DataverseError(
                405,
                errors.METHOD_NOT_ALLOWED,
                f"The requested resource does not support http method '{req.method}'.",
            )

    def _only(self, req: ApiRequest, method: str, handler: object) -> ApiResponse:
        self._require(req, method)
        return handler(req)  # type: ignore[operator]

    def _ctx(self, req: ApiRequest) -> writes.WriteContext:
        return writes.WriteContext(
            self.store, req.caller, req.content_ids, self.listener, req.correlation_id, req.param("tag")
        )

    def _collection(self, req: ApiRequest, table: Table, rest: list[str]) -> Outcome:
        if not rest:
            self._require(req, "GET", "POST")
            if req.method == "GET":
                return Outcome(self.reader.collection(req, table))
            body = req.json_object()
            self._records_cost(1)
            with self.store.atomic():
                row = writes.create(self._ctx(req), table, body)
            return Outcome(
                self._written(req, table, row, created=True), entity=(table, row[table.primary_id])
            )
        action = rest[0].removeprefix("Microsoft.Dynamics.CRM.")
        if rest == ["$count"]:
            self._require(req, "GET")
            return Outcome(self.reader.count_only(req, table))
        if len(rest) == 1 and action in BULK_ACTIONS:
            self._require(req, "POST")
            return self._bulk(req, table, action)
        raise errors.segment_not_found(rest[0])

    def _bulk(self, req: ApiRequest, table: Table, action: str) -> Outcome:
        body = req.json_object()
        targets = body.get("Targets")
        count = len(targets) if isinstance(targets, list) else 1
        ctx = self._ctx(req)
        prepared = writes.prepare_bulk(ctx, table, action, targets)  # no lock: runs in parallel
        self._records_cost(len(prepared))
        ids = writes.apply_bulk(ctx, table, action, prepared)  # one short write transaction
        if action == "CreateMultiple":
            payload = {
                "@odata.context": f"{req.api_url}/$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse",
                "Ids": ids,
            }
            return Outcome(json_response(200, payload), operations=max(count, 1))
        return Outcome(empty_response(204), operations=max(count, 1))

    def _entity(self, req: ApiRequest, table: Table, locator: writes.Locator, rest: list[str]) -> Outcome:
        if rest:
            return self._property(req, table, locator, rest)
        self._require(req, "GET", "PATCH", "DELETE")
        ctx = self._ctx(req)
        if req.method == "GET":
            row = writes.find(self.store, locator)
            if row is None:
                raise locator.missing()
            return Outcome(self.reader.single(req, table, row))
        if req.method == "DELETE":
            self._records_cost(1)
            with self.store.atomic():
                row = writes.find(self.store, locator)
                if row is None:
                    raise locator.missing()
                writes.check_if_match(table, row, req.header("if-match"))
                writes.delete(ctx, table, row)
            return Outcome(empty_response(204))
        body = req.json_object()
        self._records_cost(1)
        with self.store.atomic():
            row, created = writes.upsert(
                ctx, locator, body, req.header("if-match"), req.header("if-none-match")
            )
        return Outcome(self._written(req, table, row, created=created), entity=(table, row[table.primary_id]))

    def _property(self, req: ApiRequest, table: Table, locator: writes.Locator, rest: list[str]) -> Outcome:
        link = table.navigation(rest[0])
        if link is not None:
            return self._navigation(req, table, locator, link, rest[1:])
        if len(rest) != 1:
            raise errors.segment_not_found(rest[-1])
        self._require(req, "GET", "DELETE", "PUT")
        if req.method == "GET":
            row, column = self._property_row(table, locator, rest[0])
            if not column.readable:  # write-only (serviceendpoint.authvalue)
                raise errors.segment_not_found(rest[0])
            value = render(table, row, [column])[column.value_name]
            entity = f"{table.entity_set}({row[table.primary_id]})"
            context = f"{req.api_url}/$metadata#{entity}/{column.value_name}"
            return Outcome(json_response(200, {"@odata.context": context, "value": value}))
        self._records_cost(1)
        with self.store.atomic():
            row, column = self._property_row(table, locator, rest[0])
            if req.method == "DELETE":
                writes.clear_column(self._ctx(req), table, row, column.name)
            else:
                body = req.json_object()
                if "value" not in body:
                    raise errors.bad_request('PUT on a property needs a body like {"value": ...}.')
                writes.update(self._ctx(req), table, row, {column.name: body["value"]})
        return Outcome(empty_response(204))

    def _property_row(self, table: Table, locator: writes.Locator, name: str) -> tuple[sqlite3.Row, Column]:
        row = writes.find(self.store, locator)
        if row is None:
            raise locator.missing()
        column = table.by_value_name(name) or table.column(name)
        if column is None:
            raise errors.segment_not_found(name)
        return row, column

    def _navigation(
        self, req: ApiRequest, table: Table, locator: writes.Locator, link: NavLink, rest: list[str]
    ) -> Outcome:
        """``accounts(id)/primarycontactid`` (the related row) and ``…/primarycontactid/$ref``
        (read, set with PUT, clear with DELETE); DELETE without ``$ref`` clears the lookup too."""
        if rest not in ([], ["$ref"]):
            raise errors.segment_not_found(rest[-1])
        self._require(req, "GET", "DELETE", *(("PUT",) if rest else ()))
        if req.method == "GET":
            row = writes.find(self.store, locator)
            if row is None:
                raise locator.missing()
            return Outcome(self._related(req, link, row, reference=bool(rest)))
        self._records_cost(1)
        with self.store.atomic():
            row = writes.find(self.store, locator)
            if row is None:
                raise locator.missing()
            if req.method == "DELETE":
                writes.disassociate(self._ctx(req), table, row, link)
            else:
                body = req.json_object()
                if "@odata.id" not in body:
                    raise errors.bad_request(
                        'A $ref request body must look like {"@odata.id": "<entity URL>"}.'
                    )
                writes.associate(self._ctx(req), table, row, link, body["@odata.id"])
        return Outcome(empty_response(204))

    def _related(self, req: ApiRequest, link: NavLink, row: sqlite3.Row, *, reference: bool) -> ApiResponse:
        """The row a lookup points at (or its ``@odata.id``); 204 when the lookup is empty."""
        target = TABLES[link.target]
        related_id = points_at(link, row)
        related = self.store.get(target, related_id) if related_id else None
        if related is None:
            return empty_response(204)
        if reference:
            url = f"{req.api_url}/{target.entity_set}({related_id})"
            return json_response(200, {"@odata.context": f"{req.api_url}/$metadata#$ref", "@odata.id": url})
        return self.reader.single(req, target, related)

    def _written(self, req: ApiRequest, table: Table, row: sqlite3.Row, *, created: bool) -> ApiResponse:
        """204 + OData-EntityId, or the row itself under ``Prefer: return=representation``."""
        entity_url = f"{req.api_url}/{table.entity_set}({row[table.primary_id]})"
        tag = etag(row["versionnumber"])
        if parse_prefer(req.header("prefer")).get("return") == "representation":
            options = parse_options(req, table)
            body = {
                "@odata.context": f"{req.api_url}/$metadata#{table.entity_set}/$entity",
                **self.reader.render_rows(req, table, [row], options, expand=False)[0],
            }
            headers = {"ETag": tag, "Preference-Applied": "return=representation"}
            if created:
                headers["Location"] = entity_url
            return json_response(201 if created else 200, body, headers)
        return empty_response(204, {"OData-EntityId": entity_url, "ETag": tag})

    # -- $batch --------------------------------------------------------------------------------
    def _batch(self, req: ApiRequest) -> Outcome:
        try:
            items = parse_batch_request(req.header("content-type") or "", req.body)
        except BatchFormatError as exc:
            raise errors.bad_request(f"The $batch request body is malformed: {exc}") from exc
        total = sum(len(i.parts) if isinstance(i, Changeset) else 1 for i in items)
        if total > MAX_BATCH_OPERATIONS:
            raise errors.bad_request(
                f"The number of requests in the batch ({total}) exceeds the maximum of "
                f"{MAX_BATCH_OPERATIONS}. Split the batch into smaller batches."
            )
        if not req.in_batch:
            self.limiter.charge(req.caller.user.systemuserid, total)
        continue_on_error = "odata.continue-on-error" in parse_prefer(req.header("prefer"))
        results: list[BatchItem] = []
        failed = False
        for item in items:
            if isinstance(item, Changeset):
                result, ok = self._changeset(req, item)
            else:
                outcome = self._part(req, item, changeset=False)
                result, ok = self._response_part(outcome, item), outcome.response.status < 400
            results.append(result)
            if not ok and not continue_on_error:
                failed = True
                break
        content_type, body = build_batch_response(results)
        headers = {"Content-Type": content_type, "OData-Version": "4.0"}
        if continue_on_error:
            headers["Preference-Applied"] = "odata.continue-on-error"
        return Outcome(ApiResponse(400 if failed else 200, headers, body), operations=total)

    def _changeset(self, req: ApiRequest, changeset: Changeset) -> tuple[BatchItem, bool]:
        added: list[str] = []
        responses: list[BatchPart] = []
        try:
            with self.store.atomic():
                for part in changeset.parts:
                    if (part.method or "").upper() == "GET":
                        error = errors.bad_request("GET requests are not allowed inside a changeset.")
                        raise _ChangesetFailed(self._response_part(Outcome(error_response(error)), part))
                    outcome = self._part(req, part, changeset=True)
                    response = self._response_part(outcome, part)
                    if outcome.response.status >= 400:
                        raise _ChangesetFailed(response)
                    if part.content_id and outcome.entity:
                        req.content_ids[part.content_id] = outcome.entity
                        added.append(part.content_id)
                    responses.append(response)
        except _ChangesetFailed as failure:
            for content_id in added:
                req.content_ids.pop(content_id, None)
            return failure.part, False
        return Changeset(responses), True

    def _part(self, req: ApiRequest, part: BatchPart, *, changeset: bool) -> Outcome:
        """Execute one batch part through the same dispatcher as a plain HTTP request."""
        try:
            if len(part.url or "") > MAX_BATCH_URL_LENGTH:
                raise errors.url_too_long(MAX_BATCH_URL_LENGTH)
            path, query, version = self._part_target(req, part.url or "")
        except DataverseError as exc:
            outcome = Outcome(error_response(exc))
            self.counters.operation("batch part", exc.status)
            return outcome
        headers = {k.lower(): v for k, v in part.headers.items()}
        sub = ApiRequest(
            method=(part.method or "GET").upper(),
            path=path,
            query=query,
            headers=headers,
            body=part.body,
            caller=req.caller,
            base_url=req.base_url,
            version=version,
            in_batch=True,
            content_ids=req.content_ids,
            correlation_id=req.correlation_id,
        )
        if sub.method == "POST" and split_path(path)[:1] == ["$batch"]:
            error = errors.bad_request("Nested $batch requests are not supported.")
            return Outcome(error_response(error))
        return self.execute(sub)

    @staticmethod
    def _part_target(req: ApiRequest, url: str) -> tuple[str, list[tuple[str, str]], str]:
        """Resolve a part URL (absolute, /api/data/v9.x/…, relative, or ``$n``) to a path."""
        if url.startswith("$"):
            ref, _, rest = url[1:].partition("/")
            entity = req.content_ids.get(ref)
            if entity is None:
                raise errors.bad_request(
                    f"Content-ID Reference: '${ref}' does not exist in the batch context."
                )
            table, record_id = entity
            path = f"{table.entity_set}({record_id})" + (f"/{rest}" if rest else "")
            return path, [], req.version
        split = urlsplit(url)
        # Top-level paths reach the dispatcher percent-decoded (ASGI does it); part URLs must match.
        path = unquote(split.path).lstrip("/")
        version = req.version
        if path.startswith("api/data/"):
            pieces = path.split("/", 3)
            version = pieces[2] if len(pieces) > 2 else ""
            if version not in API_VERSIONS:
                raise errors.segment_not_found(version or "api/data")
            path = pieces[3] if len(pieces) > 3 else ""
        return path, parse_query(split.query), version

    @staticmethod
    def _response_part(outcome: Outcome, request_part: BatchPart) -> BatchPart:
        headers = dict(outcome.response.headers)
        if "OData-EntityId" in headers:
            headers["Location"] = headers["OData-EntityId"]
        if headers.get("Content-Type", "").startswith("application/json") and outcome.response.status == 200:
            headers["Content-Type"] = "application/json; odata.metadata=minimal; odata.streaming=true"
        if outcome.response.status >= 400:
            headers["REQ_ID"] = request_part.content_id or ""
        return BatchPart(
            status=outcome.response.status,
            headers=headers,
            body=outcome.response.body,
            content_id=request_part.content_id,
        )
