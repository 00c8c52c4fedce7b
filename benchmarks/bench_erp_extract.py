"""Extract 1,000,000 rows from the ERP through a cursor extract: peak RSS and rows/s per dialect.

The table is seeded first (CUST_MASTER only, deterministic seed); the extraction then runs in a
fresh child process so its peak RSS (``ru_maxrss``) covers only the client and the driver.

    .venv/bin/python benchmarks/bench_erp_extract.py [--rows 1000000] [--dialects sqlite,postgresql,mariadb]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _erp_targets import target
from d365sync.erp import ErpClient
from d365sync.sandbox.erp.seeder import init_sandbox
from d365sync.sandbox.erp.tables import CUST_MASTER


def child(conn_str: str, chunk: int) -> None:
    """Runs in the child: extract everything, report rows, seconds and peak RSS as JSON."""
    started, rows = time.perf_counter(), 0
    with ErpClient(conn_str, chunk_size=chunk) as client:
        stream = client.extract_changes(CUST_MASTER)
        for part in stream:
            rows += len(part)
        seen = len(stream.cursor.seen)
    elapsed = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "seconds": elapsed, "rss_mb": rss_mb, "seen": seen}))


def run(dialect: str, n: int, chunk: int) -> str:
    with target(dialect) as conn_str:
        started = time.perf_counter()
        with ErpClient(conn_str) as client:
            init_sandbox(client, rows=n, seed=1, only=("CUST_MASTER",))
        seeded = time.perf_counter() - started
        out = subprocess.run(
            [sys.executable, __file__, "--child", conn_str, "--chunk", str(chunk)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["rows"] == n, r
    return (
        f"| {dialect} | {r['rows']:,} | {chunk:,} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | "
        f"**{r['rss_mb']:.0f}** | {seeded:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=10_000)
    parser.add_argument("--dialects", default="sqlite,postgresql,mariadb")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.chunk)
        return
    print("| dialect | rows | chunk | extract s | rows/s | peak RSS MB | seed s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dialect in args.dialects.split(","):
        print(run(dialect, args.rows, args.chunk), flush=True)


if __name__ == "__main__":
    main()
