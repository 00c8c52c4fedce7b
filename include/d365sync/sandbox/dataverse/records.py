"""Converting column values between JSON bodies, SQLite and JSON answers.

Validation messages mirror Dataverse's wording (reference §7) so that clients which match on
codes behave the same against the sandbox as against a real environment.
"""

from __future__ import annotations

import math
import re
import sqlite3
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.errors import DataverseError
from d365sync.sandbox.dataverse.schema import (
    GUID_TYPES,
    STRING_TYPES,
    AttrType,
    Column,
    Table,
    type_column,
)

ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
FORMATTED_VALUE = "OData.Community.Display.V1.FormattedValue"
LOOKUP_LOGICAL_NAME = "Microsoft.Dynamics.CRM.lookuplogicalname"
ASSOCIATED_NAVIGATION_PROPERTY = "Microsoft.Dynamics.CRM.associatednavigationproperty"


@dataclass(frozen=True)
class Annotations:
    """The instance annotations a ``Prefer: odata.include-annotations="…"`` asks for.

    The value is a comma-separated list of terms: ``*`` (all), a term
    (``OData.Community.Display.V1.FormattedValue``), a namespace wildcard
    (``Microsoft.Dynamics.CRM.*``), or any of these after ``-`` to exclude it (OData 4.0 §8.2.8.4).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: str | None) -> Annotations:
        terms = [t.strip() for t in (value or "").split(",") if t.strip()]
        return cls(
            tuple(t for t in terms if not t.startswith("-")),
            tuple(t[1:] for t in terms if t.startswith("-")),
        )

    def wants(self, term: str) -> bool:
        return any(_matches(p, term) for p in self.include) and not any(
            _matches(p, term) for p in self.exclude
        )

    def __bool__(self) -> bool:
        return bool(self.include)


def _matches(pattern: str, term: str) -> bool:
    return pattern in ("*", term) or (pattern.endswith(".*") and term.startswith(pattern[:-1]))


NO_ANNOTATIONS = Annotations()


def now_iso() -> str:
    """UTC now, second precision, ``...Z`` like Dataverse."""
    return datetime.now(UTC).strftime(ISO_FORMAT)


def etag(version: int) -> str:
    return f'W/"{version}"'


def parse_guid(text: str) -> str | None:
    """Lower-case canonical GUID, or None when ``text`` is not one (braces allowed)."""
    try:
        return str(uuid.UUID(text.strip().strip("{}")))
    except (ValueError, AttributeError):
        return None


def parse_moment(text: str) -> datetime | None:
    """An ISO date or date/time as an aware UTC datetime (naive means UTC; None if unparseable)."""
    raw = text.strip()
    if raw.endswith("Z"):
        raw = raw[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_moment(moment: datetime) -> str:
    """UTC ``YYYY-MM-DDTHH:MM:SSZ``, the stored form (four-digit years, so text order is time order)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def parse_datetime(text: str) -> str | None:
    """Normalise an ISO date/time to UTC ``YYYY-MM-DDTHH:MM:SSZ`` (None if unparseable)."""
    moment = parse_moment(text)
    return None if moment is None else format_moment(moment)


_INTEGER_TEXT = re.compile(r"[+-]?\d+")
_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_BOOLEAN_TEXT = {"true": 1, "false": 0, "1": 1, "0": 0}


def parse_value(col: Column, text: str) -> Any:
    """A value given as text (a query function's ``PropertyValues``) in the form SQLite stores for
    ``col``: GUIDs lower-case, date/times UTC ISO, numbers and booleans parsed; None if it is not
    one.  Strings stay as they are (their columns compare case-insensitively)."""
    raw = text.strip()
    kind = col.type
    if kind in STRING_TYPES:
        return text
    if kind in GUID_TYPES:
        return parse_guid(raw)
    if kind == AttrType.DATETIME:
        return parse_datetime(raw)
    if kind == AttrType.BOOLEAN:
        return _BOOLEAN_TEXT.get(raw.lower())
    if kind in (AttrType.DECIMAL, AttrType.MONEY):
        return float(raw) if _DECIMAL_TEXT.fullmatch(raw) else None
    return int(raw) if _INTEGER_TEXT.fullmatch(raw) else None


def _payload_error(table: Table, value: Any, col: Column) -> DataverseError:
    return errors.bad_request(
        f"Error identified in Payload provided by the user for Entity :'{table.entity_set}', "
        "For more information on this error please follow this help link "
        "https://go.microsoft.com/fwlink/?linkid=2195293  ---->  InnerException : "
        f"Microsoft.OData.ODataException: Cannot convert the literal '{value}' to the expected "
        f"type '{col.edm_type}'.",
        errors.PAYLOAD_ERROR,
    )


def coerce(table: Table, col: Column, value: Any) -> Any:
    """Validate one non-lookup value from a request body and return what SQLite stores."""
    if value is None:
        return None
    kind = col.type
    if kind in (AttrType.STRING, AttrType.MEMO):
        return _coerce_string(table, col, value)
    if kind in (AttrType.INTEGER, AttrType.BIGINT, AttrType.PICKLIST, AttrType.STATE, AttrType.STATUS):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _payload_error(table, value, col)
        _check_options(table, col, value)
        _check_range(table, col, value)
        return value
    if kind in (AttrType.DECIMAL, AttrType.MONEY):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _payload_error(table, value, col)
        _check_range(table, col, value)
        return float(value)
    if kind == AttrType.BOOLEAN:
        if not isinstance(value, bool):
            raise _payload_error(table, value, col)
        return int(value)
    if kind == AttrType.DATETIME:
        parsed = parse_datetime(value) if isinstance(value, str) else None
        if parsed is None:
            raise _payload_error(table, value, col)
        return parsed
    if kind == AttrType.UNIQUEIDENTIFIER:
        parsed_id = parse_guid(value) if isinstance(value, str) else None
        if parsed_id is None:
            raise _payload_error(table, value, col)
        return parsed_id
    raise _payload_error(table, value, col)


def _coerce_string(table: Table, col: Column, value: Any) -> str:
    if not isinstance(value, str):
        raise _payload_error(table, value, col)
    if col.max_length is not None and len(value) > col.max_length:
        raise errors.bad_request(
            f"A validation error occurred.  The length of the '{col.name}' attribute of the "
            f"'{table.logical_name}' entity exceeded the maximum allowed length of '{col.max_length}'.",
            errors.VALIDATION,
        )
    return value


def _check_options(table: Table, col: Column, value: int) -> None:
    if col.options and value not in col.options:
        accepted = ",".join(str(o) for o in col.options)
        raise errors.bad_request(
            f"A validation error occurred. The value {value} of '{col.name}' on record of type "
            f"'{table.logical_name}' is outside the valid range. Accepted Values: {accepted}",
            errors.OPTION_OUT_OF_RANGE,
        )


def _check_range(table: Table, col: Column, value: float) -> None:
    low, high = col.min_value, col.max_value
    if (low is not None and value < low) or (high is not None and value > high):
        raise errors.bad_request(
            f"A validation error occurred. The value {value} of '{col.name}' on record of type "
            f"'{table.logical_name}' is outside the valid range ({low} to {high}).",
            errors.VALIDATION,
        )


def output_value(col: Column, value: Any) -> Any:
    """A stored value as JSON."""
    if value is None:
        return None
    if col.type == AttrType.BOOLEAN:
        return bool(value)
    if col.type in (AttrType.DECIMAL, AttrType.MONEY):
        number = float(value)
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    return value


def lookup_target(col: Column, row: sqlite3.Row) -> str:
    """The table a set lookup points at (polymorphic lookups store it beside the id)."""
    return str(row[type_column(col)]) if col.is_polymorphic else col.targets[0]


def render(
    table: Table,
    row: sqlite3.Row,
    columns: Iterable[Column],
    *,
    annotations: Annotations = NO_ANNOTATIONS,
    names: Mapping[str, str] | None = None,
    with_etag: bool = True,
) -> dict[str, Any]:
    """One row as Dataverse returns it: ``@odata.etag`` first, lookups as ``_x_value``, each
    property's requested annotations just before it.  ``names`` maps lookup ids to the primary
    name of the row they point at (the lookups' formatted values)."""
    out: dict[str, Any] = {"@odata.etag": etag(row["versionnumber"])} if with_etag else {}
    for col in columns:
        value = row[col.name]
        if value is not None:
            out.update(_annotations(col, row, value, annotations, names or {}))
        out[col.value_name] = output_value(col, value)
    if table.primary_id not in out:
        out[table.primary_id] = row[table.primary_id]
    return out


def _annotations(
    col: Column, row: sqlite3.Row, value: Any, wanted: Annotations, names: Mapping[str, str]
) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if col.is_lookup:
        target = lookup_target(col, row)
        found[FORMATTED_VALUE] = names.get(value)
        found[ASSOCIATED_NAVIGATION_PROPERTY] = f"{col.name}_{target}" if col.is_polymorphic else col.name
        found[LOOKUP_LOGICAL_NAME] = target
    elif col.type in (AttrType.STATE, AttrType.STATUS):
        found[FORMATTED_VALUE] = _label(col, value)
    return {
        f"{col.value_name}@{term}": shown
        for term, shown in found.items()
        if shown is not None and wanted.wants(term)
    }


def _label(col: Column, value: int) -> str:
    if col.type == AttrType.STATE:
        return "Active" if value == 0 else "Inactive"
    return str(value)
