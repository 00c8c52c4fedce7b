"""Dataverse change notifications: the ``RemoteExecutionContext`` a webhook or Service Bus delivers.

Why a parser of its own, below the receiver: the same JSON arrives by webhook (``POST`` body)
and by Azure Service Bus (message body), and what the sync keeps of it is the same either way:
which record of which table changed, how, by whom, and the *names* of the changed attributes.
Values are read past and never kept (they may be personal data; the run re-reads the record).

Shape (``dataverse-web-api.md`` section 10)::

    {"MessageName": "Update", "PrimaryEntityName": "account", "PrimaryEntityId": "<guid>",
     "InputParameters": [{"key": "Target", "value": {"Attributes": [{"key": "name", "value": …}],
                          "LogicalName": "account", "Id": "<guid>"}}],
     "UserId": "<guid>", "InitiatingUserId": "<guid>", "CorrelationId": "<guid>",
     "OperationId": "<guid>", "RequestId": "<guid>", "Depth": 1,
     "OperationCreatedOn": "/Date(1506409448000-0700)/", …}

A Delete's ``Target`` is an EntityReference (no attributes). Over 256 KB Dataverse drops
``InputParameters``: the changed attributes are then unknown (``None``), not "none".
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

MAX_NAME: Final = 128
_LOGICAL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MS_DATE = re.compile(r"/Date\((-?\d{1,15})([+-]\d{4})?\)/")
_NIL_GUID: Final = "00000000-0000-0000-0000-000000000000"


class NotificationError(ValueError):
    """The body is not a RemoteExecutionContext; the message says what is wrong, never a value."""


@dataclass(frozen=True, slots=True)
class Notification:
    """What the sync keeps of one notification: ids and names, no values.

    ``attributes``: the names in the ``Target`` of a Create or Update, ``()`` for a Delete, None
    when unknown (the context carried no ``Target``, e.g. Dataverse dropped it for size).
    ``operation_id`` is None when missing or the nil GUID (synchronous steps send it empty).
    """

    message: str
    table: str
    record_id: str
    attributes: tuple[str, ...] | None
    user_id: str | None
    initiating_user_id: str | None
    correlation_id: str | None
    operation_id: str | None
    request_id: str | None
    depth: int | None
    created_on: datetime | None

    def dedupe_key(self, body: bytes) -> str:
        """The same notification delivered twice has the same key; two changes never do.

        ``OperationId`` identifies one execution of the step (a retry keeps it); with no
        usable operation id, the body's SHA-256 (a redelivery resends the same bytes).
        """
        if self.operation_id is not None:
            return f"op:{self.operation_id}:{self.record_id}:{self.message}"
        return f"sha256:{hashlib.sha256(body).hexdigest()}"

    @property
    def users(self) -> frozenset[str]:
        """The user the operation ran as and the user who started it."""
        return frozenset(u for u in (self.user_id, self.initiating_user_id) if u is not None)


def parse_notification(body: bytes) -> Notification:
    """The notification in a webhook body; :class:`NotificationError` says what is malformed."""
    try:
        context = json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        raise NotificationError("the body is not JSON") from None
    if not isinstance(context, dict):
        raise NotificationError("the body is not a JSON object (a RemoteExecutionContext)")
    message = _required_name(context, "MessageName")
    return Notification(
        message=message,
        table=_required_name(context, "PrimaryEntityName").lower(),
        record_id=_guid(context, "PrimaryEntityId", required=True) or "",
        attributes=_attributes(context.get("InputParameters"), message),
        user_id=_guid(context, "UserId"),
        initiating_user_id=_guid(context, "InitiatingUserId"),
        correlation_id=_guid(context, "CorrelationId"),
        operation_id=_operation_id(context),
        request_id=_guid(context, "RequestId"),
        depth=_depth(context),
        created_on=_created_on(context),
    )


def parse_ms_date(value: str) -> datetime:
    """``/Date(1506409448000-0700)/`` -> an aware UTC datetime (ISO 8601 accepted as well).

    The milliseconds are UTC; the offset only says which zone the sender displayed.
    """
    if match := _MS_DATE.fullmatch(value.strip()):
        return datetime.fromtimestamp(int(match.group(1)) / 1000, UTC)
    parsed = datetime.fromisoformat(value.strip())
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _required_name(context: dict[str, Any], key: str) -> str:
    value = context.get(key)
    if value is None or value == "":
        raise NotificationError(f"{key} is missing")
    if not isinstance(value, str) or not _LOGICAL_NAME.fullmatch(value):
        raise NotificationError(f"{key} is not a name (letters, digits, underscores; at most {MAX_NAME})")
    return value


def _guid(context: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = context.get(key)
    if value is None or value == "":
        if required:
            raise NotificationError(f"{key} is missing")
        return None
    try:
        return str(uuid.UUID(str(value).strip("{}")))
    except ValueError:
        raise NotificationError(f"{key} is not a GUID") from None


def _operation_id(context: dict[str, Any]) -> str | None:
    value = _guid(context, "OperationId")
    return None if value == _NIL_GUID else value


def _depth(context: dict[str, Any]) -> int | None:
    value = context.get("Depth")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
        raise NotificationError("Depth is not a small whole number")
    return value


def _created_on(context: dict[str, Any]) -> datetime | None:
    value = context.get("OperationCreatedOn")
    if value is None or value == "":
        return None
    try:
        return parse_ms_date(str(value))
    except (ValueError, OverflowError, OSError):
        raise NotificationError('OperationCreatedOn is not a "/Date(ms)/" or ISO 8601 date') from None


def _attributes(parameters: Any, message: str) -> tuple[str, ...] | None:
    """The ``Target``'s attribute names; ``()`` for a Delete (an EntityReference)."""
    if message == "Delete":
        return ()
    target = _target(parameters)
    if target is None:
        return None
    pairs = target.get("Attributes")
    if pairs is None:
        return None
    if not isinstance(pairs, list):
        raise NotificationError("InputParameters Target Attributes is not a list of key/value pairs")
    return tuple(sorted({_attribute_name(pair) for pair in pairs}))


def _target(parameters: Any) -> dict[str, Any] | None:
    if parameters is None:
        return None
    if not isinstance(parameters, list):
        raise NotificationError("InputParameters is not a list of key/value pairs")
    for pair in parameters:
        if isinstance(pair, dict) and pair.get("key") == "Target":
            target = pair.get("value")
            return target if isinstance(target, dict) else None
    return None


def _attribute_name(pair: Any) -> str:
    name = pair.get("key") if isinstance(pair, dict) else None
    if not isinstance(name, str) or not _LOGICAL_NAME.fullmatch(name):
        raise NotificationError("InputParameters Target Attributes holds a pair without a valid key")
    return name.lower()
