"""Event triggers that start entity runs between cron ticks (issue 13); they run in the triggerer.

Each entity DAG with ``events`` in its file schedules on ``AssetOrTimeSchedule``: its cron, or
an asset whose :class:`~airflow.sdk.AssetWatcher` holds one of these triggers. A trigger only
says "something changed"; the run itself still reads the delta token and the cursor, so a missed
or duplicated signal costs at most one run or one cron period, never a change.

* :class:`InboxTrigger` polls the sync inbox (``sync_inbox``, filled by the operations app's
  Dataverse webhook receiver or the ``d365sync_servicebus_inbox`` DAG) with one indexed
  aggregate, the newest waiting event's id, and fires when it grows. After a triggerer restart
  it fires once if anything is waiting.
* :class:`ErpChangeTrigger` asks the ERP one question per ``poll_seconds``: the maximum of the
  entity's cursor column. It fires when that moved past the last value seen (at start: past the
  committed watermark). Our own writes move it too; the run they start finds only echoes and
  writes nothing, and then the maximum stays put.

Both do their blocking I/O (SQLAlchemy, pyodbc) in a worker thread; connections come from
Airflow (any secrets backend) through ``BaseHook.aget_connection`` in the event loop. Neither
holds a connection between polls longer than the engine's pool does, and errors are logged and
retried on the next poll: a trigger that dies stops the entity's events until a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


class _PollingTrigger(BaseEventTrigger):
    """Poll ``_probe`` every ``poll_seconds``; yield an event when it returns a new value."""

    def __init__(self, entity: str, poll_seconds: float) -> None:
        super().__init__()
        self.entity = entity
        self.poll_seconds = float(poll_seconds)

    def _kwargs(self) -> dict[str, Any]:
        return {"entity": self.entity, "poll_seconds": self.poll_seconds}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", self._kwargs()

    async def run(self) -> AsyncIterator[TriggerEvent]:
        state = await self._open()
        failures = 0
        while True:
            try:
                fired = await asyncio.to_thread(self._probe, state)
                failures = 0
            except Exception as exc:  # a poll that fails must not end the trigger
                failures += 1
                log.warning(
                    "%s for %s: poll failed (%s)", type(self).__name__, self.entity, type(exc).__name__
                )
                await asyncio.sleep(min(self.poll_seconds * 2**failures, MAX_BACKOFF))
                continue
            if fired is not None:
                yield TriggerEvent({"entity": self.entity, "source": self.source, **fired})
            await asyncio.sleep(self.poll_seconds)

    source = "?"

    async def _open(self) -> dict[str, Any]:
        raise NotImplementedError

    def _probe(self, state: dict[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError


async def _state_store_url() -> tuple[str, str | None]:
    from d365sync.airflow import settings
    from d365sync.engine.connections import state_url

    return state_url(await _engine_conn(settings.connections().state))


async def _engine_conn(conn_id: str) -> Any:
    from airflow.sdk import BaseHook

    from d365sync.engine.connections import Conn

    c = await BaseHook.aget_connection(conn_id)
    # the sync extra_dejson masks secrets through a call that blocks the triggerer's event loop
    return Conn.of(conn_id, c, await c.aextra_dejson())


class InboxTrigger(_PollingTrigger):
    """Fires when the sync inbox holds a waiting notification newer than the last one seen."""

    source = "dataverse_webhook"

    def __init__(self, entity: str, poll_seconds: float = 1.0) -> None:
        super().__init__(entity, poll_seconds)

    async def _open(self) -> dict[str, Any]:
        url, schema = await _state_store_url()
        return {"url": url, "schema": schema, "store": None, "seen": 0}

    def _probe(self, state: dict[str, Any]) -> dict[str, Any] | None:
        if state["store"] is None:
            from d365sync.engine.state import StateStore

            state["store"] = StateStore.open(state["url"], schema=state["schema"])
        head = state["store"].inbox_head(self.entity, waiting_only=True)
        if head <= state["seen"]:
            return None
        state["seen"] = head
        return {"head": head}


class ErpChangeTrigger(_PollingTrigger):
    """Fires when the maximum of the entity's ERP cursor column moves (one query per poll)."""

    source = "erp_poll"

    def __init__(self, entity: str, poll_seconds: float = 5.0) -> None:
        super().__init__(entity, poll_seconds)

    async def _open(self) -> dict[str, Any]:
        from airflow.sdk import BaseHook

        from d365sync.airflow import settings

        url, schema = await _state_store_url()
        erp_conn = await BaseHook.aget_connection(settings.connections().erp)
        return {"url": url, "schema": schema, "erp_conn": erp_conn, "erp": None, "seen": None}

    def _probe(self, state: dict[str, Any]) -> dict[str, Any] | None:
        from d365sync.engine.events import committed_erp_cursor, erp_cursor_max

        spec = _spec(self.entity)
        if state["erp"] is None:
            from d365sync.airflow.erp_hook import ErpOdbcHook
            from d365sync.engine.state import StateStore

            with StateStore.open(state["url"], schema=state["schema"]) as store:
                state["seen"] = committed_erp_cursor(store, self.entity)
            state["erp"] = ErpOdbcHook(connection=state["erp_conn"]).get_client()
        current = erp_cursor_max(state["erp"], spec)
        if current is None or (state["seen"] is not None and current <= state["seen"]):
            return None
        state["seen"] = current
        return {"cursor": current.isoformat()}


def _spec(entity: str) -> Any:
    from d365sync.airflow.dag_factory import load_specs

    return load_specs()[entity]
