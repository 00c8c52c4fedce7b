"""Resolve: the three-way merge per bucket of keys, turned into per-side write plans.

For each bucket: both sides' canonical records meet by key, the base (key map row) of those
keys is loaded in one chunked query, open review items keep their fields parked, decided
review items are applied, and :func:`~d365sync.engine.merge.merge_record` decides. Conflicts
for manual review are queued here (idempotent: an open item is refreshed, not doubled).

A plan entry (``plan/bNNNNN.parquet``) holds everything load and commit need: per side the
operation, the changed canonical fields, the payload in the side's column names (built here so
a missing lookup parent parks the record *before* anything is written) and the expected
version; the new base; the old values (for the audit log); the raw rows (for a dead letter).
A dry run of :func:`~d365sync.engine.pipeline.run_entity` writes no plan file (nothing would
read it) unless its staging is kept. Manifest: ``{"files", "counts": {side: {op: n}},
"conflicts", "echoes", "stale", "reports", "resolved", "samples": {...}}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from d365sync.engine.merge import MergeDecision, RecordInput, SideRecord, Write, merge_record
from d365sync.engine.stages.context import (
    SIDES,
    Manifest,
    RunContext,
    base_to_dict,
    bucket_of,
    replay_payload,
)
from d365sync.engine.stages.users import UserNames
from d365sync.engine.state import Failure, ParkedChild, Review, ReviewItem, StoredRecord
from d365sync.engine.transforms import MissingParent, TransformError
from d365sync.spec import EntityLookup

MAX_SAMPLES = 200

#: called with each plan file's name and entries as soon as it is written
Planned = Callable[[str, list[dict[str, Any]]], None]


def resolve(ctx: RunContext, transformed: Manifest, planned: Planned | None = None) -> Manifest:
    """Merge every bucket; write the plan files; queue conflicts for review.

    ``planned(name, entries)`` is called with each bucket's entries once its plan file is
    written (with ``ctx.plan_files == "commit"``: only the entries commit reads back) and its
    reviews, parked children and failures are queued: a one-process run starts loading it there.
    """
    buckets: list[list[str]] = transformed["buckets"]
    decided = _decided(ctx, len(buckets))
    summary = _Summary()
    held = {row["key"] for chunk in ctx.staging.iter(transformed.get("held", [])) for row in chunk}
    files = []
    for b, names in enumerate(buckets):
        records = _meet(ctx, names)
        entries = _resolve_bucket(ctx, records, decided.get(b, {}), held, summary)
        name = f"plan/b{b:05d}.parquet"
        kept = entries if ctx.plan_files == "all" else [e for e in entries if "C" in plan_tags(e)]
        if entries and ctx.plan_files != "none":
            files.append(ctx.staging.write(name, kept, tags=plan_tags))
        summary.store(ctx)  # per bucket, so queued items never pile up in memory
        if entries and planned is not None:
            planned(files[-1], entries)
    return {"files": files, **summary.manifest()}


def plan_tags(entry: Mapping[str, Any]) -> str:
    """Who reads a plan entry: ``D``/``E`` the load of that side, ``C`` commit (a base to store
    there, or markers and review decisions to close)."""
    writes = entry["writes"]
    commit = len(writes) == 2 or (not writes and entry["base"] is not None)
    commit = commit or bool(entry["replay"]) or bool(entry["review_ids"])
    return "D" * ("dynamics" in writes) + "E" * ("erp" in writes) + "C" * commit


def _decided(ctx: RunContext, buckets: int) -> dict[int, dict[str, list[Review]]]:
    """Decided review items by bucket and key: applied even to records not extracted this run."""
    out: dict[int, dict[str, list[Review]]] = {}
    for review in ctx.store.decided_reviews(ctx.entity):
        out.setdefault(bucket_of(review.record_key, buckets), {}).setdefault(review.record_key, []).append(
            review
        )
    return out


def _meet(ctx: RunContext, names: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """key → side → record; a fresh extract beats a re-read of the same key."""
    records: dict[str, dict[str, dict[str, Any]]] = {}
    for chunk in ctx.staging.iter(names):
        for record in chunk:
            sides = records.setdefault(record["key"], {})
            current = sides.get(record["side"])
            if current is None or not record["retry"] or current["retry"]:
                sides[record["side"]] = record
    return records


def _finished(sides: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    """Markers this record finishes if it goes through: those whose every side was read this run
    (a letter holding both sides' rows is not done by a change on one side only)."""
    present, out = set(sides), []
    for record in sides.values():
        for marker in record["replay"] or []:
            if set(marker[3] if len(marker) > 3 else ()) <= present and marker not in out:
                out.append(marker)
    return out


def _resolve_bucket(
    ctx: RunContext,
    records: dict[str, dict[str, dict[str, Any]]],
    decided: Mapping[str, list[Review]],
    held: set[str],
    summary: _Summary,
) -> list[dict[str, Any]]:
    keys = sorted((set(records) | set(decided)) - held)
    fresh = ctx.fresh
    stored = {} if fresh else ctx.store.load_base(ctx.entity, "erp", keys)
    under = {} if fresh else ctx.store.under_review(ctx.entity, keys)
    rules, entries = ctx.spec.merge_rules(), []
    for key in keys:
        sides, reviews = records.get(key, {}), decided.get(key, [])
        record = _input(key, sides, stored.get(key), reviews, under.get(key, set()))
        decision = merge_record(rules, record)
        summary.count(key, decision, record)
        entry = _entry(ctx, key, sides, stored.get(key), decision, reviews, summary)
        if entry is not None:
            entries.append(entry)
        elif not decision.writes and not decision.base_changed:
            summary.replays_done += _finished(sides)
    return entries


def _input(
    key: str,
    sides: Mapping[str, dict[str, Any]],
    stored: StoredRecord | None,
    reviews: list[Review],
    under: set[str],
) -> RecordInput:
    def side(name: str) -> SideRecord | None:
        rec = sides.get(name)
        if rec is None:
            return None
        if rec["deleted"]:
            return SideRecord.tombstone(rec["modified"], rec["version"])
        return SideRecord(rec["values"], rec["modified"], rec["version"], by=rec.get("by"))

    decided = {r.field: r.chosen for r in reviews} or None
    base = stored.base if stored is not None else None
    repair = frozenset(s for s in SIDES if sides.get(s, {}).get("repair"))
    return RecordInput(key, side("dynamics"), side("erp"), base, decided, under, repair)


def _entry(
    ctx: RunContext,
    key: str,
    sides: Mapping[str, dict[str, Any]],
    stored: StoredRecord | None,
    decision: MergeDecision,
    reviews: list[Review],
    summary: _Summary,
) -> dict[str, Any] | None:
    """The plan entry of one record, or None when there is nothing to write or store."""
    if not decision.writes and not decision.base_changed:
        return None
    raw = {s: sides[s]["raw"] for s in SIDES if s in sides}
    try:
        decided = frozenset(r.field for r in reviews)
        built = {w.side: _write(ctx, key, w, decision, decided) for w in decision.writes}
    except TransformError as exc:
        summary.refused(ctx, key, exc, raw)
        return None
    writes = {side: w for side, w in built.items() if w is not None}
    if not writes and not decision.base_changed:
        return None
    summary.written(key, writes)
    dyn = sides.get("dynamics")
    old = stored.base.values if stored is not None and stored.base is not None else {}
    changed = {f for w in writes.values() for f in w["fields"]}
    return {
        "key": key,
        "dynamics_id": (dyn or {}).get("id") or (stored.dynamics_id if stored else None),
        "writes": writes,
        "before": {f: old.get(f) for f in changed if f in old},
        "base": base_to_dict(decision.base),
        "raw": raw,
        "replay": _finished(sides),
        "review_ids": [r.id for r in reviews],
    }


def _write(
    ctx: RunContext, key: str, write: Write, decision: MergeDecision, decided: frozenset[str] = frozenset()
) -> dict[str, Any] | None:
    """A side's payload in its own column names; lookups resolve here (MissingParent parks).

    A field whose value cannot be represented on the side (a soft lookup to a parent that
    does not exist there gives None) is left out rather than written as null: writing the null
    would read back as a change and revert again on every run. So is a field the side may not
    be written (it owns the field and takes no creates), unless a review decision (``decided``)
    overrides ownership: a human's decision goes to both sides. An update left with no field
    is no write at all.
    """
    spec, side = ctx.spec, write.side
    record = {**(decision.base.values if decision.base else {}), **write.fields}
    fields = sorted(write.fields) if write.op == "update" else sorted(record)
    payload: dict[str, Any] = {}
    if write.op in ("create", "update"):
        payload = ctx.plan.from_canonical(
            side, record, ctx.transform_context, fields=fields, override=decided
        )
        fields = _representable(ctx, side, record, fields, payload)
        if write.op == "update" and not fields:
            return None
    if side == "dynamics":
        payload[spec.dynamics.key] = key
    else:
        payload.setdefault(str(spec.fields[spec.key].erp), key)
        if write.op == "create":
            payload.update(spec.erp.create_values)
    names = sorted(write.fields) if write.op != "update" else fields
    return {"op": write.op, "fields": names, "payload": payload, "expected_version": write.expected_version}


def _representable(
    ctx: RunContext, side: str, record: Mapping[str, Any], fields: list[str], payload: dict[str, Any]
) -> list[str]:
    """Drop (from ``payload`` too) fields whose non-null canonical value became null, and fields
    with no column in ``payload`` (not writable on ``side``): they would be counted, not written."""
    columns = ctx.write_columns(side)
    kept = []
    for name in fields:
        column = columns.get(name)
        if column not in payload:
            continue
        if payload[column] is None and record.get(name) is not None:
            del payload[column]
        else:
            kept.append(name)
    return kept


class _Summary:
    """Counts, samples for the plan, and the review items / parked children / failures to store."""

    def __init__(self) -> None:
        self.users = UserNames()
        self.counts: dict[str, dict[str, int]] = {s: {} for s in SIDES}
        self.totals = {"records": 0, "conflicts": 0, "echoes": 0, "stale": 0, "reports": 0, "resolved": 0}
        self.totals |= {"parked": 0, "refused": 0}
        self.samples: dict[str, list[dict[str, Any]]] = {
            "writes": [],
            "conflicts": [],
            "resolved": [],
            "reports": [],
        }
        self.reviews: list[ReviewItem] = []
        self.parked: list[ParkedChild] = []
        self.failures: list[Failure] = []
        self.replays_done: list[Any] = []
        self.parked_items: list[dict[str, Any]] = []

    def count(self, key: str, decision: MergeDecision, record: RecordInput) -> None:
        """Decisions of every merged record (writes are counted once their payloads are built)."""
        t = self.totals
        t["records"] += 1
        t["stale"] += len(decision.stale)
        t["reports"] += len(decision.reports)
        t["echoes"] += any(d.reason.startswith("echo") for d in decision.decisions)
        sides = {s: side for s in SIDES if (side := getattr(record, s))} if decision.conflicts else {}
        changed = {s: side.modified for s, side in sides.items() if side.modified}
        by = {s: side.by for s, side in sides.items() if side.by}
        for c in decision.conflicts:
            t["conflicts"] += 1
            item = ReviewItem(
                key, c.field, c.base, c.dynamics, c.erp, c.reason, c.unseen, changed or None, by or None
            )
            self.reviews.append(item)
            self._sample("conflicts", {"key": key, "field": c.field, "reason": c.reason})
        for d in decision.decisions:
            if d.winner in ("dynamics", "erp", "review") and d.reason.startswith(("both changed", "review")):
                t["resolved"] += 1
                item = {"key": key, "field": d.field, "winner": d.winner, "reason": d.reason}
                self._sample("resolved", item)
        for r in decision.reports:
            self._sample("reports", {"key": key, "field": r.field, "side": r.side, "reason": r.reason})

    def written(self, key: str, writes: Mapping[str, dict[str, Any]]) -> None:
        for side, w in writes.items():
            self.counts[side][w["op"]] = self.counts[side].get(w["op"], 0) + 1
            self._sample("writes", {"key": key, "side": side, "op": w["op"], "fields": w["fields"]})

    def refused(self, ctx: RunContext, key: str, exc: TransformError, raw: Mapping[str, Any]) -> None:
        """A payload could not be built: park it for its parent, or dead-letter it."""
        lookup = ctx.spec.lookups.get(getattr(exc, "target", ""))
        payload = replay_payload(raw)
        if isinstance(exc, MissingParent) and isinstance(lookup, EntityLookup):
            self.totals["parked"] += 1
            self.parked.append(ParkedChild(key, lookup.entity, "erp", str(exc.value), payload, str(exc)))
        else:
            self.totals["refused"] += 1
            self.failures.append(Failure(key, f"resolve: {exc}", payload))

    def _sample(self, kind: str, item: dict[str, Any]) -> None:
        if len(self.samples[kind]) < MAX_SAMPLES:
            self.samples[kind].append(item)

    def store(self, ctx: RunContext) -> None:
        """Queue this bucket's reviews, parked children and failures (not in a dry run)."""
        room = MAX_SAMPLES - len(self.parked_items)
        self.parked_items += [
            {"key": p.record_key, "parent": f"{p.parent_entity}:{p.parent_key}"} for p in self.parked[:room]
        ]
        if not ctx.dry_run:
            if self.reviews:
                self.reviews = self.users.name(ctx, self.reviews)
                ctx.store.open_reviews(ctx.entity, ctx.run_id, self.reviews)
            if self.parked:
                ctx.store.park_children(ctx.entity, ctx.run_id, self.parked)
            ctx.dead_letter("resolve", self.failures)
        self.reviews, self.parked, self.failures = [], [], []

    def manifest(self) -> dict[str, Any]:
        parked = self.parked_items
        return {
            "counts": self.counts,
            **self.totals,
            "samples": self.samples,
            "parked_items": parked[:MAX_SAMPLES],
            "replays_done": self.replays_done,
        }
