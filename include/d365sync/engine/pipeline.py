"""One entity run: extract → validate → transform → resolve → load → commit, and its plan.

Why this shape: the DAG of the Airflow issue runs each stage as its own task (extracts in
parallel, loads in parallel) passing only manifests; :func:`run_entity` runs the very same
functions in one process for the CLI, tests and benchmarks. A dry run stops after resolve and
returns a :class:`Plan` — creates, updates and deactivations per side with changed fields,
conflicts and how they resolve, quarantined rows, parked children — having written nothing,
to either system or to the state store.

Airflow-free by rule (a test enforces it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from d365sync.engine.pii import mask_text
from d365sync.engine.stages import (
    Extraction,
    RunContext,
    RunValidationFailed,
    Window,
    commit,
    extract,
    resolve,
    validate_and_transform,
)
from d365sync.engine.stages.context import SIDES, Manifest, fewer_collections
from d365sync.engine.stages.load import Loading
from d365sync.engine.staging import PathLike
from d365sync.engine.state import StateStore

if TYPE_CHECKING:
    from d365sync.spec import EntitySpec

__all__ = ["Plan", "RunResult", "RunValidationFailed", "Window", "run_entity"]


@dataclass
class Plan:
    """What a run would do (dry run) or did; :meth:`render` prints it for people."""

    entity: str
    dry_run: bool
    extracted: dict[str, int]
    quarantined: list[dict[str, Any]]
    transform_errors: list[dict[str, Any]]
    writes: dict[str, dict[str, int]]
    write_samples: list[dict[str, Any]]
    conflicts: list[dict[str, Any]]
    resolved: list[dict[str, Any]]
    reports: list[dict[str, Any]]
    parked: list[dict[str, Any]]
    totals: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, ctx: RunContext, manifests: dict[str, Manifest]) -> Plan:
        ex, va, tr, re_ = (manifests[k] for k in ("extract", "validate", "transform", "resolve"))
        samples = re_["samples"]
        totals = {k: re_[k] for k in ("records", "conflicts", "echoes", "stale", "reports", "resolved")}
        totals |= {"quarantined": sum(va["quarantined"].values()) + tr["quarantined"], "review": tr["review"]}
        totals["parked"] = tr["parked"] + re_["parked"]
        return cls(
            ctx.entity,
            ctx.dry_run,
            {s: ex[s]["rows"] for s in SIDES},
            va["samples"],
            tr["samples"],
            re_["counts"],
            samples["writes"],
            samples["conflicts"],
            samples["resolved"],
            samples["reports"],
            tr["parked_items"] + re_["parked_items"],
            totals,
        )

    def render(self, limit: int = 20) -> str:
        """A readable plan: one section per kind, at most ``limit`` examples each."""
        head = "DRY RUN — nothing was written" if self.dry_run else "run"
        lines = [f"== {self.entity}: {head}"]
        lines.append("extracted: " + ", ".join(f"{s} {n}" for s, n in self.extracted.items()))
        for side in SIDES:
            ops = self.writes.get(side) or {}
            summary = ", ".join(f"{op} {n}" for op, n in sorted(ops.items())) or "nothing"
            lines.append(f"{side}: {summary}")
            lines += _items(
                [w for w in self.write_samples if w["side"] == side],
                limit,
                lambda w: f"  {w['op']:<10} {w['key']}  {', '.join(w['fields']) or '-'}",
            )
        lines += _section("conflicts resolved by policy", self.resolved, limit, _resolution)
        lines += _section("conflicts for manual review", self.conflicts, limit, _conflict)
        lines += _section("quarantined rows", self.quarantined + self.transform_errors, limit, _quarantine)
        lines += _section("parked children (waiting for a parent)", self.parked, limit, _parked)
        lines += _section("reported, not applied", self.reports, limit, _report)
        lines.append("totals: " + ", ".join(f"{k} {v}" for k, v in self.totals.items()))
        return "\n".join(mask_text(line) for line in lines)  # printed: never a raw e-mail, phone or secret


def _section(
    title: str, items: list[dict[str, Any]], limit: int, fmt: Callable[[dict[str, Any]], str]
) -> list[str]:
    return (
        [f"{title}: {len(items)}{'+' if len(items) >= 200 else ''}", *_items(items, limit, fmt)]
        if items
        else []
    )


def _items(items: list[dict[str, Any]], limit: int, fmt: Callable[[dict[str, Any]], str]) -> list[str]:
    lines = [fmt(item) for item in items[:limit]]
    return lines + ([f"  … and {len(items) - limit} more"] if len(items) > limit else [])


def _resolution(c: dict[str, Any]) -> str:
    return f"  {c['key']}.{c['field']}: {c['winner']} wins — {c['reason']}"


def _conflict(c: dict[str, Any]) -> str:
    return f"  {c['key']}.{c['field']}: {c['reason']}"


def _quarantine(q: dict[str, Any]) -> str:
    return f"  {q['side']} {q['key']}: {q.get('disposition', 'quarantine')} — {q['reason']}"


def _parked(p: dict[str, Any]) -> str:
    return f"  {p['key']} waits for {p['parent']}"


def _report(r: dict[str, Any]) -> str:
    return f"  {r['key']}{'.' + r['field'] if r['field'] else ''}: {r['reason']}"


@dataclass
class RunResult:
    """The manifests of every stage that ran, the plan and the timings."""

    run_id: str
    plan: Plan
    manifests: dict[str, Any]
    timings: dict[str, float]

    @property
    def counts(self) -> dict[str, int]:
        """Flat counts for the run report and ``make sync``'s summary table."""
        out = {f"extracted_{s}": n for s, n in self.plan.extracted.items()}
        out |= {f"{s}_{op}": n for s, ops in self.plan.writes.items() for op, n in ops.items()}
        out |= self.plan.totals
        for side, manifest in self.manifests.get("load", {}).items():
            out[f"{side}_failed"] = manifest["failed"]
            if "deferred" in manifest:  # changed in Dataverse since the extract: next run merges
                out[f"{side}_deferred"] = manifest["deferred"]
        return out


def run_entity(
    spec: EntitySpec,
    *,
    dynamics: Any,
    erp: Any,
    store: StateStore,
    staging: PathLike | str,
    dry_run: bool = False,
    window: Window | None = None,
    run_id: str | None = None,
    chunk_size: int = 5000,
    validator: Any = None,
    keep_staging: bool = False,
    actor: str = "d365sync",
    retries_per_run: int = 2_000,
    data_docs_dir: str | None = None,
    progress_every: float = 30.0,
) -> RunResult:
    """Run every stage for one entity; a dry run stops after resolve and writes nothing."""
    ctx = RunContext(
        spec,
        dynamics,
        erp,
        store,
        staging,
        dry_run=dry_run,
        window=window,
        chunk_size=chunk_size,
        actor=actor,
        retries_per_run=retries_per_run,
        data_docs_dir=data_docs_dir,
        progress_every=progress_every,
        plan_files="all" if keep_staging else "none" if dry_run else "commit",
    )
    ctx.validator = validator
    if run_id:
        ctx.run_id = run_id
    if not dry_run:
        store.start_run(ctx.run_id, ctx.entity)
    timings: dict[str, float] = {}
    try:
        with fewer_collections():
            result = _run(ctx, timings)
    except BaseException as exc:
        if not dry_run:
            store.discard_watermarks(ctx.entity, ctx.run_id)
            store.finish_run(
                ctx.run_id,
                ctx.entity,
                "failed",
                timings=timings,
                error=mask_text(f"{type(exc).__name__}: {exc}")[:2000],
            )
        raise
    finally:
        if not keep_staging:
            ctx.staging.remove()
    if not dry_run:
        store.finish_run(ctx.run_id, ctx.entity, "success", result.counts, timings)
    return result


def _run(ctx: RunContext, timings: dict[str, float]) -> RunResult:
    def timed(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return fn()
        finally:
            timings[name] = round(time.perf_counter() - started, 3)

    m: dict[str, Any] = {"extract": {"dynamics": timed("extract_dynamics", lambda: extract(ctx, "dynamics"))}}
    # One pass in one process: the checked rows go straight to the transform (no valid/ files),
    # and an ERP table read whole goes straight to validation (no extract/erp files).
    erp = Extraction(ctx, "erp")
    bound = erp.row_bound()
    if bound is None:
        m["extract"]["erp"] = timed("extract_erp", lambda: erp.finish(erp.write()))
        whole = None
    else:
        whole = (erp, bound)
    m["validate"], m["transform"] = validate_and_transform(ctx, m["extract"], timings, whole)
    if whole is not None:
        m["extract"]["erp"] = erp.manifest
    if ctx.dry_run:
        m["resolve"] = timed("resolve", lambda: resolve(ctx, m["transform"]))
    else:
        m["resolve"], m["load"] = _resolve_and_load(ctx, m["transform"], timings)
        m["commit"] = timed("commit", lambda: commit(ctx, m["resolve"], m["load"]))
    return RunResult(ctx.run_id, Plan.of(ctx, m), m, timings)


def _resolve_and_load(
    ctx: RunContext, transformed: Manifest, timings: dict[str, float]
) -> tuple[Manifest, dict[str, Manifest]]:
    """Resolve, with both loads taking each plan file as soon as it is written: Dataverse and
    the ERP write bucket N while this process merges bucket N+1.

    The timings stay per stage: ``resolve`` is the merging itself, ``load_<side>`` the time this
    process spent handing that side its files and booking what came back (bases, audit rows,
    dead letters), waiting included. Together they are the wall time of the two stages.
    """
    loads = {side: Loading(ctx, side) for side in ("erp", "dynamics")}
    spent = dict.fromkeys(loads, 0.0)

    def planned(name: str, entries: list[dict[str, Any]]) -> None:
        for side, loading in loads.items():
            started = time.perf_counter()
            loading.add(name, entries)
            spent[side] += time.perf_counter() - started

    try:
        started = time.perf_counter()
        resolved = resolve(ctx, transformed, planned)
        timings["resolve"] = round(time.perf_counter() - started - sum(spent.values()), 3)
        manifests = {}
        for side, loading in loads.items():
            loading.progress.total = sum(resolved["counts"][side].values())  # known now
            started = time.perf_counter()
            manifests[side] = loading.finish()
            timings[f"load_{side}"] = round(spent[side] + time.perf_counter() - started, 3)
        return resolved, manifests
    finally:
        for loading in loads.values():
            loading.close()
