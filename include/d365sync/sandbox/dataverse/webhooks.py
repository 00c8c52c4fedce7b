"""Webhook registrations and the notification queue, as Dataverse keeps and raises them.

A client registers a webhook the way it does against a real environment, through the Web API:
it finds the ids of ``sdkmessages`` (``Create``, ``Update``, ``Delete``, seeded) and
``sdkmessagefilters`` (one per notifying table and message, seeded), creates a
``serviceendpoint`` (``contract`` 8 = Webhook, ``url``, ``authtype`` 4 WebhookKey / 5 HttpHeader /
6 HttpQueryString with its ``authvalue``, which is write-only) and one
``sdkmessageprocessingstep`` per table and message, bound with ``sdkmessageid@odata.bind``,
``sdkmessagefilterid@odata.bind`` and ``eventhandler_serviceendpoint@odata.bind``.

:class:`Webhooks` hears every row written (:class:`~.writes.WriteListener`), inside the write
transaction.  For a registration row it checks what Dataverse checks (an invalid one rolls the
write back with a 400).  For a row of a notifying table it finds the enabled steps for the
message and table — ``filteringattributes`` limit an ``Update`` step to requests that set one of
them, as in Dataverse, whether or not the value changed — and queues one delivery per step in
``_webhook_delivery``.  The queue row commits or rolls back with the write itself, so a
rolled-back changeset notifies nothing, a restart loses nothing, and the write path pays one
small insert per matching step.  The steps matching a message and table are cached until a
registration row is written.  :mod:`.delivery` sends the queue.

Only asynchronous (``mode`` 1), post-operation (``stage`` 40) steps are accepted; a synchronous
step is refused with a 400 rather than run inside the caller's transaction.
"""

from __future__ import annotations

import json
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.config import SandboxConfig, stable_id
from d365sync.sandbox.dataverse.limits import Knobs
from d365sync.sandbox.dataverse.records import ISO_FORMAT, now_iso
from d365sync.sandbox.dataverse.schema import (
    SDK_MESSAGES,
    TABLES,
    WEBHOOK_CONTRACT,
    AttrType,
    Table,
    type_column,
)
from d365sync.sandbox.dataverse.store import Store
from d365sync.sandbox.dataverse.writes import WriteContext

WEBHOOK_KEY, HTTP_HEADER, HTTP_QUERY_STRING = 4, 5, 6
ASYNCHRONOUS, POST_OPERATION = 1, 40
XRM = "http://schemas.microsoft.com/xrm/2011/Contracts"
_SYSTEM_SET = frozenset({"modifiedon", "modifiedby", "versionnumber"})
"""Columns every update sets; they never satisfy ``filteringattributes``."""
REGISTRATION = frozenset({"sdkmessageprocessingstep", "serviceendpoint"})
READ_ONLY = frozenset({"sdkmessage", "sdkmessagefilter"})

DDL = (
    "CREATE TABLE IF NOT EXISTS _webhook_delivery ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " operation_id TEXT NOT NULL, step_id TEXT NOT NULL, endpoint_id TEXT NOT NULL,"
    " message TEXT NOT NULL, entity TEXT NOT NULL, record_id TEXT NOT NULL,"
    " ordering_key TEXT NOT NULL,"  # endpoint|entity|id: one record's notifications go in order
    " event TEXT NOT NULL,"  # JSON: what the execution context is built from
    " status TEXT NOT NULL DEFAULT 'pending',"  # pending | delivered | failed | cancelled
    " attempts INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL, next_attempt_ms INTEGER NOT NULL,"
    " last_attempt_ms INTEGER, completed_ms INTEGER, last_status INTEGER, last_error TEXT,"
    " last_duration_ms REAL)",
    "CREATE INDEX IF NOT EXISTS ix_webhook_due ON _webhook_delivery (status, next_attempt_ms)",
    "CREATE INDEX IF NOT EXISTS ix_webhook_order ON _webhook_delivery (ordering_key, status, id)",
)

_MATCHING_STEPS = """
SELECT s.sdkmessageprocessingstepid AS step_id, s.eventhandler AS endpoint_id,
       s.filteringattributes AS attributes
FROM sdkmessageprocessingstep s
JOIN sdkmessage m ON m.sdkmessageid = s.sdkmessageid
JOIN serviceendpoint e ON e.serviceendpointid = s.eventhandler
LEFT JOIN sdkmessagefilter f ON f.sdkmessagefilterid = s.sdkmessagefilterid
WHERE m.name = ? AND s.statecode = 0 AND s.eventhandler__type = 'serviceendpoint'
  AND e.contract = ? AND (s.sdkmessagefilterid IS NULL OR f.primaryobjecttypecode = ?)
ORDER BY s.rank, s.createdon
"""


def message_id(name: str) -> str:
    """The seeded ``sdkmessageid`` of a message (stable across restarts)."""
    return stable_id("sdkmessage", name.lower())


def filter_id(table: str, message: str) -> str:
    """The seeded ``sdkmessagefilterid`` of a table and message."""
    return stable_id("sdkmessagefilter", f"{table}:{message.lower()}")


def ensure_catalog(store: Store, owner_id: str) -> int:
    """Create the queue table and seed the messages and their filters; idempotent.  Returns the
    number of rows added."""
    for statement in DDL:
        store.execute(statement)
    rows: list[tuple[Table, dict[str, Any]]] = [
        (TABLES["sdkmessage"], _message_row(name)) for name in SDK_MESSAGES
    ]
    rows += [
        (TABLES["sdkmessagefilter"], _filter_row(table, name))
        for table in TABLES.values()
        if table.notifies
        for name in SDK_MESSAGES
    ]
    added = 0
    with store.atomic():
        for table, values in rows:
            if store.get(table, values[table.primary_id]) is None:
                store.insert(table, _system_columns(store, table, owner_id) | values)
                added += 1
    return added


def _message_row(name: str) -> dict[str, Any]:
    return {
        "sdkmessageid": message_id(name),
        "name": name,
        "categoryname": None,
        "isprivate": 0,
        "autotransact": 1,
        "isvalidforexecuteasync": 1,
    }


def _filter_row(table: Table, message: str) -> dict[str, Any]:
    return {
        "sdkmessagefilterid": filter_id(table.logical_name, message),
        "name": None,
        "primaryobjecttypecode": table.logical_name,
        "secondaryobjecttypecode": "none",
        "iscustomprocessingstepallowed": 1,
        "isvisible": 1,
        "availability": 4,  # server and client
        "sdkmessageid": message_id(message),
    }


def _system_columns(store: Store, table: Table, owner_id: str) -> dict[str, Any]:
    now = now_iso()
    return {
        "createdon": now,
        "modifiedon": now,
        "createdby": owner_id,
        "modifiedby": owner_id,
        "ownerid": owner_id,
        "statecode": 0,
        "statuscode": table.default_status[0],
        "versionnumber": store.next_version(),
    }


@dataclass(frozen=True)
class Step:
    """An enabled step a write may notify."""

    step_id: str
    endpoint_id: str
    attributes: frozenset[str]

    def fires_for(self, message: str, values: Mapping[str, Any] | None) -> bool:
        """Dataverse's rule: an Update step with filtering attributes runs when the request sets
        one of them (changed or not); other steps always run."""
        if message != "Update" or not self.attributes:
            return True
        return bool(self.attributes & set(values or ()))


class Webhooks:
    """The :class:`~.writes.WriteListener` that checks registrations and queues notifications.

    Everything here runs under the store's write lock (inside write transactions, or in the
    transaction-end hook), so the step cache needs no lock of its own.
    """

    def __init__(self, store: Store, knobs: Knobs) -> None:
        self.store = store
        self.knobs = knobs
        self._cache: dict[tuple[str, str], list[Step]] = {}
        self._registration_touched = False  # in the open transaction: bypass the cache
        self._queued = False  # in the open transaction
        self._wake: list[Callable[[], None]] = []
        store.after_transaction(self._transaction_ended)

    def on_queued(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after a transaction that queued deliveries commits."""
        self._wake.append(callback)

    def _transaction_ended(self, committed: bool) -> None:
        if self._registration_touched:
            self._cache.clear()
            self._registration_touched = False
        if self._queued and committed:
            for callback in self._wake:
                callback()
        self._queued = False

    # -- WriteListener -------------------------------------------------------------------------
    def written(
        self,
        ctx: WriteContext,
        message: str,
        table: Table,
        record_id: str,
        values: Mapping[str, Any] | None,
    ) -> None:
        name = table.logical_name
        if name in READ_ONLY:
            raise errors.bad_request(
                f"The {message} message is not supported on the platform table '{name}'.",
                errors.INVALID_ARGUMENT,
            )
        if name in REGISTRATION:
            self._registration_touched = True
            self._cache.clear()
            if message != "Delete":
                _check_registration(ctx.store, table, record_id)
            return
        if table.notifies and message in SDK_MESSAGES:
            self._queue(ctx, message, table, record_id, values)

    def _queue(
        self,
        ctx: WriteContext,
        message: str,
        table: Table,
        record_id: str,
        values: Mapping[str, Any] | None,
    ) -> None:
        steps = [s for s in self._steps(message, table.logical_name) if s.fires_for(message, values)]
        if not steps:
            return
        now = int(time.time() * 1000)
        due = now + int(self.knobs.webhook_delay_ms)
        event = json.dumps(
            {
                "user_id": ctx.caller.user.systemuserid,
                "user_object_id": ctx.caller.user.object_id,
                "correlation_id": ctx.correlation_id,
                "request_id": str(uuid.uuid4()),
                "tag": ctx.tag,
                "values": dict(values) if values is not None else None,
            },
            separators=(",", ":"),
        )
        for step in steps:
            ctx.store.execute(
                "INSERT INTO _webhook_delivery (operation_id, step_id, endpoint_id, message, entity,"
                " record_id, ordering_key, event, created_ms, next_attempt_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(uuid.uuid4()),
                    step.step_id,
                    step.endpoint_id,
                    message,
                    table.logical_name,
                    record_id,
                    f"{step.endpoint_id}|{table.logical_name}|{record_id}",
                    event,
                    now,
                    due,
                ),
            )
        self._queued = True

    def _steps(self, message: str, entity: str) -> list[Step]:
        key = (message, entity)
        if not self._registration_touched and key in self._cache:
            return self._cache[key]
        rows = self.store.fetch(_MATCHING_STEPS, (message, WEBHOOK_CONTRACT, entity))
        steps = [
            Step(r["step_id"], r["endpoint_id"], frozenset(split_attributes(r["attributes"]))) for r in rows
        ]
        if not self._registration_touched:
            self._cache[key] = steps
        return steps


def split_attributes(text: str | None) -> list[str]:
    """``filteringattributes`` as a list of logical names."""
    return [a.strip().lower() for a in (text or "").split(",") if a.strip()]


# -- registration checks -------------------------------------------------------------------------
def _check_registration(store: Store, table: Table, record_id: str) -> None:
    row = store.get(table, record_id)
    if row is None:  # pragma: no cover - written in this transaction
        return
    if table.logical_name == "serviceendpoint":
        check_endpoint(dict(row))
    else:
        _check_step(store, dict(row))


def check_endpoint(row: Mapping[str, Any]) -> None:
    """A webhook endpoint the sandbox can deliver to: contract 8, an http(s) URL, and an
    authentication it knows with a value."""
    if row["contract"] != WEBHOOK_CONTRACT:
        raise errors.bad_request(
            f"The sandbox delivers to webhooks only: serviceendpoint.contract must be {WEBHOOK_CONTRACT} "
            f"(Webhook), not {row['contract']}.",
            errors.INVALID_ARGUMENT,
        )
    url = urlsplit(row["url"] or "")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise errors.bad_request(
            f"The webhook URL '{row['url'] or ''}' is not an absolute http or https URL.",
            errors.INVALID_ARGUMENT,
        )
    if row["authtype"] not in (WEBHOOK_KEY, HTTP_HEADER, HTTP_QUERY_STRING):
        raise errors.bad_request(
            "A webhook's authtype must be 4 (WebhookKey), 5 (HttpHeader) or 6 (HttpQueryString).",
            errors.INVALID_ARGUMENT,
        )
    if not row["authvalue"]:
        raise errors.bad_request("A webhook needs an authvalue for its authtype.", errors.INVALID_ARGUMENT)
    if row["authtype"] != WEBHOOK_KEY:
        auth_settings(row["authvalue"])  # raises when it is not the settings XML


def auth_settings(text: str) -> list[tuple[str, str]]:
    """The pairs of an HttpHeader / HttpQueryString ``authvalue``:
    ``<settings><setting name="x-api-key" value="…"/></settings>``."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise _bad_settings(str(exc)) from None
    pairs = [(s.get("name") or "", s.get("value") or "") for s in root.iter("setting")]
    if root.tag != "settings" or not pairs or any(not name for name, _ in pairs):
        raise _bad_settings("expected one or more <setting name=… value=…/> inside <settings>")
    return pairs


def _bad_settings(reason: str) -> errors.DataverseError:
    return errors.bad_request(
        "The authvalue must be XML like "
        f'<settings><setting name="Key1" value="Value1" /></settings>: {reason}.',
        errors.INVALID_ARGUMENT,
    )


def _check_step(store: Store, row: Mapping[str, Any]) -> None:
    if row["mode"] != ASYNCHRONOUS:
        raise errors.bad_request(
            "The sandbox runs webhook steps asynchronously only: register the step with mode 1 "
            "(Asynchronous) and stage 40.",
            errors.INVALID_ARGUMENT,
        )
    if row["stage"] != POST_OPERATION:
        raise errors.bad_request(
            "Asynchronous steps can only be registered in the PostOperation stage (40).",
            errors.INVALID_ARGUMENT,
        )
    if not row["sdkmessageid"]:
        raise errors.bad_request(
            "A step needs its message: sdkmessageid@odata.bind.", errors.INVALID_ARGUMENT
        )
    if row["eventhandler__type"] != "serviceendpoint":
        raise errors.bad_request(
            "A webhook step needs its endpoint: eventhandler_serviceendpoint@odata.bind.",
            errors.INVALID_ARGUMENT,
        )
    if row["sdkmessagefilterid"]:
        _check_filter(store, row)


def _check_filter(store: Store, row: Mapping[str, Any]) -> None:
    found = store.get(TABLES["sdkmessagefilter"], row["sdkmessagefilterid"])
    if found is None:  # pragma: no cover - the bind resolved it
        return
    if found["sdkmessageid"] != row["sdkmessageid"]:
        raise errors.bad_request(
            f"The sdkmessagefilter {found['sdkmessagefilterid']} belongs to another message than the "
            f"step's sdkmessage {row['sdkmessageid']}.",
            errors.INVALID_ARGUMENT,
        )
    table = TABLES[found["primaryobjecttypecode"]]
    for name in split_attributes(row["filteringattributes"]):
        if table.column(name) is None:
            raise errors.bad_request(
                f"The filtering attribute '{name}' is not an attribute of '{table.logical_name}'.",
                errors.INVALID_ARGUMENT,
            )


# -- the execution context -----------------------------------------------------------------------
def dotnet_date(milliseconds: int) -> str:
    """A date as DataContractJsonSerializer writes it: ``/Date(<ms since 1970>)/``."""
    return f"/Date({milliseconds})/"


def _stored_date(text: str) -> str:
    moment = datetime.strptime(text, ISO_FORMAT).replace(tzinfo=UTC)
    return dotnet_date(int(moment.timestamp() * 1000))


def entity_reference(logical_name: str, record_id: str) -> dict[str, Any]:
    return {
        "__type": f"EntityReference:{XRM}",
        "Id": record_id,
        "KeyAttributes": [],
        "LogicalName": logical_name,
        "Name": None,
        "RowVersion": None,
    }


def _xrm_value(table: Table, name: str, value: Any, values: Mapping[str, Any]) -> Any:
    """A stored value as the SDK's JSON contract carries it (OptionSetValue, Money, EntityReference,
    ``/Date(…)/``)."""
    column = table.column(name)
    if value is None or column is None:
        return value
    if column.is_lookup:
        target = values.get(type_column(column)) if column.is_polymorphic else column.targets[0]
        return entity_reference(str(target), str(value))
    kind = column.type
    if kind in (AttrType.PICKLIST, AttrType.STATE, AttrType.STATUS):
        return {"__type": f"OptionSetValue:{XRM}", "Value": value}
    if kind == AttrType.MONEY:
        return {"__type": f"Money:{XRM}", "Value": value}
    if kind == AttrType.BOOLEAN:
        return bool(value)
    if kind == AttrType.DATETIME:
        return _stored_date(value)
    return value


def target(table: Table, record_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Target`` input parameter of a Create or Update: the columns the write set."""
    shown = {table.primary_id: record_id, **values}
    attributes = [
        {"key": name, "value": _xrm_value(table, name, value, values)}
        for name, value in shown.items()
        if name != "versionnumber" and not name.endswith("__type")
    ]
    version = values.get("versionnumber")
    return {
        "__type": f"Entity:{XRM}",
        "Attributes": attributes,
        "EntityState": None,
        "FormattedValues": [],
        "Id": record_id,
        "KeyAttributes": [],
        "LogicalName": table.logical_name,
        "RelatedEntities": [],
        "RowVersion": str(version) if version is not None else None,
    }


@dataclass(frozen=True)
class Delivery:
    """One queued notification: a ``_webhook_delivery`` row."""

    id: int
    operation_id: str
    step_id: str
    endpoint_id: str
    message: str
    entity: str
    record_id: str
    ordering_key: str
    event: str
    attempts: int
    created_ms: int

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Delivery:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


def execution_context(delivery: Delivery, config: SandboxConfig) -> dict[str, Any]:
    """The ``RemoteExecutionContext`` of an asynchronous post-operation step, as JSON."""
    event = json.loads(delivery.event)
    table = TABLES[delivery.entity]
    if delivery.message == "Delete":
        value = entity_reference(table.logical_name, delivery.record_id)
    else:
        value = target(table, delivery.record_id, event["values"] or {})
    outputs = [{"key": "id", "value": delivery.record_id}] if delivery.message == "Create" else []
    shared: list[dict[str, Any]] = [{"key": "IsAutoTransact", "value": True}]
    if event.get("tag") is not None:
        shared.append({"key": "tag", "value": event["tag"]})
    return {
        "BusinessUnitId": config.business_unit_id,
        "CorrelationId": event["correlation_id"],
        "Depth": 1,
        "InitiatingUserAzureActiveDirectoryObjectId": event["user_object_id"],
        "InitiatingUserId": event["user_id"],
        "InputParameters": [{"key": "Target", "value": value}],
        "IsExecutingOffline": False,
        "IsInTransaction": False,
        "IsOfflinePlayback": False,
        "IsolationMode": 1,
        "MessageName": delivery.message,
        "Mode": ASYNCHRONOUS,
        "OperationCreatedOn": dotnet_date(delivery.created_ms),
        "OperationId": delivery.operation_id,
        "OrganizationId": config.organization_id,
        "OrganizationName": config.tenant,
        "OutputParameters": outputs,
        "OwningExtension": {
            "Id": delivery.step_id,
            "KeyAttributes": [],
            "LogicalName": "sdkmessageprocessingstep",
            "Name": None,
            "RowVersion": None,
        },
        "ParentContext": None,
        "PostEntityImages": [],
        "PreEntityImages": [],
        "PrimaryEntityId": delivery.record_id,
        "PrimaryEntityName": delivery.entity,
        "RequestId": event["request_id"],
        "SecondaryEntityName": "none",
        "SharedVariables": shared,
        "Stage": POST_OPERATION,
        "UserAzureActiveDirectoryObjectId": event["user_object_id"],
        "UserId": event["user_id"],
    }
