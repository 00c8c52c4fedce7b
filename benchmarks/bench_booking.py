"""The state store's book-keeping of a first run's creates, per record (issue 14).

An entity's first run reserves the key of each record before creating it in Dataverse, fills
that reservation with the record's merge base once the write came back
(``save_base(reserved=True)``), and logs an audit row per write. This script times exactly those
three calls on a SQLite state store, in chunks of ``--chunk`` records (one written plan file's
share), for ``--rows`` customers shaped like ``include/entities/customers.yaml``'s, with its
personal-data fields sealed as in a deployment (a fresh key per run). No Dataverse, no ERP: only
the store's own cost, which the end-to-end benchmarks cannot isolate from the machine's noise.

    .venv/bin/python benchmarks/bench_booking.py --rows 50000

To compare two versions of the code in one session, run it from a worktree of the other one
with ``PYTHONPATH=<worktree>/include``, alternating.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _dataverse import ensure_pii_key, print_table

ROOT = Path(__file__).resolve().parents[1]
ENTITY = "customers"


def records(count: int) -> list[Any]:
    """``count`` merge bases as an initial ERP → Dynamics load stores them: ``bench_privacy``'s
    customers, with both sides' modified timestamps."""
    from bench_privacy import rows
    from d365sync.engine.state import BaseRow

    now = datetime.now(UTC)
    out = []
    for i, row in enumerate(rows(count)):
        base = replace(row.base, dynamics_modified=now, erp_modified=now - timedelta(minutes=i % 600))
        out.append(BaseRow(row.dynamics_id, row.erp_key, base))
    return out


def run(count: int, chunk: int) -> dict[str, float]:
    from d365sync.engine.state import AuditEntry, KeyPair, StateStore
    from d365sync.spec import load_entity

    spec = load_entity(ROOT / "include" / "entities" / f"{ENTITY}.yaml")
    rows = records(count)
    seconds = {"reserve_keys": 0.0, "save_base": 0.0, "audit": 0.0}
    with tempfile.TemporaryDirectory(prefix="d365sync-bench-") as folder:
        store = StateStore.open(f"sqlite:///{folder}/state.db")
        try:
            store.privacy.register(ENTITY, spec.pii_fields)
            assert store.privacy.sealing(ENTITY), "personal data must be sealed, as in a deployment"
            store.start_run("bench", ENTITY)
            for start in range(0, count, chunk):
                part = rows[start : start + chunk]
                t0 = time.perf_counter()
                store.reserve_keys(ENTITY, [KeyPair(None, r.erp_key) for r in part], "bench", unseen=True)
                t1 = time.perf_counter()
                store.save_base(ENTITY, part, "bench", reserved=True)
                t2 = time.perf_counter()
                fields = sorted(part[0].base.values)
                entries = [
                    AuditEntry(r.erp_key, "dynamics", "create", fields, after=r.base.values) for r in part
                ]
                store.audit("bench", ENTITY, entries, "bench")
                t3 = time.perf_counter()
                seconds["reserve_keys"] += t1 - t0
                seconds["save_base"] += t2 - t1
                seconds["audit"] += t3 - t2
            stored = store.load_base(ENTITY, "erp", [rows[0].erp_key, rows[-1].erp_key])
            assert all(s.status == "synced" and s.base is not None for s in stored.values()), stored
        finally:
            store.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000, help="records to book")
    parser.add_argument("--chunk", type=int, default=1_000, help="records per call (a plan file's share)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the fastest is reported per step")
    args = parser.parse_args()
    ensure_pii_key()
    runs = [run(args.rows, args.chunk) for _ in range(args.repeat)]
    best = {step: min(r[step] for r in runs) for step in runs[0]}
    table = [[step, f"{s:.2f}", f"{1e6 * s / args.rows:.1f}"] for step, s in best.items()]
    total = sum(best.values())
    table.append(["all three", f"{total:.2f}", f"{1e6 * total / args.rows:.1f}"])
    print_table(
        f"Book-keeping of {args.rows:,} first-run creates, SQLite, chunks of {args.chunk:,} "
        f"(fastest of {args.repeat})",
        ["step", "s", "µs a record"],
        table,
    )


if __name__ == "__main__":
    main()
