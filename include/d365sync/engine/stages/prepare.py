"""Validate and transform: extracted rows → checked rows → canonical records in key buckets.

Nothing is silently dropped. A row failing an expectation goes to the dead-letter queue (stage
``validate``) with the failing rule, and so does, before any expectation runs, an ERP row holding
a value the ERP client could not convert (the extract entry's ``error``: table, key, column,
rule, value); a row a transform refuses goes where its
:class:`TransformError` disposition says: ``quarantine`` → dead letter (stage ``transform``),
``manual_review`` → review queue (and a dead letter, so it is retried), ``park`` → parked
children, retried automatically once the parent is synced. A record with any such problem on
either side is *held* (its key goes to a ``held/`` file): resolve skips both of its sides this
run, so a half-read record is never merged (a record quarantined on one side must not look
like "missing there → create it").

Canonical records are written into ``buckets`` by a stable hash of the key, both sides into
the same bucket, so resolve can meet the two sides of every key holding one bucket in memory.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from d365sync.engine.pii import mask_any, mask_text
from d365sync.engine.stages.context import (
    SIDES,
    Manifest,
    RunContext,
    Side,
    aware,
    bucket_of,
    norm_key,
    replay_payload,
)
from d365sync.engine.stages.extract import Extraction
from d365sync.engine.staging import _safe
from d365sync.engine.state import Failure, ParkedChild, ReviewItem
from d365sync.engine.transforms import MissingParent, TransformError
from d365sync.spec import EntityLookup, personal_names

MAX_SAMPLES = 50
log = logging.getLogger(__name__)


class RunValidationFailed(RuntimeError):
    """The run's invalid share passed the entity's threshold; the rows are already quarantined."""

    def __init__(self, summary: str, statistics: Mapping[str, Any]) -> None:
        super().__init__(summary)
        self.statistics = dict(statistics)


# ----------------------------------------------------------------------------- validate
def validate(ctx: RunContext, extracts: Mapping[str, Manifest]) -> Manifest:
    """Run each side's expectations chunk by chunk; quarantine failing rows; judge the invalid share.

    ``rows`` / ``quarantined`` count fresh rows only: a retried row (re-read for a dead letter)
    is judged like a fresh one but never weighs on the entity's share.
    """
    checks = _Validation(ctx)
    for side in SIDES:
        kept = checks.side(side, ctx.staging.iter(extracts[side]["files"]))
        checks.out["files"][side] = [
            ctx.staging.write(f"valid/{side}/{i:05d}.parquet", chunk) for i, chunk in enumerate(kept)
        ]
    return checks.finish(extracts)


def validate_and_transform(
    ctx: RunContext,
    extracts: Mapping[str, Manifest],
    timings: dict[str, float] | None = None,
    erp: tuple[Extraction, int] | None = None,
) -> tuple[Manifest, Manifest]:
    """Both stages in one pass, for a run that holds every stage in one process
    (:func:`~d365sync.engine.pipeline.run_entity`): the checked rows go straight to the
    transform instead of through ``valid/`` files. Same rows, same buckets, same manifests
    (``files`` of the validate manifest is empty). ``timings`` gets each stage's seconds.

    ``erp``: the ERP side's :class:`Extraction` not yet read, and a bound of its rows (it reads
    its table whole, see :meth:`Extraction.row_bound`): its chunks go from the ERP straight to
    validation, with no ``extract/erp`` files either, and ``extracts`` gets its manifest.

    One difference of order: the invalid share is judged after the transform, so a run that a
    full load's share stops has already queued its transform failures as well (dead letters,
    retried like any other).
    """
    started, pulled = time.perf_counter(), _Clock()
    checks = _Validation(ctx)
    sources: dict[str, Iterable[list[dict[str, Any]]]] = {
        s: ctx.staging.iter(m["files"]) for s, m in extracts.items()
    }
    rows = {s: int(m["rows"]) for s, m in extracts.items()}  # an upper bound of the valid rows
    if erp is not None:
        sources["erp"], rows["erp"] = pulled.iter(erp[0].chunks()), erp[1]
    transformed = _transform(ctx, {s: checks.side(s, sources[s]) for s in SIDES}, rows)
    if erp is not None:
        extracts = {**extracts, "erp": erp[0].finish([])}  # type: ignore[dict-item]
    validated = checks.finish(extracts)
    transformed["held"] = [*validated["held"], *transformed["held"]]
    if timings is not None:
        if erp is not None:
            timings["extract_erp"] = round(pulled.seconds, 3)
        timings["validate"] = round(checks.seconds - pulled.seconds, 3)
        timings["transform"] = round(time.perf_counter() - started - checks.seconds, 3)
    return validated, transformed


class _Clock:
    """Seconds spent producing the items of the iterables it wraps."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def iter(self, items: Iterable[Any]) -> Iterator[Any]:
        source = iter(items)
        while True:
            started = time.perf_counter()
            item = next(source, _END)
            self.seconds += time.perf_counter() - started
            if item is _END:
                return
            yield item


_END = object()


class _Validation:
    """The validate stage over chunk streams: :meth:`side` yields the kept rows of each batch,
    :meth:`finish` writes the held keys and judges the invalid share."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.out: Manifest = {"files": {s: [] for s in SIDES}, "rows": {s: 0 for s in SIDES}}
        self.out |= {"quarantined": {s: 0 for s in SIDES}, "held": [], "samples": [], "alerts": []}
        self.seconds = 0.0  # spent here, reading the chunks included, not in the consumer

    def side(self, side: Side, chunks: Iterable[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        clock = _Clock()
        yield from clock.iter(self._side(side, chunks))
        self.seconds += clock.seconds

    def _side(self, side: Side, chunks: Iterable[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        out = self.out
        for entries in _batched(chunks, self.ctx.validation_batch):
            kept, quarantined = _validate_chunk(self.ctx, side, entries)
            out["rows"][side] += sum(1 for e in entries if not e["deleted"] and not e.get("retry"))
            out["quarantined"][side] += sum(1 for e, _ in quarantined if not e.get("retry"))
            _quarantine(self.ctx, side, quarantined, out)
            yield kept

    def finish(self, extracts: Mapping[str, Manifest]) -> Manifest:
        ctx, out = self.ctx, self.out
        held, out["held"] = out["held"], []
        if held:  # a file, not the manifest: manifests travel through XCom and must stay small
            out["held"] = [ctx.staging.write("held/validate.parquet", [{"key": k} for k in held])]
        _check_threshold(ctx, out, {s: bool(extracts[s].get("full_load")) for s in SIDES})
        return out


def _batched(chunks: Iterable[list[dict[str, Any]]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive chunks joined until a batch holds at least ``size`` entries."""
    batch: list[dict[str, Any]] = []
    for chunk in chunks:
        batch += chunk
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _validate_chunk(
    ctx: RunContext, side: Side, entries: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    unread = _unreadable(ctx, side, entries)
    quarantined = [(e, unread[id(e)]) for e in entries if id(e) in unread]
    entries = [e for e in entries if id(e) not in unread]  # never shown to the validator
    live = [e for e in entries if not e["deleted"]]
    if not live or not getattr(ctx.spec.validation, side):
        return entries, quarantined
    result = _run_validator(ctx, side, [e["row"] for e in live])
    failed = {id(q.row): q.reason for q in result.quarantined}
    kept = [e for e in entries if e["deleted"] or id(e["row"]) not in failed]
    return kept, quarantined + [(e, failed[id(e["row"])]) for e in live if id(e["row"]) in failed]


def _unreadable(ctx: RunContext, side: Side, entries: list[dict[str, Any]]) -> dict[int, str]:
    """Reasons by ``id(entry)`` for rows holding values the ERP client could not convert.

    A fresh extract marks them (the entry's ``error``). An ERP entry made elsewhere (a dead
    letter's or a parked child's row read again) is checked here, so a retry of such a row is
    quarantined again until the value is fixed at the source, never loaded. The reason names
    table, key, column, rule and the value (masked when the column holds personal data).
    """
    reasons: dict[int, str] = {}
    reader = None
    for entry in entries:
        if entry["deleted"]:
            continue
        error = entry.get("error")
        if "error" not in entry and side == "erp":
            if reader is None:
                from d365sync.erp import RowReader

                table = ctx.erp_table
                reader = RowReader(table, table.columns)
            error = [problem.as_dict() for problem in reader.check(entry["row"])]
        if error:
            reasons[id(entry)] = "; ".join(map(_unreadable_reason, error))
    return reasons


def _unreadable_reason(p: Mapping[str, Any]) -> str:
    value = mask_any(p["column"], p["value"], by_shape=False)
    where = f"{p['table']} key={p['key']} column {p['column']}"
    return f"{where}: unreadable {p['rule']}: {mask_text(str(p['message']))} (value {value!r})"


def _run_validator(ctx: RunContext, side: Side, rows: list[dict[str, Any]]) -> Any:
    """The configured validator (GX by default); a chunk past the threshold still yields its rows."""
    from d365sync.engine.validation import ValidationFailed
    from d365sync.engine.validation import validate as gx_validate

    key = ctx.spec.dynamics.key if side == "dynamics" else list(ctx.erp_table.key)
    docs: dict[str, Any] = {}
    if ctx.validator is None and ctx.data_docs_dir and not ctx.dry_run:
        docs = {"docs_dir": Path(ctx.data_docs_dir) / ctx.entity / side, "run_name": _safe(ctx.run_id)}
    try:
        return (ctx.validator or gx_validate)(ctx.spec, side, rows, key_column=key, **docs)
    except ValidationFailed as exc:  # the run-level threshold is decided over all chunks
        return exc.result


def _quarantine(
    ctx: RunContext, side: Side, quarantined: list[tuple[dict[str, Any], str]], out: Manifest
) -> None:
    failures = [
        Failure(str(e["key"] or e["id"] or "?"), f"validation: {reason}", replay_payload({side: e["row"]}))
        for e, reason in quarantined
    ]
    ctx.dead_letter("validate", failures)
    out["held"] += [e["key"] for e, _ in quarantined if e["key"]]
    room = MAX_SAMPLES - len(out["samples"])
    out["samples"] += [{"side": side, "key": e["key"], "reason": r} for e, r in quarantined[:room]]


def _check_threshold(ctx: RunContext, out: Manifest, full_load: Mapping[str, bool]) -> None:
    """Past the threshold over enough fresh rows: an alert in the manifest; on a full load of a
    spec with ``stop_on_full_load`` the run fails (a systemic cause). The rows are dead letters
    either way, so the other records of the run keep flowing."""
    rules = ctx.spec.validation
    for side in SIDES:
        rows, bad = out["rows"][side], out["quarantined"][side]
        if rows < rules.min_rows or bad / rows <= rules.invalid_share_threshold:
            continue
        examples = [s["reason"] for s in out["samples"][:3]]
        summary = (
            f"{ctx.entity}/{side}: {bad} of {rows} rows invalid ({bad / rows:.2%}, "
            f"threshold {rules.invalid_share_threshold:.2%}); e.g. {examples}"
        )
        if full_load[side] and rules.stop_on_full_load:
            raise RunValidationFailed(
                f"{summary}; stopped: full load", {"rows": out["rows"], "quarantined": out["quarantined"]}
            )
        log.warning("invalid share over threshold (rows are dead letters, the run goes on): %s", summary)
        out["alerts"].append(summary)


# ---------------------------------------------------------------------------- transform
def transform(ctx: RunContext, validated: Manifest) -> Manifest:
    """Map every valid row to a canonical record; route refused rows by disposition."""
    chunks = {side: ctx.staging.iter(validated["files"][side]) for side in SIDES}
    transformed = _transform(ctx, chunks, validated["rows"])
    transformed["held"] = [*validated.get("held", []), *transformed["held"]]
    return transformed


def _transform(
    ctx: RunContext, chunks: Mapping[Side, Iterable[list[dict[str, Any]]]], rows: Mapping[str, int]
) -> Manifest:
    """The transform of each side's chunks into buckets (one per ``chunk_size`` rows of the
    larger side); ``held`` lists only the transform's own held file."""
    buckets = max(1, math.ceil(max(rows.values(), default=0) / ctx.chunk_size))
    writer = _BucketWriter(ctx, buckets)
    errors = _Errors(ctx)
    for side in SIDES:
        for chunk in _side_chunks(ctx, side, chunks[side]):
            for record in _canonical(ctx, side, chunk, errors):
                writer.add(record)
            errors.flush()  # per chunk: the rows of refused records must not pile up in memory
    writer.flush()
    held = []
    if errors.held:
        held.append(ctx.staging.write("held/transform.parquet", [{"key": k} for k in sorted(errors.held)]))
    return {"buckets": writer.files, "records": writer.count, "held": held, **errors.summary()}


def _side_chunks(
    ctx: RunContext, side: Side, chunks: Iterable[list[dict[str, Any]]]
) -> Iterator[list[dict[str, Any]]]:
    """Chunks of entries; aggregated entities (inventory) are grouped by key across chunk ends."""
    entries = (e for chunk in chunks for e in chunk)
    if side == "erp" and ctx.spec.erp.grouped:
        entries = _grouped(ctx, entries)
    chunk: list[dict[str, Any]] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) >= ctx.chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _grouped(ctx: RunContext, entries: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for key, group in itertools.groupby(entries, key=lambda e: (e["key"], e["deleted"])):
        items = list(group)
        if key[1]:
            yield from items
            continue
        (row,) = list(ctx.spec.plan.group([e["row"] for e in items]))
        yield {**items[-1], "row": row}


def _canonical(
    ctx: RunContext, side: Side, chunk: list[dict[str, Any]], errors: _Errors
) -> Iterator[dict[str, Any]]:
    deleted_keys = _keys_of_deleted(ctx, side, chunk)
    plan, tctx = ctx.spec.plan, ctx.transform_context
    for entry in chunk:
        if entry["deleted"]:
            key = entry["key"] or deleted_keys.get(entry["id"] or "")
            if key is not None:
                yield _record(ctx, side, entry, key, {}, deleted=True)
            continue
        try:
            values = plan.to_canonical(side, entry["row"], tctx)
        except TransformError as exc:
            errors.add(side, entry, exc)
            continue
        key = norm_key(values.get(ctx.spec.key))
        if key is not None:
            yield _record(ctx, side, entry, key, values, deleted=_inactive(ctx, side, entry["row"]))


def _keys_of_deleted(ctx: RunContext, side: Side, chunk: list[dict[str, Any]]) -> dict[str, str]:
    """Dataverse reports a delete by GUID only: the key map knows which record it was."""
    ids = [e["id"] for e in chunk if e["deleted"] and e["key"] is None and e["id"]]
    if side != "dynamics" or not ids:
        return {}
    found = ctx.store.load_base(ctx.entity, "dynamics", ids)
    return {guid: stored.erp_key for guid, stored in found.items() if stored.erp_key}


def _inactive(ctx: RunContext, side: Side, row: Mapping[str, Any]) -> bool:
    """A deactivated row counts as a delete on its side (the delete policy then applies)."""
    if side == "dynamics":
        return row.get("statecode") == ctx.spec.dynamics.inactive_state
    table = ctx.erp_table
    status = table.status_column
    return status is not None and _strip(row.get(status)) == table.inactive_status


def _record(
    ctx: RunContext, side: Side, entry: Mapping[str, Any], key: str, values: dict[str, Any], deleted: bool
) -> dict[str, Any]:
    row = entry["row"]
    if side == "dynamics":
        modified, version = row.get("modifiedon"), row.get("versionnumber")
        guid = entry["id"] or (str(row.get(ctx.dynamics_select[0]) or "").lower() or None)
        by = row.get("_modifiedby_value")
    else:
        table = ctx.erp_table
        modified = row.get(table.cursor_column) if table.cursor_column else None
        version = row.get(table.version_column) if table.version_column else None
        guid = by = None  # a legacy ERP keeps no user on the row
    return {
        "key": key,
        "side": side,
        "values": values,
        "modified": aware(modified),
        "version": None if version is None else str(version),
        "by": by,
        "deleted": deleted,
        "id": guid,
        "raw": row,
        "replay": entry["replay"],
        "repair": bool(entry.get("repair")),
        "retry": bool(entry.get("retry")),
    }


def _strip(value: Any) -> Any:
    return value.rstrip(" ") if isinstance(value, str) else value


class _BucketWriter:
    """Buffers canonical records per bucket; flushes all buckets when 4 chunks are held."""

    def __init__(self, ctx: RunContext, buckets: int) -> None:
        self.ctx, self.buckets = ctx, buckets
        self.files: list[list[str]] = [[] for _ in range(buckets)]
        self._buffers: list[list[dict[str, Any]]] = [[] for _ in range(buckets)]
        self._held, self.count = 0, 0

    def add(self, record: dict[str, Any]) -> None:
        self._buffers[bucket_of(record["key"], self.buckets)].append(record)
        self._held, self.count = self._held + 1, self.count + 1
        if self._held >= 4 * self.ctx.chunk_size:
            self.flush()

    def flush(self) -> None:
        for b, buffer in enumerate(self._buffers):
            if buffer:
                name = f"canonical/b{b:05d}/{len(self.files[b]):05d}.parquet"
                self.files[b].append(self.ctx.staging.write(name, buffer))
                self._buffers[b] = []
        self._held = 0


class _Errors:
    """Collects a chunk's transform failures by disposition; :meth:`flush` stores them."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.counts = {"quarantined": 0, "review": 0, "parked": 0}
        self.parked_items: list[dict[str, Any]] = []
        self.failures: list[Failure] = []
        self.reviews: list[ReviewItem] = []
        self.parked: list[ParkedChild] = []
        self.held: set[str] = set()
        self.samples: list[dict[str, Any]] = []

    def add(self, side: Side, entry: Mapping[str, Any], exc: TransformError) -> None:
        exc.personal = personal_names({self.ctx.entity: self.ctx.spec})
        key = norm_key(exc.key) or entry["key"] or entry["id"] or "?"
        payload = replay_payload({side: entry["row"]})
        self.held.add(key)
        disposition = exc.disposition
        lookup = self.ctx.spec.lookups.get(getattr(exc, "target", ""))
        if isinstance(exc, MissingParent) and isinstance(lookup, EntityLookup):
            parent = str(exc.value)
            self.parked.append(ParkedChild(key, lookup.entity, side, parent, payload, str(exc)))
        elif disposition == "manual_review":
            values = {"dynamics": None, "erp": None, side: _plain(exc.value)}
            self.reviews.append(
                ReviewItem(key, exc.field or "*", None, values["dynamics"], values["erp"], str(exc))
            )
            self.failures.append(Failure(key, f"transform (review): {exc}", payload))
        else:
            disposition = "quarantine"
            self.failures.append(Failure(key, f"transform: {exc}", payload))
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append({"side": side, "key": key, "disposition": disposition, "reason": str(exc)})

    def flush(self) -> None:
        """Store this chunk's failures (not in a dry run), keep only counts and samples."""
        self.counts["quarantined"] += len(self.failures) - len(self.reviews)
        self.counts["review"] += len(self.reviews)
        self.counts["parked"] += len(self.parked)
        room = MAX_SAMPLES - len(self.parked_items)
        self.parked_items += [
            {"key": p.record_key, "parent": f"{p.parent_entity}:{p.parent_key}"} for p in self.parked[:room]
        ]
        if not self.ctx.dry_run:
            self.ctx.dead_letter("transform", self.failures)
            if self.reviews:
                self.ctx.store.open_reviews(self.ctx.entity, self.ctx.run_id, self.reviews)
            if self.parked:
                self.ctx.store.park_children(self.ctx.entity, self.ctx.run_id, self.parked)
        self.failures, self.reviews, self.parked = [], [], []

    def summary(self) -> dict[str, Any]:
        return {**self.counts, "parked_items": self.parked_items, "samples": self.samples}


def _plain(value: Any) -> Any:
    """TransformError.value is a bare ``object()`` sentinel when no value was given."""
    return None if type(value) is object else value
