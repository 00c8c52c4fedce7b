"""Reading tables: query options, keyset paging, ``$count`` and change tracking.

What each returned row shows (``$select``, ``$expand``, annotations) is :mod:`.projection`'s.

Paging is keyset-based on (``$orderby`` columns…, primary id): the opaque ``$skiptoken`` cookie
carries the last row's sort values, so page N costs the same as page 1 (paging 100k rows
stays linear).  The cookie mimics Dataverse's ``<cookie pagenumber=… pagingcookie=…
istracking=…/>`` form; clients must treat it as opaque, as with the real service.

Change tracking: a delta token is ``<version>!<MM/dd/yyyy HH:mm:ss>`` (reference §3).  A delta
read returns rows whose ``versionnumber`` lies in (token, snapshot], ordered by version, then
tombstones of rows that no longer exist, and finally a new ``@odata.deltaLink``.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.filters import FilterCompiler, unknown_property
from d365sync.sandbox.dataverse.projection import (
    Expansion,
    Projector,
    context_items,
    parse_expand,
    parse_select,
)
from d365sync.sandbox.dataverse.protocol import (
    ApiRequest,
    ApiResponse,
    json_response,
    parse_prefer,
    split_top_level,
)
from d365sync.sandbox.dataverse.records import NO_ANNOTATIONS, Annotations
from d365sync.sandbox.dataverse.schema import Column, Table
from d365sync.sandbox.dataverse.store import Store

MAX_PAGE = 5000
MAX_ORDERBY_TERMS = 800  # Microsoft.OData QueryParserSettings.DefaultOrderByLimit
COUNT_CAP = 5000
TOKEN_TIME = "%m/%d/%Y %H:%M:%S"
_SUPPORTED = frozenset(
    {"$select", "$filter", "$orderby", "$top", "$count", "$expand", "$skiptoken", "$deltatoken"}
)
_TRACKING_FORBIDDEN = ("$filter", "$orderby", "$expand", "$top")


@dataclass
class QueryOptions:
    """Parsed and validated query options for one table."""

    select: list[Column] | None = None
    expand: list[Expansion] = field(default_factory=list)
    where: str = ""
    params: list[Any] = field(default_factory=list)
    orderby: list[tuple[Column, bool]] = field(default_factory=list)
    top: int | None = None
    count: bool = False
    page_size: int = MAX_PAGE
    annotations: Annotations = NO_ANNOTATIONS
    tracking: bool = False

    def columns(self, table: Table) -> list[Column]:
        return self.select if self.select is not None else list(table.readable)


# -- option parsing ----------------------------------------------------------------------------
def check_options(req: ApiRequest) -> None:
    """Reject the query options Dataverse rejects ($skip, $search, $format, unknown $…)."""
    for name, _ in req.query:
        if not name.startswith("$") or name in _SUPPORTED:
            continue
        if name in ("$skip", "$search", "$format", "$apply"):
            raise errors.bad_request(f"The query parameter {name} is not supported")
        raise errors.bad_request(f"The query parameter '{name}' is not supported.")


def parse_orderby(table: Table, text: str | None) -> list[tuple[Column, bool]]:
    if not text:
        return []
    order: list[tuple[Column, bool]] = []
    items = split_top_level(text)
    if len(items) > MAX_ORDERBY_TERMS:
        raise errors.bad_request(
            f"The $orderby expression has {len(items)} terms; the limit is {MAX_ORDERBY_TERMS}."
        )
    for item in items:
        parts = item.split()
        column = table.by_value_name(parts[0])
        if column is None:
            raise unknown_property(table, parts[0])
        direction = parts[1].lower() if len(parts) > 1 else "asc"
        if direction not in ("asc", "desc") or len(parts) > 2:
            raise errors.bad_request(f"Syntax error in $orderby near '{item}'.")
        if all(column.name != seen.name for seen, _ in order):  # a repeated column changes nothing
            order.append((column, direction == "desc"))
    return order


def parse_options(req: ApiRequest, table: Table) -> QueryOptions:
    check_options(req)
    prefs = parse_prefer(req.header("prefer"))
    options = QueryOptions(
        select=parse_select(table, req.param("$select")),
        expand=parse_expand(table, req.param("$expand")),
        orderby=parse_orderby(table, req.param("$orderby")),
        count=(req.param("$count") or "").lower() == "true",
        annotations=Annotations.parse(prefs.get("odata.include-annotations")),
        tracking="odata.track-changes" in prefs,
    )
    text = req.param("$filter")
    if text is not None:
        options.where, options.params = FilterCompiler(table).compile(text)
    options.page_size = _page_size(prefs)
    top = req.param("$top")
    if top is not None:
        if not top.isdigit():
            raise errors.bad_request(f"Invalid value '{top}' for $top query option found.")
        if "odata.maxpagesize" not in prefs:
            options.top = min(int(top), MAX_PAGE)
    return options


def _page_size(prefs: dict[str, str]) -> int:
    raw = prefs.get("odata.maxpagesize")
    if raw is None:
        return MAX_PAGE
    if not raw.isdigit() or int(raw) < 1:
        raise errors.bad_request(f"Invalid odata.maxpagesize preference value '{raw}'.")
    return min(int(raw), MAX_PAGE)


# -- skip tokens -------------------------------------------------------------------------------
_COOKIE = re.compile(r'pagenumber="(\d+)"\s+pagingcookie="([^"]*)"\s+istracking="(True|False)"')
_INNER = re.compile(r'sbx="([A-Za-z0-9_\-=]+)"')


def encode_skiptoken(page: int, state: dict[str, Any], tracking: bool) -> str:
    inner = base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode()
    paging = quote(quote(f'<cookie page="{page - 1}" sbx="{inner}" />', safe=""), safe="")
    return f'<cookie pagenumber="{page}" pagingcookie="{paging}" istracking="{tracking}" />'


def decode_skiptoken(token: str) -> tuple[int, dict[str, Any], bool]:
    match = _COOKIE.search(token)
    inner = _INNER.search(unquote(unquote(match.group(2)))) if match else None
    if match is None or inner is None:
        raise errors.bad_request("The $skiptoken value is not valid. Use the @odata.nextLink unchanged.")
    try:
        state = json.loads(base64.urlsafe_b64decode(inner.group(1)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.bad_request("The $skiptoken value is not valid.") from exc
    if not isinstance(state, dict):
        raise errors.bad_request("The $skiptoken value is not valid.")
    return int(match.group(1)), state, match.group(3) == "True"


def encode_deltatoken(version: int) -> str:
    return f"{version}!{datetime.now(UTC).strftime(TOKEN_TIME)}"


def decode_deltatoken(token: str) -> tuple[int, datetime]:
    version, _, stamp = token.partition("!")
    try:
        return int(version), datetime.strptime(stamp, TOKEN_TIME).replace(tzinfo=UTC)
    except ValueError as exc:
        raise errors.bad_request(f"The delta token '{token}' is not valid.") from exc


def _link(req: ApiRequest, table: Table, extra: dict[str, str], drop: tuple[str, ...]) -> str:
    safe = "$,()'/:@"
    parts = [f"{k}={quote(v, safe=safe)}" for k, v in req.query if k not in drop and k not in extra]
    parts += [f"{k}={quote(v, safe='')}" for k, v in extra.items()]
    return f"{req.api_url}/{table.entity_set}?{'&'.join(parts)}"


def _context(req: ApiRequest, table: Table, options: QueryOptions, suffix: str = "") -> str:
    items = context_items(options.select, options.expand)
    shape = f"({','.join(items)})" if items else ""
    return f"{req.api_url}/$metadata#{table.entity_set}{shape}{suffix}"


# -- collection reads ------------------------------------------------------------------------
class Reader:
    """Executes reads for one request against the store."""

    def __init__(self, store: Store, retention_seconds: float) -> None:
        self.store = store
        self.retention_seconds = retention_seconds

    def collection(self, req: ApiRequest, table: Table) -> ApiResponse:
        options = parse_options(req, table)
        skiptoken = req.param("$skiptoken")
        page, state, tracking = decode_skiptoken(skiptoken) if skiptoken else (1, {}, options.tracking)
        if req.param("$deltatoken") is not None:
            return self.delta(req, table, options, state, page)
        if tracking:
            self._check_tracking(req)
        if tracking and "snap" not in state:
            state["snap"] = self.store.current_version
        orderby = options.orderby if not tracking else []
        page_size = options.top if options.top is not None else options.page_size  # $top=0: no rows
        rows, more = self._page(table, options, orderby, state, page_size=page_size)
        body: dict[str, Any] = {"@odata.context": _context(req, table, options)}
        if options.count:
            total = self._count(table, options)
            body["@odata.count"] = min(total, COUNT_CAP)
            body["@Microsoft.Dynamics.CRM.totalrecordcount"] = min(total, COUNT_CAP)
            body["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] = total > COUNT_CAP
        body["value"] = self.render_rows(req, table, rows, options)
        headers = self._preference_headers(req, options, tracking)
        if more and options.top is None:
            last = rows[-1]
            next_state = {
                **state,
                "k": [last[c.name] for c, _ in orderby],
                "id": last[table.primary_id],
            }
            token = encode_skiptoken(page + 1, next_state, tracking)
            body["@odata.nextLink"] = _link(req, table, {"$skiptoken": token}, ("$skiptoken",))
        elif tracking:
            token = encode_deltatoken(int(state["snap"]))
            body["@odata.deltaLink"] = _link(
                req, table, {"$deltatoken": token}, ("$skiptoken", "$count", "$deltatoken")
            )
        return json_response(200, body, headers)

    def _check_tracking(self, req: ApiRequest) -> None:
        for name in _TRACKING_FORBIDDEN:
            if req.param(name) is not None:
                raise errors.bad_request(
                    f'The "{name}" query parameter isn\'t supported when Change Tracking is enabled.'
                )

    @staticmethod
    def _preference_headers(req: ApiRequest, options: QueryOptions, tracking: bool) -> dict[str, str]:
        prefs = parse_prefer(req.header("prefer"))
        applied = []
        if "odata.maxpagesize" in prefs:
            applied.append(f"odata.maxpagesize={options.page_size}")
        if tracking and "odata.track-changes" in prefs:
            applied.append("odata.track-changes")
        if "odata.include-annotations" in prefs:
            applied.append(f'odata.include-annotations="{prefs["odata.include-annotations"]}"')
        return {"Preference-Applied": ",".join(applied)} if applied else {}

    def _page(
        self,
        table: Table,
        options: QueryOptions,
        orderby: list[tuple[Column, bool]],
        state: dict[str, Any],
        page_size: int,
    ) -> tuple[list[sqlite3.Row], bool]:
        """One keyset page; ``more`` says whether another page exists."""
        keys = [*orderby, (table.column(table.primary_id), False)]
        clauses = [f"({options.where})"] if options.where else []
        params = list(options.params)
        if "id" in state:
            keyset, keyset_params = _keyset(keys, [*state.get("k", []), state["id"]])
            clauses.append(keyset)
            params += keyset_params
        if "snap" in state:
            clauses.append("t.versionnumber <= ?")
            params.append(state["snap"])
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = ", ".join(f't."{c.name}" {"DESC" if d else "ASC"}' for c, d in keys if c is not None)
        sql = f'SELECT t.* FROM "{table.logical_name}" t {where} ORDER BY {order} LIMIT ?'
        rows = self.store.fetch(sql, [*params, page_size + 1])
        return rows[:page_size], len(rows) > page_size

    def _count(self, table: Table, options: QueryOptions) -> int:
        where = f"WHERE {options.where}" if options.where else ""
        sql = f'SELECT COUNT(*) FROM (SELECT 1 FROM "{table.logical_name}" t {where} LIMIT ?)'
        return int(self.store.scalar(sql, [*options.params, COUNT_CAP + 1]))

    def count_only(self, req: ApiRequest, table: Table) -> ApiResponse:
        """``/accounts/$count``: text/plain, capped like ``$count``."""
        options = parse_options(req, table)
        total = min(self._count(table, options), COUNT_CAP)
        return ApiResponse(200, {"Content-Type": "text/plain", "OData-Version": "4.0"}, str(total).encode())

    def render_rows(
        self,
        req: ApiRequest,
        table: Table,
        rows: list[sqlite3.Row],
        options: QueryOptions,
        *,
        expand: bool = True,
    ) -> list[dict[str, Any]]:
        """Rows as the response shows them: selected columns, annotations, expansions."""
        projector = Projector(self.store, options.annotations, req.api_url)
        return projector.rows(table, rows, options.columns(table), options.expand if expand else ())

    # -- single rows --------------------------------------------------------------------------
    def single(self, req: ApiRequest, table: Table, row: sqlite3.Row) -> ApiResponse:
        options = parse_options(req, table)
        current = f'W/"{row["versionnumber"]}"'
        if req.header("if-none-match") == current and not options.expand and not options.annotations:
            return ApiResponse(304, {"ETag": current, "OData-Version": "4.0"}, b"")
        body = {
            "@odata.context": _context(req, table, options, "/$entity"),
            **self.render_rows(req, table, [row], options)[0],
        }
        return json_response(200, body, {"ETag": current, **self._preference_headers(req, options, False)})

    # -- change tracking ----------------------------------------------------------------------
    def delta(
        self, req: ApiRequest, table: Table, options: QueryOptions, state: dict[str, Any], page: int
    ) -> ApiResponse:
        self._check_tracking(req)
        version, stamp = decode_deltatoken(req.param("$deltatoken") or "")
        age = (datetime.now(UTC) - stamp).total_seconds()
        if age > self.retention_seconds:
            raise errors.bad_request(
                "Version stamp associated with the client has expired. Please perform a full sync.",
                errors.CHANGE_TRACKING_EXPIRED,
            )
        snap = int(state.get("snap", self.store.current_version))
        phase, after = int(state.get("phase", 0)), int(state.get("after", version))
        size = options.page_size
        values: list[dict[str, Any]] = []
        more = False
        if phase == 0:
            rows = self.store.fetch(
                f'SELECT * FROM "{table.logical_name}" WHERE versionnumber > ? AND versionnumber <= ? '
                "ORDER BY versionnumber LIMIT ?",
                (after, snap, size + 1),
            )
            more = len(rows) > size
            rows = rows[:size]
            values = self.render_rows(req, table, rows, options)
            if more:
                after = rows[-1]["versionnumber"]
            else:
                phase, after = 1, version
        if phase == 1 and not more:
            deleted = self.store.fetch(
                f"SELECT id, MAX(version) AS v FROM _tombstone WHERE entity = ? AND version > ? "
                f'AND version <= ? AND id NOT IN (SELECT "{table.primary_id}" FROM "{table.logical_name}") '
                "GROUP BY id HAVING MAX(version) > ? ORDER BY v LIMIT ?",
                (table.logical_name, version, snap, after, size - len(values) + 1),
            )
            room = size - len(values)
            more = len(deleted) > room
            deleted = deleted[:room]
            context = f"{req.api_url}/$metadata#{table.entity_set}/$deletedEntity"
            values += [{"@odata.context": context, "id": d["id"], "reason": "deleted"} for d in deleted]
            if more:
                after = deleted[-1]["v"] if deleted else after
        body: dict[str, Any] = {"@odata.context": _context(req, table, options, "/$delta"), "value": values}
        if more:
            token = encode_skiptoken(page + 1, {"snap": snap, "phase": phase, "after": after}, True)
            body["@odata.nextLink"] = _link(req, table, {"$skiptoken": token}, ("$skiptoken",))
        else:
            body["@odata.deltaLink"] = _link(
                req, table, {"$deltatoken": encode_deltatoken(snap)}, ("$skiptoken", "$deltatoken", "$count")
            )
        return json_response(200, body, self._preference_headers(req, options, True))


def _keyset(keys: list[tuple[Column | None, bool]], last: list[Any]) -> tuple[str, list[Any]]:
    """Rows strictly after ``last`` in the ORDER BY (SQLite sorts NULLs first ascending)."""
    alternatives: list[str] = []
    params: list[Any] = []
    for index, (column, desc) in enumerate(keys):
        if column is None:
            continue
        conds: list[str] = []
        cond_params: list[Any] = []
        for prev, prev_value in zip(keys[:index], last[:index], strict=True):
            if prev[0] is not None:
                conds.append(f't."{prev[0].name}" IS ?')
                cond_params.append(prev_value)
        value = last[index]
        name = f't."{column.name}"'
        if value is None:
            if desc:
                continue
            conds.append(f"{name} IS NOT NULL")
        elif desc:
            conds.append(f"({name} < ? OR {name} IS NULL)")
            cond_params.append(value)
        else:
            conds.append(f"{name} > ?")
            cond_params.append(value)
        alternatives.append("(" + " AND ".join(conds) + ")")
        params += cond_params
    return ("(" + " OR ".join(alternatives) + ")") if alternatives else "1=0", params
