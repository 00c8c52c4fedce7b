"""OData literal and URL helpers.

Keys reach URLs from ERP data (``O'Brien``, ``A/B #1``), so quoting and percent-encoding are done
in one place: single quotes are doubled per OData, then anything that is not safe inside a path
segment is percent-encoded.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlencode

KeyValue = str | int | float | Decimal | bool | uuid.UUID | datetime | date
IdOrKey = str | uuid.UUID | Mapping[str, KeyValue]


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
    return urlencode(present, safe="$,()'", quote_via=quote) if present else ""


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
