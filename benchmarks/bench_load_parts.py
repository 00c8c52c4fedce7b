"""Partitioned initial load: one Dataverse load split over 2 worker processes against 1.

The plan (extract → validate → transform → resolve) of an initial sync of ``--rows`` ERP
customers is made once per trial, untimed, against a PostgreSQL ERP (the PostgreSQL ODBC
driver) and a PostgreSQL state store. Then the Dynamics load is timed: with 1 worker, the whole
load in one worker process; with 2 workers, ``load(part=i, parts=2)`` in two processes at once, as two
mapped ``load_dynamics`` task instances would run it (each process pays its own start-up, as a
task does). Each trial writes into a fresh sandbox and a fresh state-store schema; both end with
``commit`` and a check that every record exists once and the key map holds its GUID.

    .venv/bin/python benchmarks/bench_load_parts.py --rows 50000
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _dataverse import append_ratio, ensure_pii_key, print_table, sandbox
from _erp_targets import target

ROOT = Path(__file__).resolve().parents[1]
STATE_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
LIMITS = {"requests": 10_000_000, "window_seconds": 300}


@contextmanager
def state_schema() -> Any:
    """A private PostgreSQL schema for one trial's state store, dropped afterwards."""
    from sqlalchemy import create_engine, text

    tag = f"state_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(STATE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{tag}"'))
    try:
        yield tag
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{tag}" CASCADE'))
        admin.dispose()


def _context(config: dict[str, Any], odbc: str, schema: str, staging: str, run_id: str) -> Any:
    from d365sync.dynamics import DynamicsClient, DynamicsConfig
    from d365sync.engine.stages import RunContext
    from d365sync.engine.state import StateStore
    from d365sync.erp import ErpClient
    from d365sync.spec import load_entity

    spec = load_entity(ROOT / "include" / "entities" / "customers.yaml")
    store = StateStore.open(STATE_URL, schema=schema)
    dynamics, erp = DynamicsClient(DynamicsConfig(**config)), ErpClient(odbc)
    return RunContext(spec, dynamics, erp, store, staging, run_id=run_id)


def _close(ctx: Any) -> None:
    ctx.store.close()
    ctx.erp.close()
    ctx.dynamics.close()


def _part(args: tuple[dict[str, Any], str, str, str, str, dict[str, Any], int, int]) -> dict[str, Any]:
    """One worker process: its part of the Dynamics load."""
    from d365sync.engine.stages import load

    config, odbc, schema, staging, run_id, resolved, part, parts = args
    started = time.perf_counter()
    ctx = _context(config, odbc, schema, staging, run_id)
    try:
        manifest = load(ctx, resolved, "dynamics", part, parts)
    finally:
        _close(ctx)
    return manifest | {"seconds": time.perf_counter() - started}


def trial(workers: int, odbc: str, rows: int, chunk: int) -> list[Any]:
    from d365sync.engine.stages import commit, extract, load, resolve, transform, validate
    from d365sync.engine.stages.load import merge_loads

    with (
        sandbox(0, limits=LIMITS) as instance,
        state_schema() as schema,
        tempfile.TemporaryDirectory(prefix="d365sync-parts-") as staging,
    ):
        config = {
            "environment_url": instance.base_url,
            "tenant_id": instance.tenant,
            "client_id": instance.client_id,
            "client_secret": instance.client_secret,
            "authority_host": instance.base_url,
            "verify": instance.verify,
        }
        run_id = f"bench_parts_{workers}"
        ctx = _context(config, odbc, schema, staging, run_id)
        ctx.chunk_size = chunk
        try:
            ctx.store.start_run(run_id, ctx.entity)
            m = {"extract": {s: extract(ctx, s) for s in ("dynamics", "erp")}}
            resolved = resolve(ctx, transform(ctx, validate(ctx, m["extract"])))
            erp_load = load(ctx, resolved, "erp")
            instance.reset_counters()
            jobs = [(config, odbc, schema, staging, run_id, resolved, i, workers) for i in range(workers)]
            started = time.perf_counter()
            with multiprocessing.get_context("spawn").Pool(workers) as pool:  # 1 worker: a process too
                parts = pool.map(_part, jobs)
            seconds = time.perf_counter() - started
            requests = int(instance.counters()["requests"])
            dynamics = merge_loads(parts)
            commit(ctx, resolved, {"erp": erp_load, "dynamics": dynamics})
            written = dynamics["counts"].get("create", 0)
            _check(ctx, written)
        finally:
            _close(ctx)
    slowest = max(p["seconds"] for p in parts)
    rate = f"{written / seconds:,.0f}"
    return [workers, f"{written:,}", f"{seconds:.1f}", rate, f"{slowest:.1f}", requests]


def _check(ctx: Any, written: int) -> None:
    """Every record exists once in Dataverse and the key map holds its GUID."""
    rows = list(ctx.dynamics.iter_rows("accounts", ["accountid", "accountnumber"]))
    numbers = {r["accountnumber"]: r["accountid"].lower() for r in rows}
    stored = ctx.store.load_base(ctx.entity, "erp", list(numbers))
    bad = len(rows) != len(numbers) or len(rows) != written
    bad = bad or any(stored[k].dynamics_id != guid or stored[k].base is None for k, guid in numbers.items())
    if bad:
        raise RuntimeError(f"check failed: {len(rows)} accounts, {len(numbers)} keys, {written} written")
    print(f"check: {written:,} accounts, each once, GUIDs in the key map")


def main() -> None:
    ensure_pii_key()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--chunk-size", type=int, default=5_000)
    args = parser.parse_args()
    import great_expectations  # noqa: F401  (imported once, before anything is timed)

    from d365sync.sandbox.erp.seeder import init_sandbox

    table = []
    with target("postgresql") as odbc:
        from d365sync.erp import ErpClient

        with ErpClient(odbc) as erp:
            init_sandbox(erp, rows=args.rows, only=("CURR_CODE_MAP", "CUST_MASTER"))
        for workers in (1, 2):
            table.append(trial(workers, odbc, args.rows, args.chunk_size))
            print(f"{workers} worker(s): done", file=sys.stderr)
    one, two = float(table[0][2]), float(table[1][2])
    append_ratio(table, 2, speed_up=True)
    print_table(
        f"Partitioned Dynamics load of an initial sync of {args.rows:,} customers (PostgreSQL ERP + state)",
        ["workers", "written", "load s (wall)", "records/s", "slowest part s", "API requests", "speed-up"],
        table,
    )
    print(f"\n2 workers / 1 worker: {one / two:.2f}x")


if __name__ == "__main__":
    main()
