"""Load one side's writes from the plan, chunk by chunk, following the state store's crash contract.

Per plan file (one bucket, so memory is bounded by the chunk size):

1. ``reserve_keys`` for the records about to be created, *before* writing them, so a rerun after
   a crash pairs the same keys and never creates a duplicate;
2. write set-based and idempotently: Dataverse ``CreateMultiple`` for new records and
   ``UpsertMultiple`` by alternate key for the rest (both fall back to a continue-on-error
   ``$batch`` that isolates bad rows), ERP staging table + ``ON CONFLICT`` /
   ``MERGE`` per chunk, optimistic ``ROW_VER`` updates where the table has a version;
3. per-record failures (and ERP version conflicts) go to the dead-letter queue with the raw rows
   of both sides, so the record is replayed whole by a later run;
4. ``save_base`` for the records whose only writes were on this side and succeeded; records
   written on both sides get their base in ``commit`` once both loads are known to be done;
5. every successful write is audited (field names plus masked before/after values).

Before a Dynamics chunk that updates records, :mod:`~d365sync.engine.stages.freshness` defers
the records that changed in Dataverse since the extract (the Dynamics counterpart of
``ROW_VER``). New records go out through ``CreateMultiple``, which answers with their GUIDs (no
read-back) and can never overwrite a record someone else created under the same key meanwhile:
that row fails alone (duplicate key) and is deferred to the next run like a moved record. A
record the key map already reserved (a rerun after a crash, an erased subject coming back)
may exist already: it is upserted instead.

After a load that created many records (in however many parts), commit calls
:func:`advance_token`: one read of the change feed positions the Dynamics delta token after
them, when everything the feed holds is one of this run's creates, untouched since (created and
last modified by the sync's own user, at the same instant). The next run then starts after its
own writes instead of reading every created record back as an echo. Anything else in the feed
(an edit by a person, a delete) leaves the token where the extract put it, so nothing is ever
skipped.

Results per plan file (``load/<side>/bNNNNN.parquet``): ``{"key", "ok", "id"}`` — ``id`` is the
Dataverse GUID of a record this load created there. Manifest: ``{"side", "results", "counts",
"failed"}``, plus ``"deferred"`` and ``"freshness_checks"`` on the Dynamics side. A load split in
parts (``part`` of ``parts``) gives one manifest per part; :func:`merge_loads` joins them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from d365sync.engine.stages.context import (
    Manifest,
    RunContext,
    Side,
    base_from_dict,
    norm_key,
    replay_payload,
)
from d365sync.engine.stages.freshness import Freshness
from d365sync.engine.state import AuditEntry, BaseRow, Failure, KeyPair

#: creates from which a load positions the delta token after its own writes (one feed read)
ADVANCE_AFTER_CREATES = 100


def load(ctx: RunContext, resolved: Manifest, side: Side, part: int = 0, parts: int = 1) -> Manifest:
    """Apply this side's writes; returns counts and the per-record results commit needs.

    ``part``/``parts`` split one large load between workers: part ``i`` takes every ``parts``-th
    plan file (each a bucket of key hashes) from the ``i``-th, so no two workers ever write the
    same record; :func:`merge_loads` gives commit one manifest per side again.

    Writes and book-keeping overlap: while the state store takes chunk N's bases and audit rows
    (here), a worker thread already sends chunk N+1, so neither system waits for the other. The
    state store is written from this thread only (key reservations before a chunk is handed
    over, bases after it came back), so SQLite never makes the two wait on each other's locks.
    Each chunk is still written after its keys were reserved and before its base is saved,
    which is all the crash contract asks.
    """
    if ctx.dry_run:
        raise RuntimeError("load must not run in a dry run")
    from concurrent.futures import Future, ThreadPoolExecutor

    fresh = Freshness.start(ctx) if side == "dynamics" else None
    tally = _Tally(side)
    total = sum((resolved.get("counts") or {}).get(side, {}).values())
    progress = ctx.progress(f"load_{side}" + (f"[{part}]" if parts > 1 else ""), -(-total // parts) or None)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"load-{side}")
    try:
        written: Future[_Written] | None = None
        if not 0 <= part < parts:
            raise ValueError(f"load part {part} of {parts} does not exist")
        for name in resolved["files"][part::parts]:
            following = pool.submit(_write_file, ctx, side, fresh, _prepare_file(ctx, side, name))
            if written is not None:
                progress.add(tally.book(ctx, written.result()))
            written = following
        if written is not None:
            progress.add(tally.book(ctx, written.result()))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    progress.finish()
    manifest = {"side": side, "results": tally.results, "counts": tally.counts, "failed": tally.failed}
    if fresh is not None:
        manifest |= {"deferred": tally.deferred, "freshness_checks": fresh.checks}
    return manifest


def merge_loads(manifests: list[Manifest]) -> Manifest:
    """One side's manifest from the manifests of its parts (or the single one)."""
    if len(manifests) == 1:
        return manifests[0]
    merged: Manifest = {"side": manifests[0]["side"], "results": [], "counts": {}, "failed": 0}
    for m in manifests:
        merged["results"] += m["results"]
        merged["failed"] += m["failed"]
        for op, n in m["counts"].items():
            merged["counts"][op] = merged["counts"].get(op, 0) + n
        for name in ("deferred", "freshness_checks"):
            if name in m:
                merged[name] = merged.get(name, 0) + m[name]
        for name, value in (m.get("dataverse") or {}).items():  # the Airflow task's counters
            merged.setdefault("dataverse", {})[name] = merged.get("dataverse", {}).get(name, 0) + value
        if "seconds" in m:
            merged["seconds"] = max(merged.get("seconds", 0.0), m["seconds"])
    merged["parts"] = len(manifests)
    return merged


def advance_token(ctx: RunContext, dynamics: Manifest | None) -> bool:
    """After a load that created many records in Dataverse (every part of it): move the staged
    delta token past them (:meth:`Freshness.advance_past`); the rest is read by the next run."""
    if dynamics is None or not dynamics.get("results") or ctx.backfill:
        return False
    created = {
        row["id"]
        for chunk in ctx.staging.iter(dynamics["results"])
        for row in chunk
        if row["ok"] and row["id"]
    }
    return len(created) >= ADVANCE_AFTER_CREATES and Freshness.start(ctx).advance_past(created)


@dataclass
class _Written:
    """One plan file's writes on one side, waiting for their book-keeping."""

    name: str
    entries: list[dict[str, Any]]
    outcome: dict[str, tuple[bool, str | None]]
    deferred: int
    known: set[str]


def _prepare_file(ctx: RunContext, side: Side, name: str) -> _Written:
    """This side's entries of one plan file, with the keys of its creates reserved."""
    mine = [e for e in ctx.staging.read(name, tag=side[0].upper()) if side in e["writes"]]
    known = _known_creates(ctx, side, mine)
    creates = [e for e in mine if e["writes"][side]["op"] == "create"]
    if creates:
        pairs = [KeyPair(None if side == "dynamics" else e["dynamics_id"], e["key"]) for e in creates]
        ctx.store.reserve_keys(ctx.entity, pairs, ctx.run_id)
    return _Written(name, mine, {}, 0, known)


def _write_file(ctx: RunContext, side: Side, fresh: Freshness | None, todo: _Written) -> _Written:
    mine, known = todo.entries, todo.known
    if not mine:
        return todo
    assert isinstance(known, _Known)
    waiting = _defer_moved(ctx, fresh, mine, known) if fresh is not None else set()
    outcome = _load_chunk(ctx, side, [e for e in mine if e["key"] not in waiting], known)
    moved = {k for k in outcome if k in known.moved}
    outcome |= {key: (False, None) for key in waiting}
    return _Written(todo.name, mine, outcome, len(waiting) + len(moved), known)


@dataclass
class _Tally:
    side: Side
    counts: dict[str, int] = field(default_factory=dict)
    results: list[str] = field(default_factory=list)
    failed: int = 0
    deferred: int = 0

    def book(self, ctx: RunContext, done: _Written) -> int:
        """Bases, audit rows and the results file of one written plan file; its entry count."""
        if not done.entries:
            return 0
        self.deferred += done.deferred
        self.failed += sum(1 for ok, _ in done.outcome.values() if not ok) - done.deferred
        _after_chunk(ctx, self.side, done.entries, done.outcome, self.counts)
        rows = [{"key": k, "ok": ok, "id": guid} for k, (ok, guid) in done.outcome.items()]
        self.results.append(ctx.staging.write(f"load/{self.side}/{done.name.rsplit('/', 1)[-1]}", rows))
        return len(done.entries)


class _Known(set[str]):
    """Keys of creates the key map reserved before (they may exist already: upserted, not created);
    ``moved`` collects creates refused because someone else created the key meanwhile."""

    moved: set[str]

    def __init__(self, keys: set[str]) -> None:
        super().__init__(keys)
        self.moved = set()


def _known_creates(ctx: RunContext, side: Side, entries: list[dict[str, Any]]) -> _Known:
    if side != "dynamics":
        return _Known(set())
    creates = [e for e in entries if e["writes"]["dynamics"]["op"] == "create"]
    known = {e["key"] for e in creates if e["dynamics_id"]}
    rest = [e["key"] for e in creates if not e["dynamics_id"]]
    return _Known(known | (ctx.store.reserved_keys(ctx.entity, rest) if rest else set()))


def _defer_moved(
    ctx: RunContext, fresh: Freshness, entries: list[dict[str, Any]], known: set[str]
) -> set[str]:
    """Dynamics writes whose record changed there since the extract: dead-lettered, due at once,
    with both sides' rows, so the next run merges the newer edit instead of overwriting it.

    Only chunks that update (or upsert a reserved key) need the read: a new record goes out
    through ``CreateMultiple``, which refuses a key that exists instead of overwriting it.
    """

    def checked(entry: dict[str, Any]) -> bool:
        op = entry["writes"]["dynamics"]["op"]
        return op == "update" or (op == "create" and entry["key"] in known)

    if not any(checked(e) for e in entries):
        return set()
    fresh.refresh()
    failures = []
    for entry in entries:
        if not checked(entry):
            continue
        if (reason := fresh.moved(entry)) is not None:
            rows = {**entry["raw"], "dynamics": fresh.current_row(entry)}
            failures.append(Failure(entry["key"], f"load dynamics deferred: {reason}", replay_payload(rows)))
    ctx.dead_letter("load", failures, retry_now=True)
    return {f.record_key for f in failures}


def _load_chunk(
    ctx: RunContext, side: Side, entries: list[dict[str, Any]], known: _Known
) -> dict[str, tuple[bool, str | None]]:
    if not entries:
        return {}
    errors: dict[str, str] = {}
    ids: dict[str, str] = {}
    if side == "dynamics":
        _load_dynamics(ctx, entries, errors, ids, known)
    else:
        _load_erp(ctx, entries, errors)
    _dead_letter(ctx, side, [e for e in entries if e["key"] not in known.moved], errors)
    _dead_letter(ctx, side, [e for e in entries if e["key"] in known.moved], errors, retry_now=True)
    return {e["key"]: (e["key"] not in errors, ids.get(e["key"])) for e in entries}


def _after_chunk(
    ctx: RunContext,
    side: Side,
    entries: list[dict[str, Any]],
    outcome: Mapping[str, tuple[bool, str | None]],
    counts: dict[str, int],
) -> None:
    """Base for one-sided records, audit for every successful write."""
    done = [e for e in entries if outcome[e["key"]][0]]
    solo = [e for e in done if len(e["writes"]) == 1]
    rows = [
        BaseRow(outcome[e["key"]][1] or e["dynamics_id"], e["key"], base_from_dict(e["base"]))
        for e in solo
        if e["base"]
    ]
    ctx.store.save_base(ctx.entity, rows, ctx.run_id)  # type: ignore[arg-type]
    ctx.store.audit(ctx.run_id, ctx.entity, (_audit(side, e) for e in done), ctx.actor)
    for e in done:
        op = e["writes"][side]["op"]
        counts[op] = counts.get(op, 0) + 1


def _audit(side: Side, entry: Mapping[str, Any]) -> AuditEntry:
    write = entry["writes"][side]
    after = (entry["base"] or {}).get("values", {})
    fields = write["fields"]
    before = {f: entry["before"].get(f) for f in fields} if write["op"] != "create" else None
    return AuditEntry(entry["key"], side, write["op"], fields, before, {f: after.get(f) for f in fields})


def _dead_letter(
    ctx: RunContext,
    side: Side,
    entries: list[dict[str, Any]],
    errors: Mapping[str, str],
    *,
    retry_now: bool = False,
) -> None:
    failures = [
        Failure(
            e["key"], f"load {side} {e['writes'][side]['op']}: {errors[e['key']]}", replay_payload(e["raw"])
        )
        for e in entries
        if e["key"] in errors
    ]
    ctx.dead_letter("load", failures, retry_now=retry_now)


# ---------------------------------------------------------------------------- Dynamics
def _load_dynamics(
    ctx: RunContext,
    entries: list[dict[str, Any]],
    errors: dict[str, str],
    ids: dict[str, str],
    known: _Known,
) -> None:
    d, client, primary = ctx.spec.dynamics, ctx.dynamics, ctx.dynamics_select[0]
    new = [e for e in entries if e["writes"]["dynamics"]["op"] == "create" and e["key"] not in known]
    upserts = [
        e
        for e in entries
        if e["writes"]["dynamics"]["op"] == "update"
        or (e["writes"]["dynamics"]["op"] == "create" and e["key"] in known)
    ]
    for group, strategy in ((new, "create"), (upserts, "multiple")):
        if not group:
            continue
        # a reserved key's GUID may be unknown (a crash before save_base): the $batch path,
        # which this strategy falls back to, and the create answer both return it
        id_attr = primary if any(not e["dynamics_id"] for e in group) else None
        payloads = [e["writes"]["dynamics"]["payload"] for e in group]
        if strategy == "multiple" and id_attr is not None:
            strategy = "batch"
        outcomes = client.upsert_many(
            d.entity_set, d.key, payloads, logical_name=d.table, strategy=strategy, id_attribute=id_attr
        )
        for entry, outcome in zip(group, outcomes, strict=True):
            if not outcome.ok:
                errors[entry["key"]] = f"HTTP {outcome.http_status} {outcome.code} {outcome.message}".strip()
                if strategy == "create" and outcome.http_status in (409, 412):
                    known.moved.add(entry["key"])  # someone created the key since the extract
            elif outcome.id and entry["writes"]["dynamics"]["op"] == "create":
                ids[entry["key"]] = outcome.id
    for entry in entries:
        op = entry["writes"]["dynamics"]["op"]
        if op in ("deactivate", "delete"):
            _state_change(ctx, entry, op, errors)


def _state_change(ctx: RunContext, entry: Mapping[str, Any], op: str, errors: dict[str, str]) -> None:
    from d365sync.dynamics import DynamicsApiError

    d, key = ctx.spec.dynamics, {ctx.spec.dynamics.key: entry["key"]}
    try:
        if op == "deactivate":
            ctx.dynamics.deactivate(d.entity_set, key, d.inactive_state, d.inactive_status)
        else:
            ctx.dynamics.delete(d.entity_set, key)
    except DynamicsApiError as exc:
        if exc.status != 404:  # already gone: the goal of a deactivation or delete is met
            errors[entry["key"]] = f"HTTP {exc.status} {exc.code}: {exc.message}"


# --------------------------------------------------------------------------------- ERP
def _load_erp(ctx: RunContext, entries: list[dict[str, Any]], errors: dict[str, str]) -> None:
    table = ctx.erp_table
    by_op: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_op.setdefault(entry["writes"]["erp"]["op"], []).append(entry)
    for op, group in by_op.items():
        if op in ("deactivate", "delete"):
            keys = [(e["key"],) for e in group]
            result = ctx.erp.deactivate(table, keys) if op == "deactivate" else ctx.erp.delete(table, keys)
            _erp_errors(result, errors)
        else:
            _erp_writes(ctx, table, op, group, errors)


def _erp_writes(
    ctx: RunContext, table: Any, op: str, group: list[dict[str, Any]], errors: dict[str, str]
) -> None:
    """Rows grouped by column set (the client loads one shape per call); versioned updates are optimistic.

    An update never inserts: on a table without a version column it is a plain update, and a
    row it does not find (like a version conflict) is an error, never a success. An update
    with no column to set beyond the key would change nothing: an error too.
    """
    version, keys = table.version_column, set(table.key)
    shapes: dict[tuple[tuple[str, ...], bool], list[dict[str, Any]]] = {}
    for entry in group:
        write = entry["writes"]["erp"]
        row = dict(write["payload"])
        if op == "update" and not set(row) - keys:
            errors[entry["key"]] = f"update of {write['fields']} has no {table.name} column to set"
            continue
        optimistic = op == "update" and version is not None and write["expected_version"] is not None
        if optimistic:
            row[version] = int(write["expected_version"])
        shapes.setdefault((tuple(sorted(row)), optimistic), []).append(row)
    for (_, optimistic), rows in shapes.items():
        if optimistic:
            result = ctx.erp.update_if_unchanged(table, rows)
        else:
            result = ctx.erp.update(table, rows) if op == "update" else ctx.erp.upsert(table, rows)
        _erp_errors(result, errors)


def _erp_errors(result: Any, errors: dict[str, str]) -> None:
    for failure in result.failures:
        errors[norm_key(failure.key[0]) or "?"] = failure.message
    for conflict in result.conflicts:
        errors[norm_key(conflict.key[0]) or "?"] = f"version conflict: {conflict}"
