"""100k-row ERP upsert per dialect, timed against plain pyodbc executemany of the same rows.

The baseline inserts the same tuples with one ``executemany`` into an empty copy of the
table (``fast_executemany`` on where the driver supports it, as the client does). The upsert
is the client's full path: validation, staging, MERGE/ON CONFLICT, counts, one transaction
per 10k chunk. A second upsert of the same rows measures the no-op (idempotent) rerun.

    .venv/bin/python benchmarks/bench_erp_upsert.py [--rows 100000] [--dialects sqlite,postgresql,mariadb]
"""

from __future__ import annotations

import argparse
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyodbc

sys.path.insert(0, str(Path(__file__).parent))
from _erp_targets import target
from d365sync.erp import ErpClient
from d365sync.sandbox.erp.ddl import create_table, drop_statements, schema_statements
from d365sync.sandbox.erp.tables import CUST_MASTER


def make_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "CUST_NO": f"B{i:09d}",
            "CUST_NAME": f"Benchmark Customer {i}",
            "CUST_EMAIL_ID": f"b{i}@example.com",
            "PHONE": "+44 20 7946 0000",
            "ADDR_LINE1": f"{i % 500} Long Acre",
            "ADDR_LINE2": None,
            "CITY": "London",
            "POSTCODE": "WC2E 9LH",
            "COUNTRY": "GB",
            "CURR_CODE": "STG",
            "CREDIT_LIMIT": Decimal(i % 100000) / 4,
            "PAY_TERMS": "N30",
            "STATUS": "A",
            "REMARKS": None,
        }
        for i in range(n)
    ]


def baseline(conn_str: str, client: ErpClient, rows: list[dict[str, Any]]) -> float:
    spec = CUST_MASTER.model_copy(update={"name": "BENCH_BASE"})
    d = client.dialect
    names = list(rows[0])
    conn = pyodbc.connect(conn_str, autocommit=False)
    if d.maxwrite:
        conn.maxwrite = d.maxwrite
    cur = conn.cursor()
    cur.execute(create_table(d, spec))
    conn.commit()
    params = [tuple(r.values()) for r in rows]
    sql = f"INSERT INTO {d.q(spec.name)} ({d.cols(names)}) VALUES ({', '.join('?' * len(names))})"
    cur.fast_executemany = client.fast_executemany
    started = time.perf_counter()
    cur.executemany(sql, params)
    conn.commit()
    elapsed = time.perf_counter() - started
    cur.execute(f"DROP TABLE {d.q(spec.name)}")
    conn.commit()
    conn.close()
    return elapsed


def timed_upsert(client: ErpClient, rows: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    result = client.upsert(CUST_MASTER, rows)
    elapsed = time.perf_counter() - started
    assert not result.failures, result.failures[:3]
    return elapsed


def run(dialect: str, n: int) -> str:
    rows = make_rows(n)
    with target(dialect) as conn_str, ErpClient(conn_str) as client:
        client.execute(drop_statements(client.dialect))
        client.execute(schema_statements(client.dialect))
        base = baseline(conn_str, client, rows)
        first = timed_upsert(client, rows)
        again = timed_upsert(client, rows)
        fast = "yes" if client.fast_executemany else "no"
    return (
        f"| {dialect} | {n:,} | {fast} | {base:.2f} | {first:.2f} | **{first / base:.2f}** | "
        f"{again:.2f} | {again / base:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dialects", default="sqlite,postgresql,mariadb")
    args = parser.parse_args()
    print(
        "| dialect | rows | fast_executemany | executemany s | upsert (new rows) s | ratio | "
        "upsert rerun (no-op) s | ratio |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for dialect in args.dialects.split(","):
        print(run(dialect, args.rows), flush=True)


if __name__ == "__main__":
    main()
