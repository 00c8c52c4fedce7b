"""Sync throughput end to end: the engine against a raw bulk upsert, incremental passes, 1M customers.

Everything is real: the Dataverse sandbox server over HTTP (request limits raised), a SQLite ERP
through the real ODBC driver (``DRIVER={SQLite3}``, seeded with ``CUST_MASTER``), a SQLite state
store, and the customers entity (``include/entities/customers.yaml``) run by ``run_entity``.

1. ``initial`` (``--rows``, default 100,000): the engine's initial sync of N ERP customers into an
   empty Dataverse, beside the raw client baseline: ``DynamicsClient.upsert_many`` of exactly the
   Dynamics payloads the engine writes (taken from the plan files of a dry run made first, with
   ``keep_staging``), into a second, fresh sandbox, so both are creates into an empty table. Reports
   records/s of both, the engine/raw time ratio, Dataverse API requests (token calls are counted
   apart by the sandbox and excluded), requests per 1,000 ERP customers, the stage timings and the
   state-store statement count (a ``before_cursor_execute`` listener on the store's engine).
   Great Expectations is imported before any timed run and its import time shown apart (a worker
   pays it once per process), as in ``bench_engine.py``.
2. ``incremental`` (after ``initial``, same sandbox, ERP and state store): ``--passes`` passes
   (default 3), each after ``--changes`` edits (default 100): half ERP credit limits (an UPDATE of
   ``CUST_MASTER`` that bumps the ``LAST_UPD`` cursor column; the ERP owns the field), half Dynamics
   phone numbers (``telephone1``, Dynamics owns it) through the client. Reports per pass the rows
   read and written per side, state-store statements and Dataverse requests, then checks that
   every edited value reached the other system ("data check: ok", or an exception).
3. ``million`` (``--million-rows``, default 1,000,000): seed + initial sync + one incremental pass
   in a child process (its peak RSS, ``ru_maxrss``, is its own; the sandbox server is a separate
   process and not counted). Goal: peak RSS < 1 GB.

    .venv/bin/python benchmarks/bench_throughput.py                       # initial + incremental, 100k
    .venv/bin/python benchmarks/bench_throughput.py --rows 5000           # a quick check
    .venv/bin/python benchmarks/bench_throughput.py --only million        # 1M customers, child process
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from _dataverse import Cpu, append_ratio, client_for, cpu_spent, ensure_pii_key, print_table, sandbox
from bench_engine import add_currencies

ROOT = Path(__file__).resolve().parents[1]
ENTITY = ROOT / "include" / "entities" / "customers.yaml"
LIMITS = {"requests": 10_000_000, "window_seconds": 300}
CENT = Decimal("0.01")


# ------------------------------------------------------------------------------ measuring
class QueryCounter:
    """Statements the state store sends to its database (one per cursor execute/executemany)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.count = 0
        event.listen(engine, "before_cursor_execute", self._hit)

    def _hit(self, *_: Any) -> None:
        self.count += 1

    def take(self) -> int:
        """Statements since the last call."""
        count, self.count = self.count, 0
        return count


def api_requests(counters: dict[str, Any]) -> int:
    """Dataverse API requests; the sandbox counts token requests apart (``token_requests``)."""
    return int(counters["requests"])


def routes(counters: dict[str, Any]) -> str:
    busiest = sorted(counters.get("routes", {}).items(), key=lambda kv: -kv[1])
    return ", ".join(f"{route} {n}" for route, n in busiest)


def written(result: Any, side: str) -> int:
    """Records the load stage wrote successfully on ``side`` (creates and updates)."""
    counts = result.manifests["load"][side]["counts"]
    return int(counts.get("create", 0) + counts.get("update", 0))


def ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} {n:,}" for op, n in sorted(counts.items()) if n) or "-"


def peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ------------------------------------------------------------------------------ set-up
@dataclass
class Env:
    """One sandbox, ERP, state store and client, seeded with ``rows`` customers."""

    folder: Path
    instance: Any
    erp: Any
    store: Any
    dyn: Any
    spec: Any
    queries: QueryCounter
    chunk_size: int
    seed_s: float
    gx_import_s: float

    def run(self, **options: Any) -> tuple[Any, float, int, dict[str, Any]]:
        """One engine run: result, seconds, state-store statements, sandbox counters."""
        from d365sync.engine.pipeline import run_entity

        options.setdefault("staging", self.folder / "stg")
        self.queries.take()
        self.instance.reset_counters()
        started = time.perf_counter()
        result = run_entity(
            self.spec,
            dynamics=self.dyn,
            erp=self.erp,
            store=self.store,
            chunk_size=self.chunk_size,
            **options,
        )
        seconds = time.perf_counter() - started
        return result, seconds, self.queries.take(), self.instance.counters()


def import_gx() -> float:
    """Import Great Expectations before any timed run (once per process in a worker too); seconds."""
    started = time.perf_counter()
    import great_expectations  # noqa: F401

    return time.perf_counter() - started


@contextmanager
def environment(rows: int, chunk_size: int) -> Iterator[Env]:
    from d365sync.engine.state import StateStore
    from d365sync.erp import ErpClient
    from d365sync.sandbox.erp.seeder import init_sandbox
    from d365sync.spec import load_entity

    with (
        tempfile.TemporaryDirectory(prefix="d365sync-throughput-") as name,
        sandbox(0, limits=LIMITS) as instance,
    ):
        folder = Path(name)
        erp = ErpClient(f"DRIVER={{SQLite3}};Database={folder}/erp.db;")
        try:
            started = time.perf_counter()
            init_sandbox(erp, rows=rows, only=("CURR_CODE_MAP", "CUST_MASTER"))
            seed_s = time.perf_counter() - started
            gx_import_s = import_gx()
            spec = load_entity(ENTITY)
            with client_for(instance) as dyn, StateStore.open(f"sqlite:///{folder}/state.db") as store:
                add_currencies(dyn)
                queries = QueryCounter(store.engine)
                yield Env(folder, instance, erp, store, dyn, spec, queries, chunk_size, seed_s, gx_import_s)
        finally:
            erp.close()


# ------------------------------------------------------------------------------ 1. initial
def planned_payloads(env: Env) -> tuple[list[dict[str, Any]], float]:
    """The Dynamics payloads the engine would upsert, from the plan files of a dry run."""
    from d365sync.engine.staging import Staging

    root = env.folder / "dry"
    started = time.perf_counter()
    result, _, _, _ = env.run(staging=root, dry_run=True, keep_staging=True)
    seconds = time.perf_counter() - started
    staging = Staging(root, result.run_id, env.spec.name)
    payloads = []
    for name in result.manifests["resolve"]["files"]:
        for entry in staging.read(name):
            write = entry["writes"].get("dynamics")
            if write is not None and write["op"] in ("create", "update"):  # what load upserts
                payloads.append(write["payload"])
    staging.remove()
    return payloads, seconds


def raw_upsert(payloads: list[dict[str, Any]]) -> tuple[float, int, int, dict[str, Any], Cpu]:
    """``upsert_many`` of ``payloads`` into a fresh sandbox: seconds, ok, failed, counters, CPU."""
    from d365sync.spec import load_entity

    d = load_entity(ENTITY).dynamics
    with sandbox(0, limits=LIMITS) as instance, client_for(instance) as dyn:
        add_currencies(dyn)
        instance.reset_counters()
        started = time.perf_counter()
        with cpu_spent(instance) as cpu:
            outcomes = dyn.upsert_many(d.entity_set, d.key, payloads, logical_name=d.table)
        seconds = time.perf_counter() - started
        counters = instance.counters()
    ok = sum(1 for o in outcomes if o.ok)
    return seconds, ok, len(outcomes) - ok, counters, cpu


def initial(env: Env, rows: int, *, baseline: bool) -> Any:
    """The initial sync (and, with ``baseline``, the dry run and raw upsert beside it)."""
    payloads: list[dict[str, Any]] = []
    dry_s = 0.0
    if baseline:
        payloads, dry_s = planned_payloads(env)
    with cpu_spent(env.instance) as cpu:
        result, seconds, queries, counters = env.run()
    n = written(result, "dynamics")
    requests = api_requests(counters)
    print(
        f"\ninitial sync: seeded {rows:,} ERP customers in {env.seed_s:.1f}s; "
        f"GX import {env.gx_import_s:.1f}s (before, not timed)"
    )
    plan, load = result.plan, result.manifests["load"]
    print(
        f"initial sync: plan {ops(plan.writes['dynamics'])} (Dynamics), {ops(plan.writes['erp'])} (ERP); "
        f"load failed {load['dynamics']['failed']} (Dynamics), {load['erp']['failed']} (ERP); "
        f"quarantined {plan.totals['quarantined']:,}"
    )
    print(f"initial sync: engine requests by route: {routes(counters)}")
    if not baseline:
        return result
    raw_s, raw_ok, raw_failed, raw_counters, raw_cpu = raw_upsert(payloads)
    print(f"initial sync: dry run (for the payloads) {dry_s:.1f}s, {len(payloads):,} Dynamics payloads")
    print(
        f"initial sync: raw upsert_many: {raw_ok:,} ok, {raw_failed:,} failed, "
        f"{api_requests(raw_counters)} requests ({routes(raw_counters)})"
    )
    print_table(
        f"Initial sync of {rows:,} ERP customers: engine vs raw upsert_many",
        [
            "written in Dynamics",
            "engine s",
            "engine records/s",
            "raw upsert_many s",
            "raw records/s",
            "**engine / raw**",
            "Dataverse requests",
            "requests / 1000 customers",
            "raw requests",
            "state-store queries",
        ],
        [
            [
                f"{n:,}",
                f"{seconds:.1f}",
                f"{n / seconds:,.0f}",
                f"{raw_s:.1f}",
                f"{raw_ok / raw_s:,.0f}",
                f"**{seconds / raw_s:.2f}**",
                f"{requests:,}",
                f"{1000 * requests / rows:.2f}",
                f"{api_requests(raw_counters):,}",
                f"{queries:,}",
            ]
        ],
    )
    cpu_budget(seconds, cpu, result.timings, raw_s, raw_cpu)
    print_table(
        "Initial sync stage timings",
        ["stage", "seconds", "share"],
        [[stage, f"{s:.2f}", f"{100 * s / seconds:.0f} %"] for stage, s in result.timings.items()],
    )
    return result


def cpu_budget(
    seconds: float, cpu: Cpu, timings: dict[str, float], raw_s: float, raw_cpu: Cpu, target: float = 0.6
) -> None:
    """Where the CPU of both runs went, and the shortest engine run this machine allows.

    The sandbox serves both runs on the same cores. An engine run can end no sooner than its
    main thread's CPU time (Python runs one thread at a time), and no sooner than its serial
    start (extract and validate: the whole extract is checked before the first write, so that
    a load over the quarantine threshold writes nothing) followed by all the remaining CPU of
    both processes spread perfectly over every core.
    """
    cores = os.cpu_count() or 1
    serial = sum(timings.get(stage, 0.0) for stage in ("extract_dynamics", "extract_erp", "validate"))
    spread = serial + max(0.0, cpu.process + cpu.sandbox - serial) / cores
    floor = max(cpu.thread, spread)
    print_table(
        f"CPU of the initial sync and the raw upsert ({cores} cores, sandbox on the same machine)",
        ["run", "wall s", "engine / client process CPU s", "of which its main thread", "sandbox CPU s"],
        [
            [name, f"{wall:.1f}", f"{used.process:.1f}", f"{used.thread:.1f}", f"{used.sandbox:.1f}"]
            for name, wall, used in (("engine", seconds, cpu), ("raw upsert_many", raw_s, raw_cpu))
        ],
    )
    print(
        f"\ninitial sync: the engine run cannot end before {floor:.1f} s here: its main thread's CPU is "
        f"{cpu.thread:.1f} s, and {serial:.1f} s of extract and validation before the first write plus "
        f"the rest of both processes' CPU over {cores} cores is {spread:.1f} s. {target:.0%} of the raw "
        f"rate needs it within {raw_s / target:.1f} s"
    )


# -------------------------------------------------------------------------- 2. incremental
@dataclass
class Changes:
    """What one pass edited: ERP credit limits and Dynamics phone numbers, by key."""

    credit: dict[str, Decimal]
    phone: dict[str, str]


def synced_keys(env: Env, rows: int, wanted: int) -> list[str]:
    """``wanted`` customer numbers that exist in Dataverse, spread over the table: seeder numbers
    (``C000000001``…) as candidates, kept when Dataverse has them (quarantined rows never got there)."""
    d = env.spec.dynamics
    step = max(1, rows // (wanted * 3))
    candidates = [f"C{i:09d}" for i in range(1, rows + 1, step)]
    found = {str(r[d.key]).strip() for r in env.dyn.iter_in(d.entity_set, [d.key], d.key, candidates)}
    keys = [k for k in candidates if k in found]
    if len(keys) < wanted:
        raise RuntimeError(f"only {len(keys)} of {wanted} customers to edit found in Dataverse")
    spread = len(keys) / wanted
    return [keys[int(i * spread)] for i in range(wanted)]


def make_changes(env: Env, keys: list[str], pass_no: int) -> Changes:
    """Half the keys: ERP credit limit (+ cursor column); the other half: Dynamics phone number."""
    spec, half = env.spec, len(keys) // 2
    table, key_column = spec.erp_table_spec().name, spec.fields[spec.key].erp
    limit_column, cursor = spec.fields["credit_limit"].erp, spec.erp.change_detection.column
    credit = {k: Decimal(800_000 + 1000 * pass_no + i) + Decimal("0.25") for i, k in enumerate(keys[:half])}
    phone = {k: f"+1 555 {pass_no}{i:04d}" for i, k in enumerate(keys[half:])}
    stamp = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    sql = f"UPDATE {table} SET {limit_column} = ?, {cursor} = ? WHERE {key_column} = ?"
    for key, value in credit.items():
        env.erp.execute([sql], (value, stamp, key))
    d, phone_attr = spec.dynamics, spec.fields["phone"].dynamics
    for key, value in phone.items():
        env.dyn.update(d.entity_set, {d.key: key}, {phone_attr: value})
    return Changes(credit, phone)


def check_data(env: Env, changes: list[Changes]) -> None:
    """Every edited value is in both systems now; raises listing the ones that are not."""
    spec, d = env.spec, env.spec.dynamics
    credit = {k: v for c in changes for k, v in c.credit.items()}
    phone = {k: v for c in changes for k, v in c.phone.items()}
    keys = [*credit, *phone]
    limit_column, phone_column = spec.fields["credit_limit"].erp, spec.fields["phone"].erp
    limit_attr, phone_attr = spec.fields["credit_limit"].dynamics, spec.fields["phone"].dynamics
    key_column = str(spec.fields[spec.key].erp)
    erp_rows = {
        str(r[key_column]).strip(): r
        for chunk in env.erp.read_keys(spec.erp_table_spec(), key_column, keys)
        for r in chunk
    }
    dyn_rows = {
        str(r[d.key]).strip(): r
        for r in env.dyn.iter_in(d.entity_set, [d.key, limit_attr, phone_attr], d.key, keys)
    }
    wrong = []
    for key, value in credit.items():
        erp_value = (erp_rows.get(key) or {}).get(limit_column)
        dyn_value = (dyn_rows.get(key) or {}).get(limit_attr)
        if _money(erp_value) != value or _money(dyn_value) != value:
            wrong.append(f"{key} credit limit: set {value} in the ERP, ERP {erp_value}, Dynamics {dyn_value}")
    for key, value in phone.items():
        erp_value = (erp_rows.get(key) or {}).get(phone_column)
        dyn_value = (dyn_rows.get(key) or {}).get(phone_attr)
        if (erp_value or "").strip() != value or dyn_value != value:
            wrong.append(f"{key} phone: set {value!r} in Dynamics, ERP {erp_value!r}, Dynamics {dyn_value!r}")
    if wrong:
        raise RuntimeError(f"data check failed for {len(wrong)} of {len(keys)} edits:\n" + "\n".join(wrong))
    sides = f"{len(credit)} ERP credit limits in Dynamics, {len(phone)} Dynamics phones in the ERP"
    print(f"\ndata check: ok ({sides})")


def _money(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value)).quantize(CENT)


def incremental_pass(env: Env, keys: list[str], pass_no: int) -> tuple[Changes, dict[str, Any]]:
    """Edit, run; the pass's figures: seconds, rows read and written per side, statements, requests."""
    changes = make_changes(env, keys, pass_no)
    result, seconds, queries, counters = env.run()
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"\npass {pass_no}: requests by route: {routes(counters)}; stage timings: {timings}")
    stats = {
        "pass": pass_no,
        "seconds": seconds,
        "extracted": result.plan.extracted,
        "writes": result.plan.writes,
        "queries": queries,
        "requests": api_requests(counters),
        "retried": retried(result),
    }
    return changes, stats


def pass_row(stats: dict[str, Any]) -> list[Any]:
    read, writes = stats["extracted"], stats["writes"]
    return [
        stats["pass"],
        f"{stats['seconds']:.2f}",
        f"{read['erp']:,}",
        f"{read['dynamics']:,}",
        ops(writes["erp"]),
        ops(writes["dynamics"]),
        f"{stats['queries']:,}",
        f"{stats['requests']:,}",
    ]


INCREMENTAL_HEADER = [
    "pass",
    "engine s",
    "read ERP",
    "read Dynamics",
    "writes ERP",
    "writes Dynamics",
    "state-store queries",
    "Dataverse requests",
]


def incremental(env: Env, rows: int, passes: int, changes: int) -> None:
    keys = synced_keys(env, rows, (passes + 2) * changes)  # 2 more for the backlog
    done, table = [], []
    for p in range(passes):
        edited, stats = incremental_pass(env, keys[p * changes : (p + 1) * changes], p + 1)
        done.append(edited)
        table.append(pass_row(stats))
    half = changes // 2
    print_table(
        f"Incremental passes after the initial sync ({half} ERP + {changes - half} Dynamics edits each)",
        INCREMENTAL_HEADER,
        table,
    )
    check_data(env, done)
    backlog(env, keys[passes * changes :], changes)


def make_letters_due(env: Env) -> int:
    """Every pending dead letter due now, as after an initial load that outlasted the backoff."""
    from sqlalchemy import update

    from d365sync.engine.migrations import schema

    d = schema.dead_letter
    past = datetime(2000, 1, 1, tzinfo=UTC)
    with env.store.engine.begin() as conn:
        query = update(d).where(d.c.entity == env.spec.name, d.c.status == "pending")
        return conn.execute(query.values(next_retry_at=past)).rowcount


def retried(result: Any) -> int:
    """Rows a run re-read from the sources for due dead letters (both sides)."""
    return sum(m.get("replayed", 0) for m in result.manifests.get("extract", {}).values())


def backlog(env: Env, keys: list[str], changes: int) -> None:
    """The same change on top of a due dead-letter backlog: the whole backlog retried in one run (as
    before, up to 10,000) against the per-run share (``retries_per_run``, default 2,000)."""
    from d365sync.engine.stages.context import RunContext

    rows = []
    share = RunContext.__dataclass_fields__["retries_per_run"].default
    for label, limit in (("whole backlog (up to 10,000)", 10_000), (f"per-run share ({share:,})", share)):
        due = make_letters_due(env)
        edited = make_changes(env, keys[:changes], 90 + len(rows))
        keys = keys[changes:]
        result, seconds, queries, _ = env.run(retries_per_run=limit)
        check_data(env, [edited])
        validate = result.timings.get("validate", 0.0)
        rows.append([label, f"{due:,}", f"{retried(result):,}", f"{seconds:.2f}", f"{validate:.2f}", queries])
    append_ratio(rows, 3)
    print_table(
        f"{changes} edits on top of a due dead-letter backlog",
        ["retries", "letters due", "rows re-read", "engine s", "validate s", "state-store queries", "ratio"],
        rows,
    )


def throughput(args: argparse.Namespace, *, initial_table: bool, incremental_table: bool) -> None:
    with environment(args.rows, args.chunk_size) as env:
        initial(env, args.rows, baseline=initial_table)
        if incremental_table:
            incremental(env, args.rows, args.passes, args.changes)


# ------------------------------------------------------------------------------ 3. million
def million(rows: int, chunk_size: int, changes: int) -> None:
    """Run the child, parse its last line, print the table."""
    command = [
        sys.executable,
        __file__,
        "--child-million",
        str(rows),
        "--chunk-size",
        str(chunk_size),
        "--changes",
        str(changes),
    ]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit(f"the --child-million run failed (exit {out.returncode})")
    *lines, last = out.stdout.strip().splitlines()
    for line in lines:
        if line.strip():
            print(f"child: {line}")
    r = json.loads(last)
    mb, end_mb = r["maxrss_initial_kb"] / 1024, r["maxrss_end_kb"] / 1024
    print(
        f"\nmillion: plan of the initial sync: {r['plan_writes']}; incremental: read {r['incr_extracted']}, "
        f"writes {r['incr_writes']}; {r['incr_due_letters']:,} dead letters were due, "
        f"{r['incr_retried']:,} rows re-read for them (the run's share)"
    )
    print_table(
        f"{rows:,} customers in a child process: initial sync, peak RSS, one incremental pass",
        [
            "customers",
            "seed s",
            "GX import s (excluded)",
            "initial sync s",
            "written in Dynamics",
            "records/s",
            "peak RSS MB",
            "< 1 GB",
            "peak RSS MB after the pass",
            "incremental s",
            "incremental state-store queries",
            "incremental Dataverse requests",
        ],
        [
            [
                f"{rows:,}",
                f"{r['seed_s']:.1f}",
                f"{r['gx_import_s']:.1f}",
                f"{r['sync_s']:.1f}",
                f"{r['written']:,}",
                f"{r['written'] / r['sync_s']:,.0f}",
                f"{mb:,.0f}",
                "yes" if mb < 1024 else "no",
                f"{end_mb:,.0f}",
                f"{r['incr_s']:.2f}",
                f"{r['incr_queries']:,}",
                f"{r['incr_requests']:,}",
            ]
        ],
    )


def _child_million(rows: int, chunk_size: int, changes: int) -> None:
    with environment(rows, chunk_size) as env:
        result, sync_s, queries, counters = env.run()
        maxrss_initial = peak_rss_kb()
        keys = synced_keys(env, rows, changes)
        due = make_letters_due(env)  # what an initial load longer than the backoff leaves
        edited, stats = incremental_pass(env, keys, 1)
        check_data(env, [edited])
        summary = {
            "rows": rows,
            "seed_s": env.seed_s,
            "gx_import_s": env.gx_import_s,
            "sync_s": sync_s,
            "written": written(result, "dynamics"),
            "plan_writes": result.plan.writes,
            "sync_queries": queries,
            "sync_requests": api_requests(counters),
            "maxrss_initial_kb": maxrss_initial,
            "incr_s": stats["seconds"],
            "incr_extracted": stats["extracted"],
            "incr_writes": stats["writes"],
            "incr_queries": stats["queries"],
            "incr_requests": stats["requests"],
            "incr_due_letters": due,
            "incr_retried": stats["retried"],
            "maxrss_end_kb": peak_rss_kb(),
        }
    print(json.dumps(summary))


# ---------------------------------------------------------------------------------- main
def main() -> None:
    ensure_pii_key()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="ERP customers for initial/incremental")
    parser.add_argument("--million-rows", type=int, default=1_000_000, help="customers for --only million")
    parser.add_argument(
        "--only",
        choices=("initial", "incremental", "million"),
        default=None,
        help="one section (default: initial and incremental)",
    )
    parser.add_argument("--chunk-size", type=int, default=10_000, help="run_entity chunk_size")
    parser.add_argument("--passes", type=int, default=3, help="incremental passes")
    parser.add_argument("--changes", type=int, default=100, help="edits before each pass (half per side)")
    parser.add_argument("--child-million", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_million is not None:
        _child_million(args.child_million, args.chunk_size, args.changes)
        return
    if args.only == "million":
        million(args.million_rows, args.chunk_size, args.changes)
        return
    throughput(
        args,
        initial_table=args.only in (None, "initial"),
        incremental_table=args.only in (None, "incremental"),
    )


if __name__ == "__main__":
    main()
