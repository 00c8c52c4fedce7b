"""``DynamicsClient``: the one object the sync engine talks to for Dataverse.

It wires config → session → tokens → retrying transport, and exposes reads (paged, delta,
time-window, by many keys or ids), bulk upserts with per-record outcomes, and the few single-record writes the
engine needs. Every read sends ``$select``: Dataverse otherwise returns every column.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote

import requests

from d365sync.dynamics.auth import TokenProvider
from d365sync.dynamics.changes import ChangeFeed
from d365sync.dynamics.config import DynamicsConfig
from d365sync.dynamics.counters import Counters
from d365sync.dynamics.errors import ConcurrencyConflict, DynamicsApiError, DynamicsError
from d365sync.dynamics.limiter import AdaptiveLimiter
from d365sync.dynamics.odata import (
    IdOrKey,
    KeyValue,
    dumps_json,
    entity_path,
    format_datetime,
    in_filters,
    literal,
    query_string,
    select_clause,
)
from d365sync.dynamics.paging import NextLinkPaginator
from d365sync.dynamics.retry import RetryPolicy, Sleep
from d365sync.dynamics.transport import Transport, build_session
from d365sync.dynamics.upsert import Strategy, Upserter, UpsertOutcome

log = logging.getLogger(__name__)


class DynamicsClient:
    """A configured, thread-safe Dataverse Web API client. Close it (or use ``with``)."""

    def __init__(
        self,
        config: DynamicsConfig,
        *,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.config = config
        self.counters = Counters()
        self._session = session or build_session(config)
        self.tokens = TokenProvider(config, self._session, self.counters)
        policy = (
            RetryPolicy(config.retry, rng=rng) if sleep is None else RetryPolicy(config.retry, sleep, rng=rng)
        )
        self.limiter = AdaptiveLimiter(
            config.max_concurrency, config.adaptive_recovery, policy.sleep, policy.clock
        )
        self.transport = Transport(config, self._session, self.tokens, policy, self.limiter, self.counters)
        self._upserter = Upserter(self.transport, config.batch_size, config.max_concurrency)
        self._set_names: dict[str, str] = {}
        self._logical_names: dict[str, str] = {}

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> DynamicsClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # ----------------------------------------------------------------- reads
    def iter_rows(
        self,
        entity_set: str,
        select: Sequence[str],
        filter: str | None = None,
        orderby: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield every matching row, one page in memory at a time."""
        query = query_string({"$select": select_clause(select), "$filter": filter, "$orderby": orderby})
        prefer = f"odata.maxpagesize={self._page_size(page_size)}"
        yield from self._paginator(f"{entity_set}?{query}", prefer).rows()

    def iter_in(
        self,
        entity_set: str,
        select: Sequence[str],
        attribute: str,
        values: Iterable[KeyValue],
        page_size: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Rows whose ``attribute`` is one of ``values`` (keys, GUIDs): one
        ``Microsoft.Dynamics.CRM.In`` query per few hundred values (see ``odata.in_filters``).

        ``attribute`` is the logical name (``transactioncurrencyid``, not ``_…_value``).  A row
        whose value matches two values that differ only in accents may come twice; callers that
        key rows by id or key are unaffected.
        """
        for where in in_filters(attribute, values):
            yield from self.iter_rows(entity_set, select, filter=where, page_size=page_size)

    def iter_window(
        self,
        entity_set: str,
        select: Sequence[str],
        start: datetime,
        end: datetime,
        extra_filter: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Rows modified in the half-open window [start, end), oldest first."""
        if start >= end:
            raise ValueError("window start must be before its end")
        window = f"modifiedon ge {format_datetime(start)} and modifiedon lt {format_datetime(end)}"
        filter_ = f"{window} and ({extra_filter})" if extra_filter else window
        yield from self.iter_rows(entity_set, select, filter=filter_, orderby="modifiedon asc")

    def iter_changes(
        self,
        entity_set: str,
        select: Sequence[str],
        delta_token: str | None = None,
        id_attribute: str | None = None,
    ) -> ChangeFeed:
        """A change feed since ``delta_token`` (or a full initial read when it is None)."""
        base = f"{entity_set}?{query_string({'$select': select_clause(select)})}"
        prefer = f"odata.track-changes,odata.maxpagesize={self.config.page_size}"

        def start(token: str | None) -> NextLinkPaginator:
            url = base if token is None else f"{base}&$deltatoken={quote(token, safe='')}"
            return self._paginator(url, prefer)

        return ChangeFeed(start, delta_token, id_attribute)

    def get(self, entity_set: str, id_or_key: IdOrKey, select: Sequence[str]) -> dict[str, Any] | None:
        """One row, or None when it does not exist."""
        url = f"{entity_path(entity_set, id_or_key)}?{query_string({'$select': select_clause(select)})}"
        try:
            return self._get_json(url)
        except DynamicsApiError as exc:
            if exc.status == 404:
                return None
            raise

    def whoami(self) -> dict[str, Any]:
        """``UserId``, ``BusinessUnitId`` and ``OrganizationId`` of the application user."""
        return self._get_json("WhoAmI")

    def metadata(self, path: str) -> dict[str, Any]:
        """GET one metadata resource (``EntityDefinitions(…)/Attributes…``) as JSON, with retries."""
        if not path.startswith("EntityDefinitions"):
            raise ValueError(f"not a metadata path: {path!r}")
        return self._get_json(path)

    def entity_set_name(self, logical_name: str) -> str:
        """Resolve ``account`` → ``accounts`` through EntityDefinitions (cached)."""
        if logical_name not in self._set_names:
            url = f"EntityDefinitions(LogicalName={literal(logical_name)})?$select=EntitySetName,LogicalName"
            self._remember_names(self._get_json(url))
        return self._set_names[logical_name]

    def logical_name(self, entity_set: str) -> str:
        """Resolve ``accounts`` → ``account`` (needed for ``@odata.type``), cached."""
        if entity_set not in self._logical_names:
            query = query_string(
                {"$select": "EntitySetName,LogicalName", "$filter": f"EntitySetName eq {literal(entity_set)}"}
            )
            rows = self._get_json(f"EntityDefinitions?{query}").get("value", [])
            if not rows:
                raise DynamicsError(f"no table has the entity set name {entity_set!r}")
            self._remember_names(rows[0])
        return self._logical_names[entity_set]

    # ---------------------------------------------------------------- writes
    def upsert_many(
        self,
        entity_set: str,
        key_attributes: str | Sequence[str],
        records: Sequence[Mapping[str, Any]],
        *,
        logical_name: str | None = None,
        strategy: Strategy = "multiple",
        id_attribute: str | None = None,
    ) -> list[UpsertOutcome]:
        """Upsert by alternate key; one outcome per record, in input order (see ``upsert``).

        ``strategy="create"`` creates rows that must be new (``CreateMultiple``) and returns each
        new GUID in its outcome; ``id_attribute`` (the table's primary id) makes the ``$batch``
        path return the GUIDs of upserted rows too.
        """
        keys = [key_attributes] if isinstance(key_attributes, str) else list(key_attributes)
        if not records:
            return []
        logical = logical_name or self.logical_name(entity_set)
        return self._upserter.upsert(entity_set, logical, keys, records, strategy, id_attribute)

    def update_if_match(
        self, entity_set: str, id_or_key: IdOrKey, changes: Mapping[str, Any], etag: str
    ) -> str | None:
        """PATCH only if the row still has ``etag``; returns the new ETag.

        Raises :class:`ConcurrencyConflict` on 412, so a stale read never overwrites a newer edit.
        """
        headers = {"If-Match": etag, "Prefer": "return=representation"}
        url = f"{entity_path(entity_set, id_or_key)}?$select=modifiedon"
        try:
            response = self._write("PATCH", url, changes, headers)
        except DynamicsApiError as exc:
            if exc.status == 412:
                raise ConcurrencyConflict.from_error(exc) from None
            raise
        with response:
            return response.headers.get("ETag") or _json_or_empty(response).get("@odata.etag")

    def create(self, entity_set: str, record: Mapping[str, Any]) -> str:
        """Create one row; returns its id (from the ``OData-EntityId`` header)."""
        with self._write("POST", entity_set, record, {}) as response:
            return _entity_id(response.headers.get("OData-EntityId", ""))

    def update(self, entity_set: str, id_or_key: IdOrKey, changes: Mapping[str, Any]) -> None:
        """Change a row that must exist: ``If-Match: *`` turns a missing row into a 404 instead of
        an upsert."""
        self._write("PATCH", entity_path(entity_set, id_or_key), changes, {"If-Match": "*"}).close()

    def deactivate(
        self, entity_set: str, id_or_key: IdOrKey, statecode: int = 1, statuscode: int = 2
    ) -> None:
        """Set state/status; ``If-Match: *`` keeps a missing row from being created by upsert."""
        changes = {"statecode": statecode, "statuscode": statuscode}
        self._write("PATCH", entity_path(entity_set, id_or_key), changes, {"If-Match": "*"}).close()

    def delete(self, entity_set: str, id_or_key: IdOrKey) -> bool:
        """Delete a row; False when it was already gone (deletes are idempotent for a sync)."""
        try:
            self.transport.request("DELETE", entity_path(entity_set, id_or_key)).close()
        except DynamicsApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # --------------------------------------------------------------- helpers
    def _page_size(self, page_size: int | None) -> int:
        size = page_size or self.config.page_size
        if not 1 <= size <= 5000:
            raise ValueError("page_size must be 1..5000")
        return size

    def _paginator(self, first_url: str, prefer: str) -> NextLinkPaginator:
        return NextLinkPaginator(lambda url: self._get_json(url, {"Prefer": prefer}), first_url)

    def _get_json(self, url: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        with self.transport.request("GET", url, headers=headers) as response:
            return response.json()

    def _write(
        self, method: str, url: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> requests.Response:
        merged = {"Content-Type": "application/json", **headers}
        return self.transport.request(method, url, headers=merged, data=dumps_json(dict(body)))

    def _remember_names(self, row: Mapping[str, Any]) -> None:
        self._set_names[row["LogicalName"]] = row["EntitySetName"]
        self._logical_names[row["EntitySetName"]] = row["LogicalName"]


def _entity_id(entity_url: str) -> str:
    """The GUID at the end of an ``OData-EntityId`` URL (``…/accounts(<id>)``)."""
    if not entity_url.endswith(")") or "(" not in entity_url:
        raise DynamicsError(f"the create answer has no usable OData-EntityId header ({entity_url!r})")
    return entity_url.rsplit("(", 1)[1][:-1]


def _json_or_empty(response: requests.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}
