"""Creating, updating, upserting and deleting rows — each write implemented exactly once.

Single HTTP writes, ``$batch`` parts and the ``*Multiple`` bulk actions all end up here, so
validation, lookup binding, alternate-key uniqueness and version stamping behave identically
whichever way a client sends the data.  Every write takes a fresh global ``versionnumber``.

Bulk actions run in two steps so that parallel requests overlap: :func:`prepare_bulk` validates
and converts the targets without the database (no lock), :func:`apply_bulk` then looks rows and
bind targets up and writes them inside one short write transaction.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.identity import Caller
from d365sync.sandbox.dataverse.protocol import parse_key_values, parse_segment
from d365sync.sandbox.dataverse.records import coerce, now_iso, parse_guid
from d365sync.sandbox.dataverse.schema import ENTITY_SETS, TABLES, Column, Table, type_column
from d365sync.sandbox.dataverse.store import Store


@dataclass
class Locator:
    """How a URL or bind names a row: by primary id or by alternate-key values."""

    table: Table
    record_id: str | None = None
    key_values: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.record_id:
            return self.record_id
        return ",".join(f"{k}={v}" for k, v in (self.key_values or {}).items())

    def missing(self) -> errors.DataverseError:
        if self.record_id:
            return errors.record_missing(self.table.logical_name, self.record_id)
        return errors.not_found(
            f"A record with the specified key values does not exist in {self.table.logical_name} entity"
        )


@dataclass
class WriteContext:
    """Who writes, and the ``$n`` Content-ID references visible to this operation."""

    store: Store
    caller: Caller
    content_ids: dict[str, tuple[Table, str]] = field(default_factory=dict)


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
@dataclass
class PendingBind:
    """An ``@odata.bind`` checked without the database; the target row is looked up at write time."""

    lookup: Column
    target: Table
    locator: Locator
    mismatch: errors.DataverseError | None = None
    """The bind names the wrong entity set: reported once the row is known to exist."""


def _bind_reference(value: Any, nav: str, ctx: WriteContext) -> tuple[Table, str | Locator]:
    """Parse an ``@odata.bind`` value: (target table, id) for a ``$n`` reference, else
    (target table, the locator still to look up)."""
    if not isinstance(value, str) or not value.strip():
        raise errors.bad_request(f"The value of '{nav}@odata.bind' must be an entity reference string.")
    text = value.strip()
    if text.startswith("$"):
        ref = ctx.content_ids.get(text[1:])
        if ref is None:
            raise errors.bad_request(f"Content-ID Reference: '{text}' does not exist in the batch context.")
        return ref
    if "://" in text:
        text = urlsplit(text).path
    text = text.lstrip("/")
    if text.startswith("api/data/"):
        text = text.split("/", 3)[3] if text.count("/") >= 3 else ""
    name, key = parse_segment(text) if text else ("", None)
    target = ENTITY_SETS.get(name)
    if target is None or key is None:
        raise errors.bad_request(
            f"The @odata.bind value '{value}' for '{nav}' is not a valid entity reference "
            "(expected '/<entityset>(<id>)')."
        )
    return target, locate(target, key)


def _set_lookup(lookup: Column, target: Table | None, target_id: str | None, out: dict[str, Any]) -> None:
    out[lookup.name] = target_id
    if lookup.is_polymorphic:
        out[type_column(lookup)] = target.logical_name if target is not None else None


def _parse_bind(
    table: Table, key: str, value: Any, ctx: WriteContext, out: dict[str, Any], pending: list[PendingBind]
) -> None:
    nav_name = key.split("@", 1)[0]
    nav = table.navigation(nav_name)
    if nav is None:
        raise errors.bad_request(
            f"An undeclared property '{nav_name}' which only has property annotations in the payload "
            "but no property value was found in the payload. In OData, only declared navigation "
            "properties and declared named streams can be represented as properties without values."
        )
    lookup, expected = nav
    if lookup.readonly:
        return
    if value is None:
        _set_lookup(lookup, None, None, out)
        return
    target, reference = _bind_reference(value, nav_name, ctx)
    mismatch = None
    if target.logical_name != expected:
        mismatch = errors.bad_request(
            f"The @odata.bind value '{value}' for '{nav_name}' references entity set "
            f"'{target.entity_set}', but '{nav_name}' expects '{TABLES[expected].entity_set}'."
        )
    if isinstance(reference, Locator):
        pending.append(PendingBind(lookup, target, reference, mismatch))
    elif mismatch is not None:
        raise mismatch
    else:
        _set_lookup(lookup, target, reference, out)


# -- body → values -------------------------------------------------------------------------------
@dataclass
class ParsedBody:
    """A request body validated and converted without touching the database (so bulk actions can
    do it outside the write lock); :func:`resolve` adds the looked-up bind targets."""

    values: dict[str, Any]
    binds: list[PendingBind] = field(default_factory=list)


def parse_body(table: Table, body: dict[str, Any], ctx: WriteContext) -> ParsedBody:
    """Validate a JSON body: the SQLite values it sets (read-only columns dropped) and the binds
    whose target rows are still to be looked up."""
    out: dict[str, Any] = {}
    pending: list[PendingBind] = []
    for key, value in body.items():
        if key.endswith("@odata.bind"):
            _parse_bind(table, key, value, ctx, out, pending)
        elif key.startswith("@"):
            _check_annotation(table, key, value)
        elif "@" in key:
            continue
        else:
            column = table.column(key)
            if column is None or column.is_lookup:
                raise errors.bad_request(
                    f"The property '{key}' does not exist on type '{table.type_name}'. Make sure to only "
                    "use property names that are defined by the type or mark the type as open type."
                )
            if not column.readonly:
                out[column.name] = coerce(table, column, value)
    return ParsedBody(out, pending)


def resolve(ctx: WriteContext, parsed: ParsedBody) -> dict[str, Any]:
    """The values of a parsed body with its binds looked up (inside the write transaction, so a
    bound row cannot vanish before the write commits)."""
    out = dict(parsed.values)
    for bind in parsed.binds:
        row = find(ctx.store, bind.locator)
        if row is None:
            raise errors.bad_request(
                f"{bind.target.logical_name} With Id = {bind.locator.describe()} Does Not Exist",
                errors.OBJECT_DOES_NOT_EXIST,
            )
        if bind.mismatch is not None:
            raise bind.mismatch
        _set_lookup(bind.lookup, bind.target, row[bind.target.primary_id], out)
    return out


def body_values(table: Table, body: dict[str, Any], ctx: WriteContext) -> dict[str, Any]:
    """Validate a JSON body and return the SQLite values it sets (read-only columns dropped)."""
    return resolve(ctx, parse_body(table, body, ctx))


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
    """Insert a row; ``preset`` carries id/alternate-key values taken from the URL."""
    return _reload(ctx, table, _insert(ctx, table, body_values(table, body, ctx), preset))


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
        "ownerid": user,
        "versionnumber": ctx.store.next_version(),
    }
    ctx.store.insert(table, row)
    return record_id


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
    record_id: str = existing[table.primary_id]
    _check_keys(ctx, table, merged, record_id)
    values.update(
        modifiedon=now_iso(),
        modifiedby=ctx.caller.user.systemuserid,
        versionnumber=ctx.store.next_version(),
    )
    ctx.store.update(table, record_id, values)
    return record_id


def delete(ctx: WriteContext, table: Table, existing: sqlite3.Row) -> None:
    ctx.store.delete(table, existing[table.primary_id], ctx.store.next_version(), now_iso())


def clear_column(ctx: WriteContext, table: Table, existing: sqlite3.Row, name: str) -> sqlite3.Row:
    """``DELETE accounts(id)/description`` clears one column."""
    column = table.column(name)
    if column is None or column.readonly or column.name == table.primary_id:
        raise errors.segment_not_found(name)
    body = {f"{name}@odata.bind": None} if column.is_lookup else {name: None}
    return update(ctx, table, existing, body)


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
    if existing is None and if_match:
        raise locator.missing()
    if existing is not None:
        if if_none_match and if_none_match.strip() == "*":
            raise errors.DataverseError(
                412, errors.DUPLICATE_RECORD, "A record with matching key values already exists."
            )
        check_if_match(table, existing, if_match)
    record_id, created = _upsert(ctx, locator, existing, body_values(table, body, ctx))
    return _reload(ctx, table, record_id), created


def _upsert(
    ctx: WriteContext, locator: Locator, existing: sqlite3.Row | None, values: dict[str, Any]
) -> tuple[str, bool]:
    """Update ``existing`` or create the row ``locator`` names; (id, created)."""
    table = locator.table
    if existing is None:
        preset = (
            {table.primary_id: locator.record_id} if locator.record_id else dict(locator.key_values or {})
        )
        return _insert(ctx, table, values, preset), True
    return _change(ctx, table, existing, values, strip=locator.key_values), False


def target_locator(table: Table, target: dict[str, Any]) -> Locator | None:
    """How a bulk-action target names its row: ``@odata.id``, primary id, or alternate key."""
    odata_id = target.get("@odata.id")
    if isinstance(odata_id, str) and odata_id.strip():
        text = odata_id.strip().lstrip("/")
        if "://" in text:
            text = urlsplit(text).path.lstrip("/")
        if text.startswith("api/data/"):
            text = text.split("/", 3)[3]
        name, key = parse_segment(text)
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
        prepared.append(BulkTarget(locator, parse_body(table, body, ctx)))
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
            if existing is None and action == "UpdateMultiple":
                raise locator.missing()
            ids.append(_upsert(ctx, locator, existing, resolve(ctx, target.body))[0])
    return ids


def bulk(ctx: WriteContext, table: Table, action: str, targets: Any) -> list[str]:
    """``CreateMultiple`` / ``UpdateMultiple`` / ``UpsertMultiple`` in one atomic transaction."""
    return apply_bulk(ctx, table, action, prepare_bulk(ctx, table, action, targets))
