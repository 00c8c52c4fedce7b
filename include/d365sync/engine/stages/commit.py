"""Commit: the last step of a run, and the only one that moves watermarks.

In order: store the base of records written on both sides (both loads succeeded) and of
records with nothing to write whose base still changed (new versions of echoes, tombstones);
close what this run finished (released parked children, resolved dead letters, applied review
decisions); then ``commit_watermarks``; then the run report. A crash anywhere before the
watermarks leaves them where they were, so the rerun extracts the same changes again and the
already-loaded ones come back as echoes: nothing is lost and nothing is written twice. Just
before the watermarks, a load that created many Dataverse records (in however many parts)
may move the staged delta token past them (``load.advance_token``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from d365sync.engine.stages.context import SIDES, Manifest, RunContext, base_from_dict
from d365sync.engine.stages.load import advance_token
from d365sync.engine.state import BaseRow


def commit(ctx: RunContext, resolved: Manifest, loads: Mapping[str, Manifest]) -> Manifest:
    """Finish the run: remaining bases, queues, watermarks (last), then the report."""
    if ctx.dry_run:
        raise RuntimeError("commit must not run in a dry run")
    results = _results_by_file(loads)
    saved, finished, reviews = 0, list(resolved.get("replays_done", [])), []
    for name in resolved["files"]:
        entries = ctx.staging.read(name, tag="C")  # one-sided writes stored their base at load
        if not entries:
            continue
        outcome = _load_outcome(ctx, results.get(_base_name(name), []))
        rows = [_base_row(e, outcome) for e in entries if _commit_here(e, outcome)]
        saved += ctx.store.save_base(ctx.entity, [r for r in rows if r is not None], ctx.run_id)
        done = [e for e in entries if all(outcome.get((s, e["key"]), (True, None))[0] for s in e["writes"])]
        finished += [m for e in done for m in e["replay"]]
        reviews += [i for e in done for i in e["review_ids"]]
    closed = _close(ctx, finished, reviews, loads)
    advanced = advance_token(ctx, loads.get("dynamics"))
    marks = ctx.store.commit_watermarks(ctx.entity, ctx.run_id)
    watermarks = {s: _plain(m.value) for s, m in marks.items()}
    return {"saved": saved, **closed, "token_advanced": advanced, "watermarks": watermarks}


def _results_by_file(loads: Mapping[str, Manifest]) -> dict[str, list[str]]:
    """The loads' result files per plan file (same base name), so commit holds one chunk's."""
    out: dict[str, list[str]] = {}
    for side in SIDES:
        for name in (loads.get(side) or {"results": []})["results"]:
            out.setdefault(_base_name(name), []).append(name)
    return out


def _base_name(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _load_outcome(ctx: RunContext, names: list[str]) -> dict[tuple[str, str], tuple[bool, Any]]:
    """(side, key) → (ok, GUID) of one plan file's writes, from the result files of both loads."""
    out: dict[tuple[str, str], tuple[bool, Any]] = {}
    for name in names:
        side = name.split("/")[1]
        for row in ctx.staging.read(name):
            out[side, row["key"]] = (row["ok"], row["id"])
    return out


def _commit_here(entry: Mapping[str, Any], outcome: Mapping[tuple[str, str], tuple[bool, Any]]) -> bool:
    """Two-sided writes (both succeeded) and write-free base changes; one-sided ones saved at load."""
    writes = entry["writes"]
    if not writes:
        return entry["base"] is not None
    return len(writes) == 2 and all(outcome.get((s, entry["key"]), (False, None))[0] for s in writes)


def _base_row(
    entry: Mapping[str, Any], outcome: Mapping[tuple[str, str], tuple[bool, Any]]
) -> BaseRow | None:
    base = base_from_dict(entry["base"])
    if base is None:
        return None
    guid = outcome.get(("dynamics", entry["key"]), (True, None))[1] or entry["dynamics_id"]
    return BaseRow(guid, entry["key"], base)


def _close(
    ctx: RunContext, finished: list[list[Any]], reviews: list[int], loads: Mapping[str, Manifest]
) -> dict[str, int]:
    """Release children and resolve dead letters that went through; mark decisions applied."""
    parked = [m[1] for m in finished if m[0] == "parked"]
    released = ctx.store.release_children(parked, ctx.run_id) if parked else 0
    resolved = 0
    for stage in ("validate", "transform", "resolve", "load", "reconcile"):
        keys = sorted({m[2] for m in finished if m[0] == "dead_letter" and m[1] == stage})
        resolved += ctx.store.resolve_dead_letters(ctx.entity, stage, keys) if keys else 0
    applied = ctx.store.mark_reviews_applied(reviews, ctx.run_id) if reviews else 0
    return {"released": released, "dead_letters_resolved": resolved, "reviews_applied": applied}


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value
