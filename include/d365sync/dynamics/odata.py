"""OData literal and URL helpers.

Keys reach URLs from ERP data (``O'Brien``, ``A/B #1``), so quoting and percent-encoding are done
in one place: single quotes are doubled per OData, then anything that is not safe inside a path
segment is percent-encoded.  Reads by many keys or ids use ``Microsoft.Dynamics.CRM.In`` filters
cut to a URL budget (:func:`in_filters`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlencode

KeyValue = str | int | float | Decimal | bool | uuid.UUID | datetime | date
IdOrKey = str | uuid.UUID | Mapping[str, KeyValue]

IN_FUNCTION = "Microsoft.Dynamics.CRM.In"
# A GET URL may hold 32 KB (reference §2).  An In filter gets half: the base URL and $select take
# the rest, and the @odata.nextLink Dataverse builds from a query (the same query plus a skip-token
# cookie) must fit too.
IN_FILTER_BUDGET = 16 * 1024
_QUERY_SAFE = "$,()'"  # characters query_string leaves unencoded


def literal(value: KeyValue) -> str:
    """Render a Python value as an OData URL literal (strings quoted, quotes doubled)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, int | float | Decimal):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def format_datetime(value: datetime) -> str:
    """UTC ISO-8601 with a Z; naive datetimes are taken to be UTC (Dataverse stores UTC)."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _encode(text: str) -> str:
    return quote(text, safe="'-._~!$*+,;=:@")


def key_segment(id_or_key: IdOrKey, *, encode: bool = True) -> str:
    """``(guid)`` for a primary id, ``(a='x',b=1)`` for an alternate key, URL-encoded."""
    if isinstance(id_or_key, uuid.UUID):
        return f"({id_or_key})"
    if isinstance(id_or_key, str):
        return f"({uuid.UUID(id_or_key)})"  # raises ValueError for a non-GUID string
    if not id_or_key:
        raise ValueError("an alternate key needs at least one attribute")
    render = _encode if encode else str
    parts = (f"{name}={render(literal(value))}" for name, value in id_or_key.items())
    return "(" + ",".join(parts) + ")"


def entity_path(entity_set: str, id_or_key: IdOrKey) -> str:
    """The request-URL form: key literals percent-encoded (``/``, ``#``, ``?``, ``%`` are safe)."""
    return f"{entity_set}{key_segment(id_or_key)}"


def entity_id(entity_set: str, id_or_key: IdOrKey) -> str:
    """The ``@odata.id`` form used inside JSON bodies: quotes doubled, no percent-encoding.

    Bodies are not URL-decoded by the service, so encoding here would change the key value.
    """
    return f"{entity_set}{key_segment(id_or_key, encode=False)}"


def key_of(record: Mapping[str, Any], key_attributes: Sequence[str]) -> dict[str, KeyValue]:
    """Pull the alternate-key values out of a record; a missing or null part is an error."""
    missing = [name for name in key_attributes if record.get(name) in (None, "")]
    if missing:
        raise ValueError(f"record lacks key attribute(s) {missing}")
    return {name: record[name] for name in key_attributes}


def query_string(params: Mapping[str, str | None]) -> str:
    """Encode system query options keeping ``$`` and ``,`` readable, dropping Nones."""
    present = {k: v for k, v in params.items() if v is not None}
    return urlencode(present, safe=_QUERY_SAFE, quote_via=quote) if present else ""


def _encoded_length(text: str) -> int:
    """Length of ``text`` once :func:`query_string` has encoded it (encoding is per character)."""
    return len(quote(text, safe=_QUERY_SAFE))


def _property_value(value: KeyValue) -> str:
    """A value as the string ``PropertyValues`` (a ``Collection(Edm.String)``) carries."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def in_filters(attribute: str, values: Iterable[KeyValue], budget: int = IN_FILTER_BUDGET) -> list[str]:
    """``Microsoft.Dynamics.CRM.In`` filters over ``values``, each at most ``budget`` characters
    once URL-encoded, so a read by many keys costs one request per few hundred keys instead of one
    per handful of ``eq`` terms.  None when ``values`` is empty.

    ``attribute`` is the column's logical name: ``parentcustomerid``, not ``_parentcustomerid_value``
    (Dataverse refuses that name in query functions).  Values go as JSON strings in double quotes,
    Microsoft's advice for values with an apostrophe.  Values equal but for case are sent once, as
    Dataverse compares them case-insensitively anyway; a value longer than ``budget`` gets a
    filter of its own (which the service will then refuse as too long).
    """
    head = f"{IN_FUNCTION}(PropertyName={literal(attribute)},PropertyValues=["
    tail = "])"
    unique: dict[str, str] = {}
    for value in values:
        text = _property_value(value)
        unique.setdefault(text.casefold(), text)
    chunks: list[list[str]] = []
    size = 0
    for text in unique.values():
        item = json.dumps(text, ensure_ascii=False)
        cost = _encoded_length(item) + 1  # with its comma (one too many per chunk: a safety margin)
        if not chunks or size + cost > budget:
            chunks.append([])
            size = _encoded_length(head + tail)
        chunks[-1].append(item)
        size += cost
    return [f"{head}{','.join(chunk)}{tail}" for chunk in chunks]


def select_clause(select: Sequence[str]) -> str:
    if isinstance(select, str) or not select:
        raise ValueError("select must be a non-empty list of column names")
    return ",".join(select)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot send a {type(value).__name__} to Dataverse")


def dumps_json(payload: Any) -> bytes:
    """Compact UTF-8 JSON; datetimes as UTC ISO, Decimals as numbers, UUIDs as strings."""
    return json.dumps(payload, default=_json_default, separators=(",", ":")).encode("utf-8")
