"""Sync engine figures: in-memory stage throughput, peak RSS of a large plan, a full initial sync.

1. transform + validate + resolve on ``--rows`` customers (default 100,000), records/s with no
   I/O (rows are generated in memory by the ERP seeder; no Parquet, no state store; the merge
   runs against an empty base, as in an initial sync). GX's import time is measured separately
   and excluded. Goal ≥ 20,000 records/s.
2. Peak RSS of a 1,000,000-customer initial sync *plan* (``--plan-rows``): a dry run through
   extract → validate → transform → resolve against a seeded SQLite ERP and an empty sandbox, in
   a child process, read with ``resource.getrusage``. Goals: < 1 GB, and under 120 s (issue 14).
   ``--profile N`` runs it under cProfile and prints the N functions with the most own time.
3. A full initial sync of ``--rows`` customers end to end: SQLite ERP → sandbox (limits raised),
   records/s and Dataverse API requests per 1,000 records.

    .venv/bin/python benchmarks/bench_engine.py --rows 100000 --plan-rows 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _dataverse import client_for, ensure_pii_key, print_table, sandbox

ROOT = Path(__file__).resolve().parents[1]


def _validation_batch() -> int:
    """The pipeline's validation batch size, so the in-memory figures match a real run."""
    from d365sync.engine.stages.context import RunContext

    return int(RunContext.__dataclass_fields__["validation_batch"].default)


CHUNK = 10_000  # extract chunk (rows per Parquet file) for the plan and sync runs


def erp_rows(count: int) -> list[dict[str, Any]]:
    """Customers exactly as the seeder makes them (with its default dirty data), as dicts."""
    from d365sync.sandbox.erp import tables
    from d365sync.sandbox.erp.seeder import DirtyRates, Seeder

    spec = tables.CUST_MASTER
    names = spec.column_names
    return [dict(zip(names, row, strict=True)) for row in Seeder(count, 42, DirtyRates()).customer_rows(spec)]


def stage_throughput(rows: int) -> list[list[Any]]:
    from d365sync.engine.merge import RecordInput, SideRecord, merge_record
    from d365sync.engine.transforms import DictLookup, TransformContext
    from d365sync.spec import load_entity

    spec = load_entity(ROOT / "include" / "entities" / "customers.yaml")
    data = erp_rows(rows)
    started = time.perf_counter()
    import great_expectations  # noqa: F401  (timed here so the stages below exclude it)

    import_s = time.perf_counter() - started
    from d365sync.engine.validation import validate

    with contextlib.suppress(Exception):  # warm-up, excluded like the import; may fail the threshold
        validate(spec, "erp", data[:100], key_column="CUST_NO")
    ctx = TransformContext(
        lookup=DictLookup(
            {"currency": {c: f"guid-{c}" for c in ("GBP", "USD", "EUR", "CHF", "JPY", "SEK", "CAD")}}
        )
    )
    rules, plan = spec.merge_rules(), spec.plan
    times = {"validate": 0.0, "transform": 0.0, "resolve": 0.0}
    counts = {"valid": 0, "canonical": 0, "writes": 0}
    batch = _validation_batch()
    for i in range(0, rows, batch):
        chunk = data[i : i + batch]
        t0 = time.perf_counter()
        try:
            valid = validate(spec, "erp", chunk, key_column="CUST_NO").valid_rows
        except Exception as exc:  # past the threshold: the valid rows still continue
            valid = exc.valid_rows  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        mapped = plan.map_rows("erp", valid, ctx)
        t2 = time.perf_counter()
        for record in mapped.records:
            decision = merge_record(rules, RecordInput(record["number"], erp=SideRecord(record)))
            for write in decision.writes:
                plan.from_canonical(write.side, write.fields, ctx)
                counts["writes"] += 1
        t3 = time.perf_counter()
        times["validate"] += t1 - t0
        times["transform"] += t2 - t1
        times["resolve"] += t3 - t2
        counts["valid"] += len(valid)
        counts["canonical"] += len(mapped.records)
    total = sum(times.values())
    out = [[stage, f"{seconds:.2f}", f"{rows / seconds:,.0f}"] for stage, seconds in times.items()]
    out.append(["**transform + validate + resolve**", f"{total:.2f}", f"**{rows / total:,.0f}**"])
    out.append(["(GX import, excluded)", f"{import_s:.2f}", "-"])
    kept = f"valid {counts['valid']:,}, canonical {counts['canonical']:,}, writes {counts['writes']:,}"
    print(f"\nrows {rows:,}: {kept}")
    return out


def plan_rss(rows: int, profile: int = 0) -> list[list[Any]]:
    """Run the dry-run plan in a child so its peak RSS is its own; with ``profile``, under
    cProfile, printing the top ``profile`` functions by own time (the times run slower)."""
    command = [sys.executable, __file__, "--child-plan", str(rows), "--profile", str(profile)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    *report, last = out.stdout.strip().splitlines()
    if report:
        print("\n".join(report))
    result = json.loads(last)
    mb = result["maxrss_kb"] / 1024
    return [
        [
            f"{rows:,}",
            f"{result['seed_s']:.0f}",
            f"{result['plan_s']:.0f}",
            f"{mb:,.0f}",
            "yes" if mb < 1024 else "no",
        ],
    ]


def _child_plan(rows: int, profile: int = 0) -> None:
    from d365sync.engine.pipeline import run_entity
    from d365sync.engine.state import StateStore
    from d365sync.erp import ErpClient
    from d365sync.sandbox.erp.seeder import init_sandbox
    from d365sync.spec import load_entity

    with tempfile.TemporaryDirectory(prefix="d365sync-plan-") as folder, sandbox(1) as instance:
        erp = ErpClient(f"DRIVER={{SQLite3}};Database={folder}/erp.db;")
        t0 = time.perf_counter()
        init_sandbox(erp, rows=rows, only=("CURR_CODE_MAP", "CUST_MASTER"))
        t1 = time.perf_counter()
        spec = load_entity(ROOT / "include" / "entities" / "customers.yaml")
        with client_for(instance) as dyn, StateStore.open(f"sqlite:///{folder}/state.db") as store:
            add_currencies(dyn)
            profiler = cProfile.Profile() if profile else None
            with profiler or contextlib.nullcontext():
                result = run_entity(
                    spec,
                    dynamics=dyn,
                    erp=erp,
                    store=store,
                    staging=Path(folder) / "stg",
                    dry_run=True,
                    chunk_size=CHUNK,
                )
        t2 = time.perf_counter()
        if profiler is not None:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(profile)
            print("\n".join(line[:160] for line in text.getvalue().splitlines() if line.strip()))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        summary = {"maxrss_kb": rss, "seed_s": t1 - t0, "plan_s": t2 - t1, "writes": result.plan.writes}
        print(json.dumps(summary))


def add_currencies(dyn: Any) -> None:
    """The ERP uses CHF/JPY/SEK/CAD too; the sandbox seeds only USD/EUR/GBP."""
    rows = [
        {
            "isocurrencycode": c,
            "currencyname": c,
            "currencysymbol": c,
            "exchangerate": 1.0,
            "currencyprecision": 2,
        }
        for c in ("CHF", "JPY", "SEK", "CAD")
    ]
    dyn.upsert_many("transactioncurrencies", "isocurrencycode", rows, logical_name="transactioncurrency")


def full_sync(rows: int) -> list[list[Any]]:
    """The initial sync of ``rows`` customers, then an update pass (every ERP credit limit
    changes): Dataverse requests per 1,000 records against the minimum of one UpsertMultiple
    per 1,000, with the load's freshness check (one change-feed read per chunk) counted apart."""
    from d365sync.engine.pipeline import run_entity
    from d365sync.engine.state import StateStore
    from d365sync.erp import ErpClient
    from d365sync.sandbox.erp.seeder import init_sandbox
    from d365sync.spec import load_entity

    limits = {"requests": 10_000_000, "window_seconds": 300}
    table = []
    with (
        tempfile.TemporaryDirectory(prefix="d365sync-sync-") as folder,
        sandbox(1, limits=limits) as instance,
    ):
        erp = ErpClient(f"DRIVER={{SQLite3}};Database={folder}/erp.db;")
        init_sandbox(erp, rows=rows, only=("CURR_CODE_MAP", "CUST_MASTER"))
        spec = load_entity(ROOT / "include" / "entities" / "customers.yaml")
        with client_for(instance) as dyn, StateStore.open(f"sqlite:///{folder}/state.db") as store:
            add_currencies(dyn)
            for name in ("initial sync (creates)", "update pass (ERP credit limits)"):
                if table:
                    erp.execute(["UPDATE CUST_MASTER SET CREDIT_LIMIT = COALESCE(CREDIT_LIMIT, 0) + 1"])
                instance.reset_counters()
                started = time.perf_counter()
                result = run_entity(
                    spec, dynamics=dyn, erp=erp, store=store, staging=Path(folder) / "stg", chunk_size=CHUNK
                )
                seconds = time.perf_counter() - started
                table.append(_sync_row(name, result, seconds, instance.counters()))
    return table


def _sync_row(name: str, result: Any, seconds: float, counters: dict[str, Any]) -> list[Any]:
    writes = result.plan.writes["dynamics"]
    written = writes.get("create", 0) + writes.get("update", 0)
    load = result.manifests["load"]["dynamics"]
    requests = int(counters["requests"])
    routes = counters.get("routes", {}).items()
    bulk = sum(n for route, n in routes if "UpsertMultiple" in route or "CreateMultiple" in route)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    print(f"\n{name} stage timings: {stages}")
    return [
        name,
        f"{written:,}",
        f"{seconds:.1f}",
        f"{written / seconds:,.0f}",
        requests,
        bulk,
        load["freshness_checks"],
        load["deferred"],
        f"{1000 * requests / max(written, 1):.2f}",
        f"{1000 * (bulk + load['freshness_checks']) / max(written, 1):.2f}",
        f"{1000 * -(-written // 1000) / max(written, 1):.2f}",
    ]


def main() -> None:
    ensure_pii_key()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--plan-rows", type=int, default=1_000_000)
    parser.add_argument("--only", choices=("stages", "rss", "sync"), default=None)
    parser.add_argument("--child-plan", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile", type=int, default=0, help="profile the plan run: print the top N functions by own time"
    )
    args = parser.parse_args()
    if args.child_plan is not None:
        _child_plan(args.child_plan, args.profile)
        return
    if args.only in (None, "stages"):
        print_table(
            f"Stage throughput on {args.rows:,} customers (no I/O)",
            ["stage", "seconds", "records/s"],
            stage_throughput(args.rows),
        )
    if args.only in (None, "rss"):
        print_table(
            "Peak RSS of an initial sync plan (dry run, child process)",
            ["customers", "seed s", "plan s", "peak RSS MB", "< 1 GB"],
            plan_rss(args.plan_rows, args.profile),
        )
    if args.only in (None, "sync"):
        print_table(
            f"Sync of {args.rows:,} customers, SQLite ERP → Dataverse sandbox",
            [
                "run",
                "written in Dynamics",
                "seconds",
                "records/s",
                "API requests",
                "Create/UpsertMultiple",
                "freshness checks",
                "deferred",
                "requests / 1000",
                "writes + checks / 1000",
                "minimum / 1000",
            ],
            full_sync(args.rows),
        )


if __name__ == "__main__":
    main()
