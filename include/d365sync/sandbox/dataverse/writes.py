"""Creating, updating, upserting and deleting rows — each write implemented exactly once.

Single HTTP writes, ``$batch`` parts and the ``*Multiple`` bulk actions all end up here, so
validation, lookup binding, alternate-key uniqueness and version stamping behave identically
whichever way a client sends the data.  Every write takes a fresh global ``versionnumber``.

Lookups are written through navigation properties, as in Dataverse: ``nav@odata.bind`` takes
``/contacts(<id>)``, ``contacts(<id>)``, an absolute URL, an alternate key
(``/accounts(accountnumber='A1')``) or, in a ``$batch`` changeset, ``$<Content-ID>``; ``null``
(``nav@odata.bind`` or ``nav`` itself) clears the lookup, and ``nav: {…}`` on create inserts the
related row first (deep insert).  ``…/nav/$ref`` associates (PUT) and disassociates (DELETE).  A
reference to a missing row is the 404 ``<table> With Id = <id> Does Not Exist`` (0x80040217).

A body is handled in two steps: :func:`parse_body` validates and converts it without the database,
:func:`resolve` then looks bind targets up and runs deep inserts inside the write transaction.
Bulk actions use the split so that parallel requests overlap: :func:`prepare_bulk` parses every
target with no lock held, :func:`apply_bulk` writes them in one short write transaction.

Every row written is reported to the context's :class:`WriteListener` (``Create``, ``Update`` or
``Delete``) inside the write transaction, so what it records commits or rolls back with the row:
that is how webhook notifications are queued (:mod:`.webhooks`).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.identity import Caller
from d365sync.sandbox.dataverse.protocol import parse_key_values, parse_segment, split_path
from d365sync.sandbox.dataverse.records import coerce, now_iso, parse_guid
from d365sync.sandbox.dataverse.schema import ENTITY_SETS, TABLES, Column, NavLink, Table, type_column
from d365sync.sandbox.dataverse.store import Store


@dataclass
class Locator:
    """How a URL or bind names a row: by primary id or by alternate-key values."""

    table: Table
    record_id: str | None = None
    key_values: dict[str, Any] | None = None

    def missing(self) -> errors.DataverseError:
        if self.record_id:
            return errors.record_missing(self.table.logical_name, self.record_id)
        return errors.not_found(
            f"A record with the specified key values does not exist in {self.table.logical_name} entity"
        )


class WriteListener(Protocol):
    """Told of every row written, inside its write transaction."""

    def written(
        self,
        ctx: WriteContext,
        message: str,
        table: Table,
        record_id: str,
        values: Mapping[str, Any] | None,
    ) -> None:
        """``message`` is ``Create``, ``Update`` or ``Delete``; ``values`` the columns the write
        set (None for a delete).  Raising a DataverseError refuses the write."""


@dataclass
class WriteContext:
    """Who writes, the ``$n`` Content-ID references visible to this operation, and who hears of
    the rows written (the request's correlation id and ``?tag=`` travel with them)."""

    store: Store
    caller: Caller
    content_ids: dict[str, tuple[Table, str]] = field(default_factory=dict)
    listener: WriteListener | None = None
    correlation_id: str = ""
    tag: str | None = None

    def written(self, message: str, table: Table, record_id: str, values: Mapping[str, Any] | None) -> None:
        if self.listener is not None:
            self.listener.written(self, message, table, record_id, values)


def locate(table: Table, key: str) -> Locator:
    """Parse the text inside ``accounts(...)``."""
    text = key.strip()
    if "=" not in text:
        record_id = parse_guid(text)
        if record_id is None:
            raise errors.bad_request(
                f"Bad Request - Error in query syntax. The key value '{text}' is not a valid GUID."
            )
        return Locator(table, record_id=record_id)
    values = parse_key_values(text)
    if set(values) == {table.primary_id}:
        record_id = parse_guid(str(values[table.primary_id]))
        if record_id:
            return Locator(table, record_id=record_id)
    if not any(set(k.attributes) == set(values) for k in table.keys):
        raise errors.bad_request(
            f"The key in the request URI is not valid for resource '{table.type_name}'. Ensure that "
            "the names and number of key properties match the declared or alternate key properties "
            "for the resource."
        )
    coerced = {name: coerce(table, table.column(name), value) for name, value in values.items()}  # type: ignore[arg-type]
    return Locator(table, key_values=coerced)


def find(store: Store, locator: Locator) -> sqlite3.Row | None:
    if locator.record_id:
        return store.get(locator.table, locator.record_id)
    return store.find(locator.table, locator.key_values or {})


# -- lookup binds ----------------------------------------------------------------------------
def reference_path(text: str) -> str:
    """An entity URL as written in a bind or ``@odata.id`` (absolute, ``/api/data/v9.x/…``,
    ``/contacts(…)`` or ``contacts(…)``), reduced to the part after the service root."""
    path = urlsplit(text).path if "://" in text else text
    path = path.strip().lstrip("/")
    if path.startswith("api/data/"):
        path = path.split("/", 3)[3] if path.count("/") >= 3 else ""
    return path


def _bad_reference(nav: str, value: Any, reason: str) -> errors.DataverseError:
    return errors.bad_request(
        f"The value '{value}' of the '{nav}@odata.bind' annotation is not a valid entity reference: "
        f"{reason} Use the form '/<entityset>(<id>)', '/<entityset>(<key>=<value>)' or, inside a "
        "$batch changeset, '$<Content-ID>'."
    )


def parse_reference(value: Any, nav: str, ctx: WriteContext, expected: Table) -> str | Locator:
    """Check an entity reference for the navigation property ``nav`` (an ``@odata.bind`` value, a
    ``$ref`` body's ``@odata.id``, a ``$n`` Content-ID) without the database: the id of a ``$n``
    row, else the locator of the row still to look up.  Another table than ``expected`` is a 400."""
    if not isinstance(value, str) or not value.strip():
        raise _bad_reference(nav, value, "it must be a non-empty URL string.")
    text = value.strip()
    if text.startswith("$"):
        ref = ctx.content_ids.get(text[1:])
        if ref is None:
            raise errors.bad_request(f"Content-ID Reference: '{text}' does not exist in the batch context.")
        _check_target(value, nav, ref[0], expected)
        return str(ref[1])
    path = reference_path(text)
    if len(split_path(path)) > 1:
        raise _bad_reference(nav, value, "it must name a record, not one of its properties.")
    try:
        name, key = parse_segment(path) if path else ("", None)
    except errors.DataverseError:
        raise _bad_reference(nav, value, "its key is not well formed.") from None
    target = ENTITY_SETS.get(name)
    if target is None:
        raise _bad_reference(nav, value, f"Resource not found for the segment '{name}'.")
    if key is None:
        raise _bad_reference(nav, value, "it names an entity set, not a record.")
    _check_target(value, nav, target, expected)
    return locate(target, key)


def _existing_id(ctx: WriteContext, locator: Locator) -> str:
    """The id of the row ``locator`` names; Dataverse's 404 when there is none."""
    row = find(ctx.store, locator)
    if row is None:
        raise locator.missing()
    return str(row[locator.table.primary_id])


def resolve_reference(value: Any, nav: str, ctx: WriteContext, expected: Table) -> str:
    """Resolve an entity reference for the navigation property ``nav`` to the id of an existing
    row of ``expected``: another table is a 400, a missing row Dataverse's 404."""
    reference = parse_reference(value, nav, ctx, expected)
    return _existing_id(ctx, reference) if isinstance(reference, Locator) else reference


def _check_target(value: Any, nav: str, target: Table, expected: Table) -> None:
    if target.logical_name != expected.logical_name:
        raise errors.bad_request(
            f"The @odata.bind value '{value}' for '{nav}' references entity set '{target.entity_set}', "
            f"but '{nav}' expects '{expected.entity_set}'."
        )


@dataclass
class PendingLookup:
    """A lookup whose value needs the database: the row a bind names (``locator``) or the related
    row a deep insert creates (``body``)."""

    link: NavLink
    locator: Locator | None = None
    body: dict[str, Any] | None = None


def _bind(
    table: Table, nav: str, value: Any, ctx: WriteContext, out: dict[str, Any], pending: list[PendingLookup]
) -> None:
    """``<nav>@odata.bind``: point the lookup at a row, or clear it with ``null``."""
    link = table.navigation(nav)
    if link is None:
        raise errors.bad_request(
            f"An undeclared property '{nav}' which only has property annotations in the payload "
            "but no property value was found in the payload. In OData, only declared navigation "
            "properties and declared named streams can be represented as properties without values."
        )
    if link.column.readonly:
        return
    if value is None:
        _set_lookup(link, None, out)
        return
    reference = parse_reference(value, nav, ctx, TABLES[link.target])
    if isinstance(reference, Locator):
        pending.append(PendingLookup(link, locator=reference))
    else:
        _set_lookup(link, reference, out)


def _set_lookup(link: NavLink, target_id: str | None, out: dict[str, Any]) -> None:
    out[link.column.name] = target_id
    if link.column.is_polymorphic:
        out[type_column(link.column)] = link.target if target_id else None


def _navigation_value(
    link: NavLink, value: Any, out: dict[str, Any], pending: list[PendingLookup], *, creating: bool
) -> None:
    """A navigation property given a value: ``null`` clears it, an object is a deep insert."""
    if value is None:
        if not link.column.readonly:
            _set_lookup(link, None, out)
        return
    if not isinstance(value, dict):
        raise errors.bad_request(
            "A 'PrimitiveValue' node with non-null value was found when trying to read the value of a "
            "navigation property; however, a 'StartArray' node, a 'StartObject' node, or a "
            "'PrimitiveValue' node with null value was expected."
        )
    if not creating:
        raise errors.bad_request(
            f"Deep insert of '{link.name}' is only possible when creating a record; bind an existing "
            f"record with '{link.name}@odata.bind' instead."
        )
    pending.append(PendingLookup(link, body=value))


# -- body → values -------------------------------------------------------------------------------
@dataclass
class ParsedBody:
    """A request body validated and converted without touching the database (so bulk actions can
    do it outside the write lock); :func:`resolve` adds the lookups that need the database."""

    values: dict[str, Any]
    pending: list[PendingLookup] = field(default_factory=list)


def parse_body(
    table: Table, body: dict[str, Any], ctx: WriteContext, *, creating: bool = False
) -> ParsedBody:
    """Validate a JSON body: the SQLite values it sets (read-only columns dropped), and the binds
    and deep inserts still to be looked up or written.

    Lookups are set through their navigation properties (``nav@odata.bind``, ``nav: null``, or
    ``nav: {…}`` to create the related row first on create); ``_x_value`` is read-only.
    """
    out: dict[str, Any] = {}
    pending: list[PendingLookup] = []
    for key, value in body.items():
        if key.endswith("@odata.bind"):
            _bind(table, key.removesuffix("@odata.bind"), value, ctx, out, pending)
        elif key.startswith("@"):
            _check_annotation(table, key, value)
        elif "@" in key:
            continue
        elif (link := table.navigation(key)) is not None:
            _navigation_value(link, value, out, pending, creating=creating)
        else:
            column = _writable_column(table, key)
            if not column.readonly:
                out[column.name] = coerce(table, column, value)
    return ParsedBody(out, pending)


def resolve(ctx: WriteContext, parsed: ParsedBody) -> dict[str, Any]:
    """The values of a parsed body with its binds looked up and its deep inserts written (inside
    the write transaction, so a bound row cannot vanish before the write commits)."""
    out = dict(parsed.values)
    for item in parsed.pending:
        target = TABLES[item.link.target]
        if item.locator is not None:
            _set_lookup(item.link, _existing_id(ctx, item.locator), out)
        else:
            related = create(ctx, target, item.body or {})
            _set_lookup(item.link, related[target.primary_id], out)
    return out


def body_values(
    table: Table, body: dict[str, Any], ctx: WriteContext, *, creating: bool = False
) -> dict[str, Any]:
    """Validate a JSON body and return the SQLite values it sets (read-only columns dropped)."""
    return resolve(ctx, parse_body(table, body, ctx, creating=creating))


def _writable_column(table: Table, key: str) -> Column:
    column = table.column(key)
    if column is not None and not column.is_lookup:
        return column
    if (shadow := table.by_value_name(key)) is not None and shadow.is_lookup:
        raise errors.bad_request(
            "CRM do not support direct update of Entity Reference properties, Use Navigation "
            "properties instead.",
            errors.PAYLOAD_ERROR,
        )
    raise errors.bad_request(
        f"The property '{key}' does not exist on type '{table.type_name}'. Make sure to only "
        "use property names that are defined by the type or mark the type as open type."
    )


def _check_annotation(table: Table, key: str, value: Any) -> None:
    if key == "@odata.type" and str(value).lstrip("#") != table.type_name:
        raise errors.bad_request(
            f"The entity type '{value}' is not compatible with the base type '{table.type_name}' "
            "of the entity set."
        )


def _finish(table: Table, merged: dict[str, Any], changed: dict[str, Any]) -> None:
    """Derived columns, required columns and state/status consistency on the merged row."""
    for column in table.columns:
        if column.required and merged.get(column.name) in (None, ""):
            raise errors.bad_request(
                f"A validation error occurred. The value for the required attribute '{column.name}' "
                f"of the '{table.logical_name}' entity is missing.",
                errors.REQUIRED_MISSING,
            )
    state, status = merged.get("statecode"), merged.get("statuscode")
    if "statecode" in changed and "statuscode" not in changed:
        changed["statuscode"] = table.default_status[state]
    elif "statuscode" in changed and "statecode" not in changed:
        owner = next((s for s, codes in table.state_status.items() if status in codes), state)
        if owner != state:
            changed["statecode"] = owner
    elif status not in table.state_status.get(state, ()):
        raise errors.bad_request(
            f"A validation error occurred. {status} is not a valid status code for state code "
            f"{table.logical_name}State.{state} on {table.logical_name}.",
            errors.OPTION_OUT_OF_RANGE,
        )
    if table.logical_name == "contact" and ({"firstname", "lastname"} & set(changed)):
        full = " ".join(p for p in (merged.get("firstname"), merged.get("lastname")) if p)
        changed["fullname"] = full or None


def _check_keys(ctx: WriteContext, table: Table, merged: dict[str, Any], record_id: str) -> None:
    for key in table.keys:
        values = {a: merged.get(a) for a in key.attributes}
        if any(v is None for v in values.values()):
            continue
        clash = ctx.store.find(table, values)
        if clash is not None and clash[table.primary_id] != record_id:
            shown = ", ".join(str(v) for v in values.values())
            raise errors.DataverseError(
                412,
                errors.DUPLICATE_RECORD_ENTITY_KEY,
                f"A record that has the attribute values {shown} already exists. The entity key "
                f"{key.name} requires that this set of attributes contains unique values. Select "
                "unique values and try again.",
            )


# -- operations ------------------------------------------------------------------------------
def create(
    ctx: WriteContext, table: Table, body: dict[str, Any], preset: dict[str, Any] | None = None
) -> sqlite3.Row:
    """Insert a row; ``preset`` carries id/alternate-key values taken from the URL.  The owner is
    the caller unless the body assigns one (``ownerid@odata.bind``)."""
    values = body_values(table, body, ctx, creating=True)
    return _reload(ctx, table, _insert(ctx, table, values, preset))


def _insert(
    ctx: WriteContext, table: Table, values: dict[str, Any], preset: dict[str, Any] | None = None
) -> str:
    """Insert a row from resolved ``values``; returns its id."""
    values.update(preset or {})
    record_id = values.pop(table.primary_id, None) or str(uuid.uuid4())
    if ctx.store.get(table, record_id) is not None:
        raise errors.DataverseError(
            412, errors.DUPLICATE_RECORD, "A record with matching key values already exists."
        )
    values.setdefault("statecode", 0)
    values.setdefault("statuscode", table.default_status.get(values["statecode"]))
    values.setdefault("ownerid", ctx.caller.user.systemuserid)
    merged = dict(values)
    _finish(table, merged, values)
    merged.update(values)
    _check_keys(ctx, table, merged, record_id)
    now, user = now_iso(), ctx.caller.user.systemuserid
    row = {
        **merged,
        table.primary_id: record_id,
        "createdon": now,
        "modifiedon": now,
        "createdby": user,
        "modifiedby": user,
        "versionnumber": ctx.store.next_version(),
    }
    ctx.store.insert(table, row)
    ctx.written("Create", table, str(record_id), row)
    return str(record_id)


def update(
    ctx: WriteContext,
    table: Table,
    existing: sqlite3.Row,
    body: dict[str, Any],
    strip: dict[str, Any] | None = None,
) -> sqlite3.Row:
    """Change the columns in ``body``; alternate-key values from the URL are stripped."""
    return _reload(ctx, table, _change(ctx, table, existing, body_values(table, body, ctx), strip))


def _change(
    ctx: WriteContext,
    table: Table,
    existing: sqlite3.Row,
    values: dict[str, Any],
    strip: dict[str, Any] | None = None,
) -> str:
    """Update a row from resolved ``values``; returns its id."""
    values.pop(table.primary_id, None)
    for name in strip or {}:
        values.pop(name, None)
    merged = {**dict(existing), **values}
    _finish(table, merged, values)
    merged.update(values)
    record_id = str(existing[table.primary_id])
    _check_keys(ctx, table, merged, record_id)
    values.update(
        modifiedon=now_iso(),
        modifiedby=ctx.caller.user.systemuserid,
        versionnumber=ctx.store.next_version(),
    )
    ctx.store.update(table, record_id, values)
    ctx.written("Update", table, record_id, values)
    return record_id


def delete(ctx: WriteContext, table: Table, existing: sqlite3.Row) -> None:
    record_id = str(existing[table.primary_id])
    ctx.store.delete(table, record_id, ctx.store.next_version(), now_iso())
    ctx.written("Delete", table, record_id, None)


def clear_column(ctx: WriteContext, table: Table, existing: sqlite3.Row, name: str) -> sqlite3.Row:
    """``DELETE accounts(id)/description`` clears one column."""
    column = table.column(name)
    if column is None or column.readonly or column.is_lookup or column.name == table.primary_id:
        raise errors.segment_not_found(name)
    return update(ctx, table, existing, {name: None})


def associate(
    ctx: WriteContext, table: Table, existing: sqlite3.Row, link: NavLink, reference: Any
) -> sqlite3.Row:
    """``PUT accounts(id)/primarycontactid/$ref {"@odata.id": …}`` sets the lookup."""
    return update(ctx, table, existing, {f"{link.name}@odata.bind": reference})


def disassociate(ctx: WriteContext, table: Table, existing: sqlite3.Row, link: NavLink) -> sqlite3.Row:
    """``DELETE accounts(id)/primarycontactid/$ref`` clears the lookup (when it points that way)."""
    if existing[link.column.name] is None:
        return existing
    if link.column.is_polymorphic and existing[type_column(link.column)] != link.target:
        return existing
    return update(ctx, table, existing, {f"{link.name}@odata.bind": None})


def _reload(ctx: WriteContext, table: Table, record_id: str) -> sqlite3.Row:
    row = ctx.store.get(table, record_id)
    if row is None:  # pragma: no cover - we just wrote it inside the same transaction
        raise errors.record_missing(table.logical_name, record_id)
    return row


def check_if_match(table: Table, row: sqlite3.Row, if_match: str | None) -> None:
    """Optimistic concurrency: a stale ``If-Match`` ETag gives 412 ConcurrencyVersionMismatch."""
    if not if_match or if_match.strip() == "*":
        return
    current = f'W/"{row["versionnumber"]}"'
    wanted = {tag.strip() for tag in if_match.split(",")}
    if current not in wanted and current[2:] not in wanted:
        raise errors.DataverseError(
            412,
            errors.CONCURRENCY_VERSION_MISMATCH,
            "The version of the existing record doesn't match the RowVersion property provided.",
        )


def upsert(
    ctx: WriteContext,
    locator: Locator,
    body: dict[str, Any],
    if_match: str | None = None,
    if_none_match: str | None = None,
) -> tuple[sqlite3.Row, bool]:
    """PATCH semantics: update if found, else create (unless ``If-Match`` forbids it)."""
    table = locator.table
    existing = find(ctx.store, locator)
    if existing is None:
        if if_match:
            raise locator.missing()
        return create(ctx, table, body, _preset(locator)), True
    if if_none_match and if_none_match.strip() == "*":
        raise errors.DataverseError(
            412, errors.DUPLICATE_RECORD, "A record with matching key values already exists."
        )
    check_if_match(table, existing, if_match)
    return update(ctx, table, existing, body, strip=locator.key_values), False


def _preset(locator: Locator) -> dict[str, Any]:
    """The id or alternate-key values a row created through ``locator`` gets."""
    table = locator.table
    return {table.primary_id: locator.record_id} if locator.record_id else dict(locator.key_values or {})


def target_locator(table: Table, target: dict[str, Any]) -> Locator | None:
    """How a bulk-action target names its row: ``@odata.id``, primary id, or alternate key."""
    odata_id = target.get("@odata.id")
    if isinstance(odata_id, str) and odata_id.strip():
        name, key = parse_segment(reference_path(odata_id))
        if name != table.entity_set or key is None:
            raise errors.bad_request(
                f"The @odata.id '{odata_id}' does not identify a row of {table.entity_set}."
            )
        return locate(table, key)
    if target.get(table.primary_id):
        record_id = parse_guid(str(target[table.primary_id]))
        if record_id is None:
            raise errors.bad_request(f"The value of '{table.primary_id}' is not a valid GUID.")
        return Locator(table, record_id=record_id)
    for key in table.keys:
        if all(target.get(a) not in (None, "") for a in key.attributes):
            values = {a: coerce(table, table.column(a), target[a]) for a in key.attributes}  # type: ignore[arg-type]
            return Locator(table, key_values=values)
    return None


@dataclass
class BulkTarget:
    """One ``Targets`` item of a bulk action, checked and converted outside the write lock."""

    locator: Locator | None
    body: ParsedBody


def prepare_bulk(ctx: WriteContext, table: Table, action: str, targets: Any) -> list[BulkTarget]:
    """Validate and convert every target without the database (safe to run concurrently)."""
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise errors.bad_request(f"{action} requires a 'Targets' array of entity objects.")
    prepared: list[BulkTarget] = []
    for target in targets:
        locator = None if action == "CreateMultiple" else target_locator(table, target)
        if action == "UpdateMultiple" and locator is None:
            raise errors.bad_request(f"UpdateMultiple targets must include '{table.primary_id}'.")
        body = {k: v for k, v in target.items() if k != "@odata.id"}
        creating = action != "UpdateMultiple"  # an upsert learns whether it creates at write time
        prepared.append(BulkTarget(locator, parse_body(table, body, ctx, creating=creating)))
    return prepared


def apply_bulk(ctx: WriteContext, table: Table, action: str, targets: list[BulkTarget]) -> list[str]:
    """Write prepared targets in one atomic transaction (the only part under the write lock)."""
    ids: list[str] = []
    with ctx.store.atomic():
        for target in targets:
            locator = target.locator
            if locator is None:  # CreateMultiple, or an UpsertMultiple target without a key
                ids.append(_insert(ctx, table, resolve(ctx, target.body)))
                continue
            existing = find(ctx.store, locator)
            if existing is not None:
                _no_deep_insert(target.body)
                values = resolve(ctx, target.body)
                ids.append(_change(ctx, table, existing, values, strip=locator.key_values))
            elif action == "UpdateMultiple":
                raise locator.missing()
            else:  # an UpsertMultiple target that creates
                ids.append(_insert(ctx, table, resolve(ctx, target.body), _preset(locator)))
    return ids


def _no_deep_insert(parsed: ParsedBody) -> None:
    """An upsert target that turns out to update may not create related rows."""
    for item in parsed.pending:
        if item.body is not None:
            name = item.link.name
            raise errors.bad_request(
                f"Deep insert of '{name}' is only possible when creating a record; bind an existing "
                f"record with '{name}@odata.bind' instead."
            )


def bulk(ctx: WriteContext, table: Table, action: str, targets: Any) -> list[str]:
    """``CreateMultiple`` / ``UpdateMultiple`` / ``UpsertMultiple`` in one atomic transaction."""
    return apply_bulk(ctx, table, action, prepare_bulk(ctx, table, action, targets))
