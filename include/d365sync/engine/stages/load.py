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

import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
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
    """
    if not 0 <= part < parts:
        raise ValueError(f"load part {part} of {parts} does not exist")
    total = sum((resolved.get("counts") or {}).get(side, {}).values())
    label = f"load_{side}" + (f"[{part}]" if parts > 1 else "")
    loading = Loading(ctx, side, total=-(-total // parts) or None, label=label)
    try:
        for name in resolved["files"][part::parts]:
            loading.add(name)
        return loading.finish()
    finally:
        loading.close()


#: plan files a load holds beyond those being written before the caller waits for the oldest:
#: resolve goes on merging while Dataverse is slow on one file, instead of waiting for it
#: (issue 14: two more cut the main thread's waits of a 100k initial sync by about a quarter;
#: six more gained nothing further). Each held file keeps its entries in memory.
AHEAD = 2


class Loading:
    """One side's load, fed one plan file at a time (by :func:`load`, or by resolve as it writes
    each file, so that a one-process run writes bucket N while it merges bucket N+1).

    Writes and book-keeping overlap: while the state store takes file N's bases, audit rows and
    dead letters (here, on the caller's thread), worker threads already send the next files, so
    neither system waits for the other. The state store is written from the caller's thread only
    (key reservations before a file is handed over, everything else after it came back), so
    SQLite never makes the two wait on each other's locks. Each file is still written after its
    keys were reserved and before its bases are saved, which is all the crash contract asks.

    Dataverse takes ``workers`` files at once (two by default), and up to ``AHEAD`` more wait
    their turn while resolve goes on: each file's creates or upserts
    go out as requests of up to 1,000 records through the client's limiter (four at a time by
    default), and a second file keeps those slots busy while the first one's last request is
    still out. Files hold disjoint keys (buckets), and the freshness check of a file runs under a
    lock, one file at a time, as before. The ERP side takes one file at a time (an ODBC
    connection is not shared between threads).
    """

    def __init__(
        self,
        ctx: RunContext,
        side: Side,
        *,
        total: int | None = None,
        label: str | None = None,
        workers: int | None = None,
    ) -> None:
        if ctx.dry_run:
            raise RuntimeError("load must not run in a dry run")
        from concurrent.futures import ThreadPoolExecutor

        self.ctx, self.side = ctx, side
        self.workers = workers or (2 if side == "dynamics" else 1)
        self.fresh = Freshness.start(ctx) if side == "dynamics" else None
        self.tally = _Tally(side)
        self.progress = ctx.progress(label or f"load_{side}", total)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"load-{side}")
        self._pending: deque[Future[_Written]] = deque()
        self._checking = threading.Lock()

    def add(self, name: str, entries: list[dict[str, Any]] | None = None) -> None:
        """Hand over one plan file (``entries``: its entries, when the caller holds them already);
        books the files written so far, waiting while ``workers`` are still out."""
        todo = _prepare_file(self.ctx, self.side, name, entries)
        if not todo.entries:
            return
        sent = self._pool.submit(_write_file, self.ctx, self.side, self.fresh, todo, self._checking)
        self._pending.append(sent)
        while self._pending and (len(self._pending) > self.workers + AHEAD or self._pending[0].done()):
            self._book()

    def finish(self) -> Manifest:
        """Book every file still out; the side's manifest."""
        while self._pending:
            self._book()
        self.close()
        self.progress.finish()
        t = self.tally
        manifest = {"side": self.side, "results": t.results, "counts": t.counts, "failed": t.failed}
        if self.fresh is not None:
            manifest |= {"deferred": t.deferred, "freshness_checks": self.fresh.checks}
        return manifest

    def close(self) -> None:
        """Stop the workers (files not yet sent are dropped: the run fails, its rerun sends them)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _book(self) -> None:
        self.progress.add(self.tally.book(self.ctx, self._pending.popleft().result()))


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
    letters: list[tuple[list[Failure], bool]] = field(default_factory=list)  # (failures, retry now)


def _prepare_file(
    ctx: RunContext, side: Side, name: str, entries: list[dict[str, Any]] | None = None
) -> _Written:
    """This side's entries of one plan file, with the keys of its creates reserved."""
    if entries is None:
        entries = ctx.staging.read(name, tag=side[0].upper())
    mine = [e for e in entries if side in e["writes"]]
    known = _known_creates(ctx, side, mine)
    creates = [e for e in mine if e["writes"][side]["op"] == "create"]
    if creates:
        pairs = [KeyPair(None if side == "dynamics" else e["dynamics_id"], e["key"]) for e in creates]
        # in an entity's first run, no key of this file can be in the store (files hold
        # disjoint keys): nothing to look up
        ctx.store.reserve_keys(ctx.entity, pairs, ctx.run_id, unseen=ctx.fresh)
    return _Written(name, mine, {}, 0, known)


def _write_file(
    ctx: RunContext, side: Side, fresh: Freshness | None, todo: _Written, checking: threading.Lock
) -> _Written:
    """One plan file's writes (on a worker thread): the store is not touched here."""
    mine, known = todo.entries, todo.known
    assert isinstance(known, _Known)
    letters: list[tuple[list[Failure], bool]] = []
    waiting: set[str] = set()
    if fresh is not None:
        with checking:  # the feed's token is carried from one check to the next
            deferred = _defer_moved(ctx, fresh, mine, known)
        letters.append((deferred, True))
        waiting = {f.record_key for f in deferred}
    outcome = _load_chunk(ctx, side, [e for e in mine if e["key"] not in waiting], known, letters)
    moved = {k for k in outcome if k in known.moved}
    outcome |= {key: (False, None) for key in waiting}
    return _Written(todo.name, mine, outcome, len(waiting) + len(moved), known, letters)


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
        for failures, retry_now in done.letters:
            ctx.dead_letter("load", failures, retry_now=retry_now)
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
    return _Known(known | (ctx.store.reserved_keys(ctx.entity, rest) if rest and not ctx.fresh else set()))


def _defer_moved(
    ctx: RunContext, fresh: Freshness, entries: list[dict[str, Any]], known: set[str]
) -> list[Failure]:
    """Dynamics writes whose record changed there since the extract: dead-lettered, due at once,
    with both sides' rows, so the next run merges the newer edit instead of overwriting it.

    Only chunks that update (or upsert a reserved key) need the read: a new record goes out
    through ``CreateMultiple``, which refuses a key that exists instead of overwriting it.
    """

    def checked(entry: dict[str, Any]) -> bool:
        op = entry["writes"]["dynamics"]["op"]
        return op == "update" or (op == "create" and entry["key"] in known)

    if not any(checked(e) for e in entries):
        return []
    fresh.refresh()
    failures = []
    for entry in entries:
        if not checked(entry):
            continue
        if (reason := fresh.moved(entry)) is not None:
            rows = {**entry["raw"], "dynamics": fresh.current_row(entry)}
            failures.append(Failure(entry["key"], f"load dynamics deferred: {reason}", replay_payload(rows)))
    return failures


def _load_chunk(
    ctx: RunContext,
    side: Side,
    entries: list[dict[str, Any]],
    known: _Known,
    letters: list[tuple[list[Failure], bool]],
) -> dict[str, tuple[bool, str | None]]:
    """Write ``entries``; their failures go to ``letters`` (queued when the file is booked)."""
    if not entries:
        return {}
    errors: dict[str, str] = {}
    ids: dict[str, str] = {}
    if side == "dynamics":
        _load_dynamics(ctx, entries, errors, ids, known)
    else:
        _load_erp(ctx, entries, errors)
    letters.append((_failures(side, [e for e in entries if e["key"] not in known.moved], errors), False))
    letters.append((_failures(side, [e for e in entries if e["key"] in known.moved], errors), True))
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
    # an entity's first run reserved the key of each create, and nothing else is in the store
    rows: dict[bool, list[BaseRow]] = {True: [], False: []}
    for e in solo:
        if e["base"]:
            row = BaseRow(outcome[e["key"]][1] or e["dynamics_id"], e["key"], base_from_dict(e["base"]))
            rows[ctx.fresh and e["writes"][side]["op"] == "create"].append(row)
    for reserved, some in rows.items():
        ctx.store.save_base(ctx.entity, some, ctx.run_id, reserved=reserved)
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


def _failures(side: Side, entries: list[dict[str, Any]], errors: Mapping[str, str]) -> list[Failure]:
    return [
        Failure(
            e["key"], f"load {side} {e['writes'][side]['op']}: {errors[e['key']]}", replay_payload(e["raw"])
        )
        for e in entries
        if e["key"] in errors
    ]


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
