"""Extract: read what changed on one side into chunk files; stage (never commit) the watermark.

* Dynamics: the change feed from the committed delta token (a full read the first time or when
  the token expired), or, in a backfill, the ``modifiedon`` window ``[start, end)``. A full
  read shows no deletes, so key-mapped records it did not return become deletes (as below).
* ERP: the cursor column from the committed cursor minus the overlap window, or the backfill's
  cursor window; tables without a trustworthy timestamp (``mode: snapshot``) are read whole and
  the merge's base comparison does the diff (unchanged rows are echoes and write nothing), and
  stored keys no longer present become deletes.

Records that earlier runs could not finish (dead letters, parked children) are retried here by
reading them again from the source (see :class:`_Pending`), after the changes, so every later
stage treats them like extracted rows and a key is never extracted twice on one side.

Each file entry: ``{"key", "row", "deleted", "id", "replay", "repair", "retry"}``; ``row`` uses the
side's read names. Manifest: ``{"side", "files", "rows", "deletes", "replayed", "watermark",
"full_load"}``; ``full_load`` is true when this side was read whole for want of a watermark.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from d365sync.engine.stages.context import (
    SIDES,
    Manifest,
    RunContext,
    Side,
    aware,
    chunked,
    norm_key,
    now,
)


def extract(ctx: RunContext, side: Side) -> Manifest:
    """Read one side's changes into ``extract/<side>/NNNNN.parquet`` and stage its watermark."""
    run = Extraction(ctx, side)
    return run.finish(run.write())


class Extraction:
    """One side's extract as a stream of chunks (:meth:`chunks`); :meth:`finish` stages the
    watermark once the stream is read. :func:`extract` writes the chunks to files; a run that
    holds every stage in one process may hand them to validation directly."""

    def __init__(self, ctx: RunContext, side: Side) -> None:
        self.ctx, self.side = ctx, side
        self.pending = _Pending.load(ctx, side)
        self.full = ctx.window is None and ctx.store.watermark(ctx.entity, side) is None
        changes, self._watermark = _dynamics_changes(ctx) if side == "dynamics" else _erp_changes(ctx)
        self._streams = [self.pending.mark(changes), self.pending.reread()]
        self.counts = {"rows": 0, "deletes": 0, "replayed": 0}
        self.manifest: Manifest | None = None

    def row_bound(self) -> int | None:
        """About how many entries the ERP side yields when it reads its table whole (a first or
        snapshot read: the table's rows, plus the due retries); None when it reads changes only,
        whose number is unknown until they are read."""
        spec, ctx = self.ctx.spec, self.ctx
        whole = spec.erp.change_detection.mode == "snapshot" or self.full
        if self.side != "erp" or not whole or not hasattr(ctx.erp, "count_rows"):
            return None
        return int(ctx.erp.count_rows(ctx.erp_table)) + len(self.pending.due)

    def chunks(self) -> Iterator[list[dict[str, Any]]]:
        ctx, counts = self.ctx, self.counts
        progress = ctx.progress(f"extract_{self.side}")
        for stream in self._streams:
            for chunk in chunked(stream, ctx.chunk_size):
                counts["rows"] += len(chunk)
                counts["deletes"] += sum(1 for e in chunk if e["deleted"])
                counts["replayed"] += sum(1 for e in chunk if e["retry"])
                progress.add(len(chunk))
                yield chunk
        progress.finish()

    def write(self) -> list[str]:
        """Every chunk into ``extract/<side>/NNNNN.parquet``; the file names in order."""
        staging, side = self.ctx.staging, self.side
        return [
            staging.write(f"extract/{side}/{i:05d}.parquet", chunk) for i, chunk in enumerate(self.chunks())
        ]

    def finish(self, files: list[str]) -> Manifest:
        """The manifest, once :meth:`chunks` is read to its end; stages the watermark."""
        ctx = self.ctx
        manifest: Manifest = {"side": self.side, "files": files, **self.counts}
        mark = self._watermark()
        manifest["full_load"] = self.full or bool(mark.get("full_resync"))
        manifest["watermark"] = {k: _plain(v) for k, v in mark.items()}
        if not ctx.dry_run:
            ctx.store.stage_watermark(
                ctx.entity, self.side, ctx.run_id, mark["value"], mark["token"], backfill=ctx.backfill
            )
        self.manifest = manifest
        return manifest


def _entry(key: Any, row: dict[str, Any], *, deleted: bool = False, id_: str | None = None) -> dict[str, Any]:
    return {
        "key": norm_key(key),
        "row": row if type(row) is dict else dict(row),  # the ERP client's Row: staged as plain data
        "deleted": deleted,
        "id": id_,
        "replay": None,  # markers of the dead letters / parked children this row may finish
        "repair": False,  # a reconcile repair: the merge compares this side with the base by value
        "retry": False,  # re-read for a retry, not changed at the source since: no invalid share
    }


# ------------------------------------------------------------------------------ retries
@dataclass
class _Pending:
    """The records earlier runs could not finish (dead letters, parked children) on one side.

    A retry never re-injects the stored payload: that copy is stale once the source moves on.
    A fresh extract of a pending key carries the markers of its letters, so it resolves them
    when it goes through (the fresher version supersedes the older one); a due key that did not
    change is re-read from the source as it is now (``retry``). A due key the source no longer
    has comes back as a delete: its current state is "gone".
    """

    ctx: RunContext
    side: Side
    markers: dict[str, list[list[Any]]] = field(default_factory=dict)
    due: dict[str, bool] = field(default_factory=dict)  # key → re-read it as a repair
    ids: dict[str, str] = field(default_factory=dict)  # key → Dataverse GUID from the payload
    seen: set[str] = field(default_factory=set)

    letters: set[int] = field(default_factory=set)  # dead letters already added

    @classmethod
    def load(cls, ctx: RunContext, side: Side) -> _Pending:
        """Due letters and parked children up front; the other letters of a key only when a fresh
        row of it comes (:meth:`mark`), so a run's cost does not follow the queue's length."""
        pending = cls(ctx, side)
        for letter in ctx.store.due_dead_letters(ctx.entity, limit=ctx.retries_per_run):
            pending.add_letter(letter, due=True)
        ready = {child.id for child in ctx.store.ready_children(ctx.entity)}
        for child in ctx.store.parked_children(ctx.entity):
            pending.add(
                child.record_key, child.payload, ["parked", child.id, child.record_key], child.id in ready
            )
        return pending

    def add_letter(self, letter: Any, due: bool) -> None:
        if letter.id not in self.letters:
            self.letters.add(letter.id)
            marker = ["dead_letter", letter.stage, letter.record_key]
            self.add(letter.record_key, letter.payload, marker, due)

    def add(self, key: str, payload: Any, marker: list[Any], due: bool) -> None:
        payload = payload if isinstance(payload, dict) else {}
        rows = {r.get("side"): r.get("row") or {} for r in payload.get("rows", [])}
        if self.side not in rows:
            return
        self.markers.setdefault(key, []).append([*marker, sorted(s for s in rows if s in SIDES)])
        if self.side == "dynamics" and (guid := rows["dynamics"].get(self.ctx.dynamics_select[0])):
            self.ids[key] = str(guid).lower()
        if due:
            self.due[key] = self.due.get(key, False) or self.side in payload.get("repair", ())

    def mark(self, entries: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Fresh entries of pending keys carry their markers (matched by GUID too: a Dataverse row
        queued before it had a key is the same record once it has one)."""
        for batch in chunked(entries, self.ctx.chunk_size):
            if not self.ctx.fresh:
                names = {name for e in batch for name in (e["key"], e["id"]) if name}
                for letter in self.ctx.store.active_dead_letters(self.ctx.entity, keys=sorted(names)):
                    self.add_letter(letter, due=False)
            by_guid = {guid: key for key, guid in self.ids.items()}
            for entry in batch:
                key = entry["key"] if entry["key"] in self.markers else by_guid.get(entry["id"] or "")
                if key is not None:
                    self.seen.add(key)
                    entry["replay"] = self.markers[key]
                yield entry

    def reread(self) -> Iterator[dict[str, Any]]:
        """Due keys that did not change: their current source rows (a delete when gone)."""
        keys = [k for k in self.due if k not in self.seen]
        if not keys:
            return
        found: set[str] = set()
        for key, row in self._current(keys):
            found.add(key)
            yield self._retry(_entry(key, row, id_=self.ids.get(key)), key)
        for key in keys:
            if key not in found:
                yield self._retry(_entry(key, {}, deleted=True, id_=self.ids.get(key)), key)

    def _retry(self, entry: dict[str, Any], key: str) -> dict[str, Any]:
        return {**entry, "replay": self.markers[key], "repair": self.due[key], "retry": True}

    def _current(self, keys: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        spec, wanted = self.ctx.spec, set(keys)
        if self.side == "erp":
            column = str(spec.fields[spec.key].erp)
            for chunk in self.ctx.erp.read_keys(spec.erp_table_spec(), column, keys, self.ctx.chunk_size):
                for row in chunk:
                    if (key := norm_key(row.get(column))) in wanted:
                        yield key, row
            return
        yield from self._current_dynamics(keys)

    def _current_dynamics(self, keys: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """Rows by GUID where the key map knows one, else by key: ``Microsoft.Dynamics.CRM.In``
        reads of a few hundred values each; a row both reads find comes once."""
        spec = self.ctx.spec
        primary, key_attr = spec.dynamics_select[0], spec.dynamics.key
        by_id = {self.ids[k]: k for k in keys if k in self.ids}
        by_key = [k for k in keys if k not in self.ids]
        seen: set[str] = set()
        for attribute, values in ((primary, list(by_id)), (key_attr, by_key)):
            rows = self.ctx.dynamics.iter_in(
                spec.dynamics.entity_set, spec.dynamics_select, attribute, values
            )
            for row in rows:
                row_id = str(row.get(primary) or "").lower()
                key = by_id.get(row_id) or norm_key(row.get(key_attr))
                if key in self.due and row_id not in seen:
                    seen.add(row_id)
                    yield key, row


# ---------------------------------------------------------------------------- Dynamics
def _dynamics_changes(ctx: RunContext) -> tuple[Iterator[dict[str, Any]], Any]:
    spec, client = ctx.spec, ctx.dynamics
    entity_set, select, key = spec.dynamics.entity_set, spec.dynamics_select, spec.dynamics.key
    started = now()
    if ctx.window is not None:
        rows = client.iter_window(entity_set, select, ctx.window.start, ctx.window.end)
        end = ctx.window.end
        entries = (_entry(r.get(key), r, id_=str(r.get(select[0]) or "").lower() or None) for r in rows)
        return entries, lambda: {"value": end, "token": None}
    mark = ctx.store.watermark(ctx.entity, "dynamics")
    token = mark.token if mark else None
    feed = client.iter_changes(entity_set, select, token, id_attribute=select[0])
    seen = _Seen()

    def changes() -> Iterator[dict[str, Any]]:
        for change in feed:
            if change.kind == "delete":
                yield _entry(None, {}, deleted=True, id_=str(change.id).lower())
            else:
                entry = _entry(change.row.get(key), change.row, id_=(change.id or "").lower() or None)
                seen.add(entry["key"], entry["id"])
                yield entry
        # A full read (no token yet, or the token expired) lists every row but no deletes: a
        # record the key map pairs with a Dynamics row that is no longer there was deleted.
        if (token is None or feed.full_resync) and ctx.spec.deletes.to_erp != "ignore":
            yield from _vanished(ctx, "dynamics", seen)

    return changes(), lambda: {"value": started, "token": feed.delta_token, "full_resync": feed.full_resync}


# --------------------------------------------------------------------------------- ERP
def _erp_changes(ctx: RunContext) -> tuple[Iterator[dict[str, Any]], Any]:
    spec = ctx.spec
    if spec.erp.change_detection.mode == "snapshot":
        return _erp_snapshot(ctx)
    from d365sync.erp import ExtractCursor

    table, key_column = spec.erp_table_spec(), spec.fields[spec.key].erp
    if ctx.window is not None:
        since, until, overlap = ExtractCursor(value=ctx.window.start.replace(tzinfo=None)), ctx.window.end, 0
        until = until.replace(tzinfo=None)
    else:
        mark = ctx.store.watermark(ctx.entity, "erp")
        since = ExtractCursor.from_dict(json.loads(mark.token)) if mark and mark.token else None
        until, overlap = None, _overlap(spec)
    stream = ctx.erp.extract_changes(table, since, overlap=overlap, until=until, chunk_size=ctx.chunk_size)
    rows = (_erp_entry(r.get(key_column), r) for chunk in stream for r in chunk)

    def watermark() -> dict[str, Any]:
        cursor = stream.cursor
        value = aware(cursor.value) if cursor.value is not None else None
        if ctx.window is not None:
            return {"value": aware(ctx.window.end), "token": None}
        return {"value": value, "token": json.dumps(cursor.to_dict())}

    return rows, watermark


def _erp_entry(key: Any, row: dict[str, Any]) -> dict[str, Any]:
    """An ERP row's entry, with ``error``: None, or the values the ERP client could not convert.

    ``error`` lists ``erp.UnreadableValue.as_dict()``: ``{"table", "key", "column", "rule",
    "message", "value"}`` per value (a CHAR(8) date ``'20231399'``, ``'N/A'`` in a DECIMAL
    column), ``value`` as read. Such a row keeps those values as read; validate dead-letters it
    before any expectation runs, never loads it, while the rest of the extract flows and the
    cursor moves past it. Entries made elsewhere (replays, Dataverse rows) have no ``error``.
    """
    errors = [problem.as_dict() for problem in getattr(row, "errors", ())]
    return {**_entry(key, row), "error": errors or None}


def _overlap(spec: Any) -> Any:
    from datetime import timedelta

    detection = spec.erp.change_detection
    return timedelta(seconds=getattr(detection, "overlap_seconds", 300))


def _erp_snapshot(ctx: RunContext) -> tuple[Iterator[dict[str, Any]], Any]:
    """Whole table in key order; stored keys that are gone become deletes (unless ignored)."""
    table, key_column = ctx.spec.erp_table_spec(), ctx.spec.fields[ctx.spec.key].erp
    seen = _Seen()
    started = now()

    def rows() -> Iterator[dict[str, Any]]:
        for chunk in ctx.erp.iter_rows(table, chunk_size=ctx.chunk_size):
            for row in chunk:
                key = norm_key(row.get(key_column))
                seen.add(key or "")
                yield _erp_entry(key, row)
        if ctx.spec.deletes.to_dynamics != "ignore":
            yield from _vanished(ctx, "erp", seen)

    return rows(), lambda: {"value": started, "token": None}


# ------------------------------------------------------------------------ full reads
class _Seen:
    """Keys (and Dynamics ids) a full read of one side returned."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.ids: set[str] = set()

    def add(self, key: str | None, id_: str | None = None) -> None:
        if key is not None:
            self.keys.add(key)
        if id_ is not None:
            self.ids.add(id_)


def _vanished(ctx: RunContext, side: Side, seen: _Seen) -> Iterator[dict[str, Any]]:
    """After a full read of ``side``: key map records that were synced there, are not deleted
    yet and were not read, as delete entries (the merge applies the entity's delete policy).

    ERP records are known by key. Dynamics records need a stored GUID and count as present
    when either their GUID or their key was read (a row re-created under the same key is not
    a delete). Only called after full reads: a delta or a backfill window lists only what
    changed, so a record absent from it is merely unchanged.
    """
    for records in ctx.store.iter_base(ctx.entity):
        for stored in records:
            base, key = stored.base, stored.erp_key
            if base is None or base.deleted_on is not None or key is None or key in seen.keys:
                continue
            if side == "erp":
                yield _entry(key, {}, deleted=True)
            elif stored.dynamics_id is not None and stored.dynamics_id not in seen.ids:
                yield _entry(key, {}, deleted=True, id_=stored.dynamics_id)


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value
