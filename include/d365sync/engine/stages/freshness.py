"""Dynamics-side optimistic concurrency: never overwrite a change made after this run's extract.

The ERP side guards updates with ``ROW_VER``. Dataverse's bulk ``UpsertMultiple`` takes no
``If-Match``, and a read per record (or an ``In()`` read of every id) would multiply the
requests of the common path. Instead, just before each chunk is written, one change-tracking
read from the delta token the extract staged lists what changed in Dataverse *since the
extract*; usually nothing, so the check costs one request per chunk (5,000 records). Between
chunks the feed's own new token is carried forward, so each change is read once.

A record to write that appears there (updated, deleted, or created under the key we are about
to create) was merged against a state that no longer exists. Its writes on this side are
deferred: it goes to the dead-letter queue at stage ``load`` with the newest rows of both
sides, due at once, so the next run re-reads both sides and merges the user's edit with ours
(field-level, by the entity's rules). Nothing is overwritten and nothing is lost.

A backfill has no delta token (it reads a ``modifiedon`` window), and records it did not read
were merged against their base. Its check reads the rows modified since the window's start by
anyone but the sync's own application user (``WhoAmI``): a row the merge read defers when its
``versionnumber`` moved; a row it did not read defers when it was modified after the
``modifiedon`` its base recorded. The sync's own earlier writes never defer anything.

What remains: an edit landing between this check and the write it precedes (the time of one
request) is not seen; README.md ("load") and BENCHMARKS.md give the cost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from d365sync.engine.stages.context import CLOCK_MARGIN, RunContext, aware, norm_key, now

log = logging.getLogger(__name__)

GONE = "(deleted)"


@dataclass
class Freshness:
    """Dataverse records changed since the extract: GUID → version (``GONE`` when deleted)."""

    ctx: RunContext
    token: str | None = None
    since: datetime | None = None
    versions: dict[str, str] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)  # alternate key → GUID
    modified: dict[str, datetime | None] = field(default_factory=dict)  # window mode: GUID → modifiedon
    ours: str | None = None  # window mode: the sync's application user
    checks: int = 0

    @classmethod
    def start(cls, ctx: RunContext) -> Freshness:
        mark = ctx.store.staged_watermark(ctx.entity, "dynamics", ctx.run_id)
        if ctx.window is not None:
            return cls(ctx, since=ctx.window.start)
        return cls(ctx, token=mark.token if mark else None)

    def refresh(self) -> None:
        """Read what changed since the last check (the first: since the extract)."""
        if self.token is None and self.since is None:
            return
        spec, client = self.ctx.spec, self.ctx.dynamics
        select, entity_set = spec.dynamics_select, spec.dynamics.entity_set
        self.checks += 1
        if self.token is not None:
            feed = client.iter_changes(entity_set, select, self.token, id_attribute=select[0])
            for change in feed:
                self._note(change.id, change.row if change.kind != "delete" else None)
            if feed.full_resync:  # the token expired mid-run: a full read says nothing new
                log.warning("Delta token expired during the load; freshness check skipped")
                self.versions.clear()
                self.by_key.clear()
            self.token = feed.delta_token
            return
        self._refresh_window(client, entity_set)

    def advance_past(self, created: set[str]) -> bool:
        """Stage a delta token past this run's own creates, when the feed holds nothing else.

        One read of the change feed from the last check. Every row must be a record this load
        created (``created`` GUIDs) that nobody touched since: created and last modified by the
        sync's own user, ``modifiedon == createdon``. Anything else (a person's edit or create, a
        delete, a plug-in's update) stops the read and leaves the extract's token staged, so the
        next run reads all of it. Returns whether the token moved.
        """
        audit = ("_createdby_value", "_modifiedby_value", "createdon", "modifiedon")
        if self.token is None or not self.ctx.spec.dynamics_has("createdby", "modifiedby", *audit[2:]):
            return False
        client, entity_set = self.ctx.dynamics, self.ctx.spec.dynamics.entity_set
        ours = str(client.whoami().get("UserId") or "").lower()
        # the id and the audit columns only: a delta token is a position in the table's change
        # history, not bound to the columns read with it (the next run reads with its own)
        select = [self.ctx.dynamics_select[0], *audit]
        feed = client.iter_changes(entity_set, select, self.token, id_attribute=select[0])
        self.checks += 1
        for change in feed:
            row = change.row if change.kind != "delete" else None
            if row is None or not _own_create(row, str(change.id or "").lower(), created, ours):
                log.info("Delta token not advanced: %s changed in Dataverse during the load", change.id)
                return False
        if feed.full_resync:
            return False
        mark = self.ctx.store.staged_watermark(self.ctx.entity, "dynamics", self.ctx.run_id)
        value = mark.value if mark is not None else None
        self.ctx.store.stage_watermark(self.ctx.entity, "dynamics", self.ctx.run_id, value, feed.delta_token)
        self.token = feed.delta_token
        return True

    def _refresh_window(self, client: Any, entity_set: str) -> None:
        from d365sync.dynamics.odata import format_datetime

        spec, checked = self.ctx.spec, now()
        if self.ours is None:
            self.ours = str(client.whoami().get("UserId") or "").lower()
        primary = spec.dynamics_select[0]
        select = [primary, spec.dynamics.key, "versionnumber", "modifiedon", "_modifiedby_value"]
        since = self.since if self.checks == 1 else self.since - CLOCK_MARGIN  # type: ignore[operator]
        where = f"modifiedon ge {format_datetime(since)}"
        for row in client.iter_rows(entity_set, select, filter=where):
            if str(row.get("_modifiedby_value") or "").lower() == self.ours:
                self.by_key.setdefault(norm_key(row.get(spec.dynamics.key)) or "", str(row[primary]).lower())
                continue  # our own earlier write: the base already accounts for it
            self._note(row.get(primary), row)
            self.modified[str(row[primary]).lower()] = aware(row.get("modifiedon"))
        self.since = checked

    def _note(self, guid: Any, row: Mapping[str, Any] | None) -> None:
        guid = str(guid or "").lower()
        if not guid:
            return
        self.versions[guid] = GONE if row is None else str(row.get("versionnumber"))
        if row is not None and (key := norm_key(row.get(self.ctx.spec.dynamics.key))) is not None:
            self.by_key[key] = guid

    def moved(self, entry: Mapping[str, Any]) -> str | None:
        """Why this record's Dynamics write must wait, or None when nothing moved under it."""
        write = entry["writes"]["dynamics"]
        guid = str(entry.get("dynamics_id") or "").lower() or self.by_key.get(entry["key"], "")
        if write["op"] == "create":
            found = self.by_key.get(entry["key"])
            return f"created in Dynamics by someone else since extract (id {found})" if found else None
        current = self.versions.get(guid)
        if current is None:
            return None
        seen = (entry["raw"].get("dynamics") or {}).get("versionnumber")
        if current == GONE:
            return "deleted in Dynamics since extract"
        if seen is not None and str(seen) == current:
            return None
        if seen is None and guid in self.modified and not self._after_base(entry, self.modified[guid]):
            return None  # a backfill: not read, and unchanged since the base the merge used
        return f"changed in Dynamics since extract (versionnumber {seen or 'not read'} -> {current})"

    @staticmethod
    def _after_base(entry: Mapping[str, Any], modified: datetime | None) -> bool:
        known = aware((entry.get("base") or {}).get("dynamics_modified"))
        return modified is None or known is None or modified > known

    def current_row(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """The Dynamics side of a deferred record's letter: its GUID, so the retry re-reads it."""
        primary = self.ctx.dynamics_select[0]
        guid = str(entry.get("dynamics_id") or "").lower() or self.by_key.get(entry["key"])
        row = dict(entry["raw"].get("dynamics") or {})
        if guid:
            row[primary] = guid
        row.setdefault(self.ctx.spec.dynamics.key, entry["key"])
        return row


def _own_create(row: Mapping[str, Any], guid: str, created: set[str], ours: str) -> bool:
    """A row this load created and nobody changed since (the sync's user, one timestamp)."""
    by = (str(row.get("_createdby_value") or "").lower(), str(row.get("_modifiedby_value") or "").lower())
    return guid in created and by == (ours, ours) and row.get("createdon") == row.get("modifiedon")
