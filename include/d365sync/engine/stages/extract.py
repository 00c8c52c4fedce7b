"""Extract: read what changed on one side into chunk files; stage (never commit) the watermark.

* Dynamics: the change feed from the committed delta token (a full read the first time or when
  the token expired), or, in a backfill, the ``modifiedon`` window ``[start, end)``.
* ERP: the cursor column from the committed cursor minus the overlap window, or the backfill's
  cursor window; tables without a trustworthy timestamp (``mode: snapshot``) are read whole and
  the merge's base comparison does the diff (unchanged rows are echoes and write nothing), and
  stored keys no longer present become deletes.

Rows that earlier runs could not finish are re-injected here, so every later stage treats them
like extracted rows: due dead letters (with backoff) and parked children whose parent is now
synced. They are written first, so a fresher extracted row of the same key wins in resolve.

Each file entry: ``{"key", "row", "deleted", "id", "replay", "repair"}``; ``row`` uses the side's
read names. Manifest: ``{"side", "files", "rows", "deletes", "replayed", "watermark"}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from d365sync.engine.stages.context import Manifest, RunContext, Side, aware, chunked, norm_key, now


def extract(ctx: RunContext, side: Side) -> Manifest:
    """Read one side's changes into ``extract/<side>/NNNNN.parquet`` and stage its watermark."""
    entries = _replays(ctx, side)
    if side == "dynamics":
        changes, watermark = _dynamics_changes(ctx)
    else:
        changes, watermark = _erp_changes(ctx)
    manifest = _write(ctx, side, [entries, changes])
    mark = watermark()
    manifest["watermark"] = {k: _plain(v) for k, v in mark.items()}
    if not ctx.dry_run:
        ctx.store.stage_watermark(
            ctx.entity, side, ctx.run_id, mark["value"], mark["token"], backfill=ctx.backfill
        )
    return manifest


def _write(ctx: RunContext, side: Side, streams: list[Iterable[dict[str, Any]]]) -> Manifest:
    files: list[str] = []
    counts = {"rows": 0, "deletes": 0, "replayed": 0}
    for stream in streams:
        for chunk in chunked(stream, ctx.chunk_size):
            files.append(ctx.staging.write(f"extract/{side}/{len(files):05d}.parquet", chunk))
            counts["rows"] += len(chunk)
            counts["deletes"] += sum(1 for e in chunk if e["deleted"])
            counts["replayed"] += sum(1 for e in chunk if e["replay"])
    return {"side": side, "files": files, **counts}


def _entry(key: Any, row: dict[str, Any], *, deleted: bool = False, id_: str | None = None) -> dict[str, Any]:
    return {"key": norm_key(key), "row": row, "deleted": deleted, "id": id_, "replay": None, "repair": False}


# ----------------------------------------------------------------------------- replays
def _replays(ctx: RunContext, side: Side) -> list[dict[str, Any]]:
    """Due dead letters and ready parked children of this side, as extract entries."""
    out: list[dict[str, Any]] = []
    for letter in ctx.store.due_dead_letters(ctx.entity):
        out += _replay_rows(side, letter.payload, ["dead_letter", letter.stage, letter.record_key])
    for child in ctx.store.ready_children(ctx.entity):
        out += _replay_rows(side, child.payload, ["parked", child.id, child.record_key])
    return out


def _replay_rows(side: Side, payload: Any, marker: list[Any]) -> list[dict[str, Any]]:
    """A reconcile repair (``payload["repair"]``: sides found current) flags its rows ``repair``."""
    payload = payload if isinstance(payload, dict) else {}
    rows, repair = payload.get("rows", []), side in payload.get("repair", ())
    key = marker[2]
    return [
        {**_entry(key, r["row"]), "replay": marker, "repair": repair} for r in rows if r.get("side") == side
    ]


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
    feed = client.iter_changes(entity_set, select, mark.token if mark else None, id_attribute=select[0])

    def changes() -> Iterator[dict[str, Any]]:
        for change in feed:
            if change.kind == "delete":
                yield _entry(None, {}, deleted=True, id_=str(change.id).lower())
            else:
                yield _entry(change.row.get(key), change.row, id_=(change.id or "").lower() or None)

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
    seen: set[str] = set()
    started = now()

    def rows() -> Iterator[dict[str, Any]]:
        for chunk in ctx.erp.iter_rows(table, chunk_size=ctx.chunk_size):
            for row in chunk:
                key = norm_key(row.get(key_column))
                seen.add(key or "")
                yield _erp_entry(key, row)
        if ctx.spec.deletes.to_dynamics != "ignore":
            yield from _vanished(ctx, seen)

    return rows(), lambda: {"value": started, "token": None}


def _vanished(ctx: RunContext, seen: set[str]) -> Iterator[dict[str, Any]]:
    for records in ctx.store.iter_base(ctx.entity):
        for stored in records:
            base = stored.base
            if stored.erp_key not in seen and base is not None and base.deleted_on is None:
                yield _entry(stored.erp_key, {}, deleted=True)


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value
