"""Registering the sync's Dataverse webhook: one service endpoint, one step per table and message.

Dataverse keeps a webhook as a ``serviceendpoint`` (``contract`` 8) and the events that call it
as ``sdkmessageprocessingstep`` rows, each naming a message (``sdkmessage``: Create, Update,
Delete) and a table (``sdkmessagefilter``).  This module writes them through the Web API only,
finding the message and filter ids with the same queries one runs against a real environment,
so it works against Dataverse and the project's sandbox alike.

:func:`register_webhook` is idempotent: the endpoint is found by name (created, or updated to the
given URL and key), each step by its name (``<name>: Update of account``) among the endpoint's
steps; missing steps are created, changed ones updated, and steps of the endpoint that the
tables no longer ask for are deleted.  Steps are asynchronous, post-operation (stage 40), and
delete their system job when they succeed.  ``Update`` steps carry the filtering attributes, so
Dataverse calls only when a request sets one of them.  The key goes as HttpHeader
authentication (header ``x-d365sync-webhook-key``, which the operations app's receiver reads),
not as WebhookKey's ``?code=<key>``, which would put it in every URL that proxies and access logs
record; it is write-only in Dataverse and never logged here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from d365sync.dynamics.client import DynamicsClient
from d365sync.dynamics.errors import DynamicsError
from d365sync.dynamics.odata import literal

MESSAGES = ("Create", "Update", "Delete")
WEBHOOK_CONTRACT = 8
HTTP_HEADER_AUTH = 5
KEY_HEADER = "x-d365sync-webhook-key"  # what the operations app's receiver reads
JSON_FORMAT = 2
ASYNCHRONOUS = 1
POST_OPERATION = 40
_STEP_COLUMNS = [
    "sdkmessageprocessingstepid",
    "name",
    "mode",
    "stage",
    "statecode",
    "filteringattributes",
    "_sdkmessageid_value",
    "_sdkmessagefilterid_value",
]


@dataclass(frozen=True)
class TableEvents:
    """The events of one table that call the webhook."""

    table: str
    """Logical name (``account``)."""
    messages: tuple[str, ...] = MESSAGES
    filtering_attributes: tuple[str, ...] = ()
    """Logical names; an Update step fires only for requests that set one of them (all when
    empty)."""


TableSpec = TableEvents | tuple[str, Sequence[str], Sequence[str]]
Tables = Mapping[str, Sequence[str]] | Iterable[TableSpec]
"""``{"account": ["name", …]}`` (all messages, these filtering attributes), or a list of
:class:`TableEvents` / ``(table, messages, filtering attributes)``."""


@dataclass
class Registration:
    """What :func:`register_webhook` found and did (step names per outcome)."""

    endpoint_id: str
    endpoint_created: bool
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "endpoint_id": self.endpoint_id,
            "endpoint": "created" if self.endpoint_created else "updated",
            "steps": {
                "created": self.created,
                "updated": self.updated,
                "unchanged": self.unchanged,
                "deleted": self.deleted,
            },
        }


def normalize(tables: Tables) -> list[TableEvents]:
    """One :class:`TableEvents` per table (entries for the same table merged), checked."""
    items: Iterable[TableSpec]
    if isinstance(tables, Mapping):
        items = [TableEvents(t, MESSAGES, tuple(attrs)) for t, attrs in tables.items()]
    else:
        items = tables
    merged: dict[str, TableEvents] = {}
    for item in items:
        events = (
            item if isinstance(item, TableEvents) else TableEvents(item[0], tuple(item[1]), tuple(item[2]))
        )
        unknown = [m for m in events.messages if m not in MESSAGES]
        if unknown:
            raise ValueError(f"{events.table}: unsupported message(s) {unknown}; use {', '.join(MESSAGES)}")
        before = merged.get(events.table.lower())
        merged[events.table.lower()] = TableEvents(
            events.table.lower(),
            _union(before.messages if before else (), events.messages),
            _union(
                before.filtering_attributes if before else (),
                [a.lower() for a in events.filtering_attributes],
            ),
        )
    if not merged:
        raise ValueError("name at least one table")
    return list(merged.values())


def _union(first: Iterable[str], second: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*first, *second]))


def step_name(name: str, table: str, message: str) -> str:
    """The name a registration gives its step; how a later run finds it again."""
    return f"{name}: {message} of {table}"


def register_webhook(
    client: DynamicsClient, *, name: str, url: str, key: str, tables: Tables
) -> Registration:
    """Create or update the webhook ``name`` calling ``url`` with ``key`` for the events of
    ``tables``; returns what changed.  Safe to run again: a second run changes nothing."""
    if not key:
        raise ValueError("the webhook key is empty")
    wanted = normalize(tables)
    endpoint_id, created = _ensure_endpoint(client, name, url, key)
    registration = Registration(endpoint_id, created)
    steps = _desired_steps(client, name, endpoint_id, wanted)
    existing = _endpoint_steps(client, endpoint_id)
    for step, body in steps.items():
        found = existing.pop(step, [])
        for duplicate in found[1:]:
            client.delete("sdkmessageprocessingsteps", duplicate["sdkmessageprocessingstepid"])
        if not found:
            client.create("sdkmessageprocessingsteps", body)
            registration.created.append(step)
        elif _differs(found[0], body):
            enable = {} if found[0]["statecode"] == 0 else {"statecode": 0, "statuscode": 1}
            client.update("sdkmessageprocessingsteps", found[0]["sdkmessageprocessingstepid"], body | enable)
            registration.updated.append(step)
        else:
            registration.unchanged.append(step)
    for step, rows in existing.items():  # the endpoint's steps no table asks for any more
        for row in rows:
            client.delete("sdkmessageprocessingsteps", row["sdkmessageprocessingstepid"])
        registration.deleted.append(step)
    return registration


def unregister_webhook(client: DynamicsClient, name: str) -> list[str]:
    """Delete the webhook ``name`` and its steps; returns the names of the steps deleted (empty,
    and nothing done, when there is no such webhook)."""
    deleted: list[str] = []
    for endpoint in _endpoints(client, name):
        endpoint_id = endpoint["serviceendpointid"]
        for step, rows in _endpoint_steps(client, endpoint_id).items():
            for row in rows:
                client.delete("sdkmessageprocessingsteps", row["sdkmessageprocessingstepid"])
            deleted.append(step)
        client.delete("serviceendpoints", endpoint_id)
    return deleted


def webhook_steps(client: DynamicsClient, name: str) -> dict[str, list[dict[str, Any]]]:
    """The steps of the webhook ``name`` by step name (empty when it is not registered)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for endpoint in _endpoints(client, name):
        found.update(_endpoint_steps(client, endpoint["serviceendpointid"]))
    return found


# -- the endpoint ----------------------------------------------------------------------------------
def header_settings(headers: Mapping[str, str]) -> str:
    """``authvalue`` of HttpHeader authentication: ``<settings><setting name=… value=…/></settings>``."""
    from xml.sax.saxutils import quoteattr

    items = "".join(f"<setting name={quoteattr(k)} value={quoteattr(v)} />" for k, v in headers.items())
    return f"<settings>{items}</settings>"


def _endpoints(client: DynamicsClient, name: str) -> list[dict[str, Any]]:
    where = f"name eq {literal(name)} and contract eq {WEBHOOK_CONTRACT}"
    return list(client.iter_rows("serviceendpoints", ["serviceendpointid", "name", "url"], filter=where))


def _ensure_endpoint(client: DynamicsClient, name: str, url: str, key: str) -> tuple[str, bool]:
    body = {
        "name": name,
        "description": "d365sync change notifications (registered by `d365sync events register`)",
        "contract": WEBHOOK_CONTRACT,
        "url": url,
        # HttpHeader authentication: the key travels in a header, never in the URL (which
        # proxies and access logs record), unlike WebhookKey's ``?code=``.
        "authtype": HTTP_HEADER_AUTH,
        "authvalue": header_settings({KEY_HEADER: key}),
        "messageformat": JSON_FORMAT,
    }
    found = _endpoints(client, name)
    if len(found) > 1:
        ids = ", ".join(e["serviceendpointid"] for e in found)
        raise DynamicsError(f"{len(found)} webhooks are named {name!r} ({ids}); delete all but one")
    if found:
        # The key cannot be read back to compare, so the endpoint is always written.
        client.update("serviceendpoints", found[0]["serviceendpointid"], body)
        return found[0]["serviceendpointid"], False
    return client.create("serviceendpoints", body), True


# -- the steps -------------------------------------------------------------------------------------
def _desired_steps(
    client: DynamicsClient, name: str, endpoint_id: str, wanted: list[TableEvents]
) -> dict[str, dict[str, Any]]:
    messages = _message_ids(client, {m for t in wanted for m in t.messages})
    steps: dict[str, dict[str, Any]] = {}
    for events in wanted:
        filters = _filter_ids(client, events.table, messages)
        for message in events.messages:
            if message not in filters:
                raise DynamicsError(
                    f"Dataverse has no {message} message filter for the table {events.table!r}"
                )
            step = step_name(name, events.table, message)
            attributes = ",".join(events.filtering_attributes) if message == "Update" else ""
            steps[step] = {
                "name": step,
                "description": f"Calls the {name} webhook on {message} of {events.table}.",
                "mode": ASYNCHRONOUS,
                "stage": POST_OPERATION,
                "rank": 1,
                "supporteddeployment": 0,
                "asyncautodelete": True,
                "filteringattributes": attributes or None,
                "sdkmessageid@odata.bind": f"/sdkmessages({messages[message]})",
                "sdkmessagefilterid@odata.bind": f"/sdkmessagefilters({filters[message]})",
                "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({endpoint_id})",
            }
    return steps


def _message_ids(client: DynamicsClient, names: set[str]) -> dict[str, str]:
    where = " or ".join(f"name eq {literal(n)}" for n in sorted(names))
    rows = client.iter_rows("sdkmessages", ["sdkmessageid", "name"], filter=where)
    found = {row["name"]: row["sdkmessageid"] for row in rows}
    missing = sorted(names - set(found))
    if missing:
        raise DynamicsError(f"Dataverse has no sdkmessage named {', '.join(missing)}")
    return found


def _filter_ids(client: DynamicsClient, table: str, messages: Mapping[str, str]) -> dict[str, str]:
    """The ``sdkmessagefilterid`` of ``table`` for each message (missing when the table does not
    support that message)."""
    by_id = {message_id: name for name, message_id in messages.items()}
    any_message = " or ".join(f"_sdkmessageid_value eq {message_id}" for message_id in by_id)
    where = (
        f"primaryobjecttypecode eq {literal(table)} and secondaryobjecttypecode eq 'none' and ({any_message})"
    )
    rows = client.iter_rows("sdkmessagefilters", ["sdkmessagefilterid", "_sdkmessageid_value"], filter=where)
    return {by_id[row["_sdkmessageid_value"]]: row["sdkmessagefilterid"] for row in rows}


def _endpoint_steps(client: DynamicsClient, endpoint_id: str) -> dict[str, list[dict[str, Any]]]:
    rows = client.iter_rows(
        "sdkmessageprocessingsteps", _STEP_COLUMNS, filter=f"_eventhandler_value eq {endpoint_id}"
    )
    steps: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        steps.setdefault(row["name"], []).append(row)
    return steps


def _differs(row: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """Whether an existing step needs the update ``body`` (enabled, same message, table, mode,
    stage and filtering attributes)."""

    def bound(key: str) -> str:
        return str(body[f"{key}@odata.bind"]).rsplit("(", 1)[1].rstrip(")")

    def attributes(text: str | None) -> set[str]:
        return {a.strip().lower() for a in (text or "").split(",") if a.strip()}

    return (
        row["statecode"] != 0
        or row["mode"] != body["mode"]
        or row["stage"] != body["stage"]
        or row["_sdkmessageid_value"] != bound("sdkmessageid")
        or row["_sdkmessagefilterid_value"] != bound("sdkmessagefilterid")
        or attributes(row["filteringattributes"]) != attributes(body["filteringattributes"])
    )
