"""``d365sync sandbox erp …``: create and seed the sandbox ERP schema.

``--odbc`` takes a connection string and needs nothing but pyodbc; ``--conn-id`` resolves an
Airflow connection through :class:`~d365sync.airflow.erp_hook.ErpOdbcHook`, imported only then,
so the sandbox stays usable without Airflow configured.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from d365sync.erp.client import ErpClient


def add_parser(sandbox_kinds: Any) -> None:
    erp = sandbox_kinds.add_parser("erp", help="the legacy ERP sandbox (SQLite, PostgreSQL, MariaDB)")
    commands = erp.add_subparsers(dest="erp_command", required=True)
    init = commands.add_parser("init", help="drop, create and seed the sandbox ERP schema")
    target = init.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--odbc", metavar="CONN_STR", help='ODBC connection string, e.g. "DRIVER={SQLite3};Database=erp.db;"'
    )
    target.add_argument("--conn-id", help="Airflow connection id of type erp_odbc")
    init.add_argument(
        "--rows", type=int, default=1000, help="number of customers (default 1000; up to 1,000,000)"
    )
    init.add_argument("--seed", type=int, default=42, help="random seed; equal seeds give identical data")
    init.set_defaults(func=run_init)


def client_for(args: argparse.Namespace) -> ErpClient:
    if args.odbc:
        return ErpClient(args.odbc)
    from d365sync.airflow.erp_hook import ErpOdbcHook  # lazy: Airflow only when asked for

    return ErpOdbcHook(erp_conn_id=args.conn_id).get_client()


def run_init(args: argparse.Namespace) -> int:
    from d365sync.sandbox.erp.seeder import init_sandbox

    started = time.monotonic()
    with client_for(args) as client:
        report = init_sandbox(client, rows=args.rows, seed=args.seed)
        print(f"seeded {client.server_info()} in {time.monotonic() - started:.1f}s")
    for table, count in report.rows.items():
        print(f"  {table:<14} {count:>10,} rows")
    for kind, count in sorted(report.dirty.items()):
        print(f"  dirty {kind:<20} {count:>8,}")
    return 0
