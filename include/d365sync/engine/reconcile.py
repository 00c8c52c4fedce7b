"""Reconciliation: a full, hashed comparison of both systems per entity, and repairs for the next run.

Why: incremental runs only see what the cursors and delta tokens report. A direct SQL update that
did not touch ``LAST_UPD``, a restored backup or a missed webhook leaves the systems apart forever.
This pass reads every record of both sides (streamed, one chunk in memory), maps it to canonical
values with the entity's own plan and compares, field by field, by hash:

* ``only_dynamics`` / ``only_erp``: a record the other side lacks, though the key map pairs it;
* ``differs``: shared fields disagree; ``why`` names each field and the side that left the last
  synced value (the base) — the side whose change was never picked up.

Memory: a few bytes per record of the first side (key → per-field hashes) plus the drifted rows.
Repairs go through the existing replay path: each drifted record becomes a ``reconcile`` dead
letter holding both sides' raw rows and the sides found current (``repair``), marked for replay.
The next entity run re-injects them flagged as repairs: the merge compares a repaired side with the
base by value, not by timestamp or version (a direct SQL fix keeps an old ``LAST_UPD`` and the same
``ROW_VER``, so it would otherwise be stale or an echo), and ownership rules still apply. The drift
report is a JSON file (keys, field names and sides only; no values, so it holds no personal data).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from d365sync.engine.stages.context import RunContext, chunked, norm_key, replay_payload
from d365sync.engine.state import Failure

STAGE = "reconcile"
FieldHashes = dict[str, bytes]


def digest(value: Any) -> bytes:
    """A short stable hash of a canonical value (Decimal scale and text padding normalised)."""
    if isinstance(value, str):
        value = value.strip()
    elif value is not None and hasattr(value, "normalize") and value == value:  # Decimal
        value = format(value.normalize(), "f")
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def field_hashes(record: Mapping[str, Any], fields: Iterable[str]) -> FieldHashes:
    return {name: digest(record.get(name)) for name in fields if name in record}


def shared_fields(ctx: RunContext) -> list[str]:
    """Fields with a column on both sides: the ones that must agree."""
    return [f.name for f in ctx.spec.fields.values() if f.dynamics and f.erp and f.name != ctx.spec.key]


def dynamics_records(ctx: RunContext) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(key, canonical record, raw row) of every active Dynamics row."""
    spec = ctx.spec
    rows = ctx.dynamics.iter_rows(spec.dynamics.entity_set, spec.dynamics_select)
    yield from _canonical(ctx, "dynamics", (r for r in rows if r.get("statecode", 0) == 0))


def erp_records(ctx: RunContext) -> Iterator[tuple[str, dict[str, Any] | None, dict[str, Any]]]:
    """(key, canonical record, raw row) of every ERP row (grouped entities aggregated).

    A record with a value the ERP client could not convert (``Row.errors``; the sync
    dead-letters it) comes with record None: it cannot be compared, and is no drift.
    """
    plan, table = ctx.spec.plan, ctx.erp_table
    status, inactive = table.status_column, table.inactive_status
    key_column = ctx.spec.fields[ctx.spec.key].erp or ""
    for chunk in ctx.erp.iter_rows(table, chunk_size=ctx.chunk_size):
        bad = {r.get(key_column) for r in chunk if getattr(r, "errors", ())}
        for raw in sorted(bad, key=str):
            if key := norm_key(raw):
                yield key, None, {}
        rows = [
            r
            for r in chunk
            if r.get(key_column) not in bad and (not status or inactive is None or r.get(status) != inactive)
        ]
        yield from _canonical(ctx, "erp", plan.group(rows))


def _canonical(
    ctx: RunContext, side: str, rows: Iterable[Mapping[str, Any]]
) -> Iterator[tuple[str, Any, Any]]:
    from d365sync.engine.transforms import TransformError

    plan, tctx = ctx.spec.plan, ctx.transform_context
    for row in rows:
        try:
            record = plan.to_canonical(side, row, tctx)  # type: ignore[arg-type]
        except TransformError:
            continue  # invalid rows are the validator's business, not drift
        key = norm_key(record.get(ctx.spec.key))
        if key:
            yield key, record, _own_shape(ctx, side, record, row)


def _own_shape(
    ctx: RunContext, side: str, record: Mapping[str, Any], row: Mapping[str, Any]
) -> dict[str, Any]:
    """The row a repair letter shows: an aggregated ERP record (inventory) as one row per key with
    its aggregated values (the quantity summed over warehouses), never per-warehouse lists."""
    if side != "erp" or not ctx.spec.erp.grouped:
        return dict(row)
    return {f.erp: record.get(f.name) for f in ctx.spec.fields.values() if f.erp and f.name in record}


def compare(ctx: RunContext) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Drift items and the raw rows of drifted records per key and side."""
    fields = shared_fields(ctx)
    seen: dict[str, FieldHashes] = {k: field_hashes(r, fields) for k, r, _ in dynamics_records(ctx)}
    drift: list[dict[str, Any]] = []
    raws: dict[str, dict[str, Any]] = {}
    for chunk in chunked(erp_records(ctx), ctx.chunk_size):
        bases = ctx.store.load_base(ctx.entity, "erp", [k for k, _, _ in chunk])
        for key, record, raw in chunk:
            theirs = seen.pop(key, None)
            if record is None:
                continue
            item = _differs(key, field_hashes(record, fields), theirs, bases.get(key), fields)
            if item:
                drift.append(item)
                raws[key] = {"erp": raw}
    for key in sorted(seen):
        drift.append({"key": key, "kind": "only_dynamics", "why": "no active ERP row"})
    return drift, raws


def _differs(
    key: str, mine: FieldHashes, theirs: FieldHashes | None, stored: Any, fields: list[str]
) -> dict[str, Any] | None:
    if theirs is None:
        return {"key": key, "kind": "only_erp", "why": "no active Dynamics record"}
    base = stored.base.values if stored is not None and stored.base is not None else {}
    why = []
    for name in fields:
        if name in mine and name in theirs and mine[name] != theirs[name]:
            b = digest(base.get(name)) if name in base else None
            side = "erp" if b == theirs[name] else "dynamics" if b == mine[name] else "both"
            why.append({"field": name, "changed_on": side})
    return {"key": key, "kind": "differs", "why": why} if why else None


def reconcile(ctx: RunContext, report_dir: Any, *, queue_repairs: bool = True) -> dict[str, Any]:
    """Compare, write ``<report_dir>/<entity>-<run>.json``, queue repairs; returns the summary."""
    drift, raws = compare(ctx)
    repairs = _queue(ctx, drift, raws) if queue_repairs and not ctx.dry_run else 0
    counts = {
        kind: sum(1 for d in drift if d["kind"] == kind) for kind in ("differs", "only_dynamics", "only_erp")
    }
    report = {
        "entity": ctx.entity,
        "run_id": ctx.run_id,
        "at": datetime.now(UTC).isoformat(),
        "counts": counts,
        "repairs_queued": repairs,
        "drift": drift,
    }
    path = report_dir / f"{ctx.entity}-{_safe(ctx.run_id)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        handle.write(json.dumps(report, indent=2))
    return {"entity": ctx.entity, **counts, "repairs_queued": repairs, "report": str(path)}


def _queue(ctx: RunContext, drift: list[dict[str, Any]], raws: dict[str, dict[str, Any]]) -> int:
    """Drifted records that both sides hold → replayable dead letters (due on the next run)."""
    keys = [d["key"] for d in drift if d["kind"] == "differs"]
    if not keys:
        return 0
    spec, key_attr = ctx.spec, ctx.spec.dynamics.key
    rows = ctx.dynamics.iter_in(spec.dynamics.entity_set, spec.dynamics_select, key_attr, keys)
    current = {str(norm_key(row.get(key_attr))).casefold(): row for row in rows}  # keys match ignoring case
    for key in keys:
        raws[key]["dynamics"] = current.get(key.casefold())
    sides = {d["key"]: repair_sides(d["why"]) for d in drift if d["kind"] == "differs"}
    failures = [
        Failure(k, "drift found by reconcile", {**replay_payload(raws[k]), "repair": sides[k]}) for k in keys
    ]
    ctx.store.dead_letter(ctx.entity, STAGE, ctx.run_id, failures)
    wanted = set(keys)
    for letter in ctx.store.dead_letters(ctx.entity):
        if letter.stage == STAGE and letter.record_key in wanted:
            ctx.store.replay_dead_letter(letter.id, "reconcile")
    return len(keys)


def repair_sides(why: Iterable[Mapping[str, Any]]) -> list[str]:
    """The sides a repair vouches for: those that left the base ("both": both did)."""
    changed = {w["changed_on"] for w in why}
    return [s for s in ("dynamics", "erp") if s in changed or "both" in changed]


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
