"""``d365sync sync ENTITY [--dry-run] [--all]``: one entity run (or all, in dependency order).

It reads the connections the DAGs use (``dynamics_default``, ``erp_default``,
``sync_state_default`` from ``AIRFLOW_CONN_*``, JSON or URI form) without importing Airflow,
and falls back to the local sandbox defaults when none is set. Both systems are checked before
any stage runs, so an unreachable one fails fast with a message that names it (never a secret).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from d365sync import ENTITIES_DIR
from d365sync.engine import connections as c
from d365sync.engine.pii import mask_text


class Unreachable(RuntimeError):
    """A configured system does not answer; the message says which and how it was configured."""


def add_parser(commands: Any) -> None:
    sync = commands.add_parser("sync", help="run one entity (or all) through the sync pipeline")
    sync.add_argument("entity", nargs="?", help="entity name (a file in the entities directory)")
    sync.add_argument("--all", action="store_true", help="every entity, parents before children")
    sync.add_argument("--dry-run", action="store_true", help="plan only: print it and write nothing")
    sync.add_argument("--entities", type=Path, default=ENTITIES_DIR, help="entity YAML directory")
    sync.add_argument("--staging", type=Path, default=Path("var/staging"), help="staging root (Parquet)")
    sync.add_argument("--chunk-size", type=int, default=5000, help="records per chunk (memory bound)")
    sync.add_argument("--limit", type=int, default=20, help="examples per plan section")
    sync.set_defaults(func=run_sync)


def run_sync(args: argparse.Namespace) -> int:
    from d365sync.spec import load_entities

    specs = load_entities(args.entities)
    names = _selected(args, specs)
    try:
        dynamics, erp, store = _open(
            c.from_env(c.DYNAMICS_CONN), c.from_env(c.ERP_CONN), c.from_env(c.STATE_CONN)
        )
    except (Unreachable, c.ConnectionConfigError) as exc:
        print(f"error: {mask_text(str(exc))}", file=sys.stderr)
        return 2
    try:
        return _run_all(args, specs, names, dynamics, erp, store)
    finally:
        store.close()
        erp.close()
        dynamics.close()


def _selected(args: argparse.Namespace, specs: Mapping[str, Any]) -> list[str]:
    from d365sync.spec import dependency_order

    if args.all:
        return dependency_order(specs)
    if not args.entity:
        raise SystemExit("error: name an ENTITY or pass --all")
    if args.entity not in specs:
        raise SystemExit(f"error: no entity {args.entity!r} (have {', '.join(sorted(specs))})")
    return [args.entity]


def _run_all(args: argparse.Namespace, specs: Mapping[str, Any], names: list[str], *clients: Any) -> int:
    from d365sync.engine.pipeline import run_entity

    dynamics, erp, store = clients
    status = 0
    for name in names:
        try:
            result = run_entity(
                specs[name],
                dynamics=dynamics,
                erp=erp,
                store=store,
                staging=args.staging,
                dry_run=args.dry_run,
                chunk_size=args.chunk_size,
            )
        except Exception as exc:  # one entity failing must not hide the others' plans
            print(f"== {name}: FAILED — {type(exc).__name__}: {mask_text(str(exc))}", file=sys.stderr)
            status = 1
            continue
        print(result.plan.render(args.limit))
        print(f"timings: {result.timings}\n")
    return status


def _open(
    dyn_conn: c.Conn | None, erp_conn: c.Conn | None, state_conn: c.Conn | None
) -> tuple[Any, Any, Any]:
    """Both clients and the store, each checked before use."""
    from d365sync.engine.state import StateStore

    dynamics, erp = open_systems(dyn_conn, erp_conn)
    url, schema = c.state_url(state_conn)
    if state_conn is None:
        Path(c.SANDBOX_STATE_DB).parent.mkdir(parents=True, exist_ok=True)
    store = _check("sync state store", state_conn, lambda: StateStore.open(url, schema=schema))
    return dynamics, erp, store


def open_systems(dyn_conn: c.Conn | None, erp_conn: c.Conn | None) -> tuple[Any, Any]:
    """The Dynamics and ERP clients of the connections (sandbox defaults when unset), each checked
    with one cheap call; :class:`Unreachable` names the one that does not answer."""
    from d365sync.dynamics import DynamicsClient

    dynamics = DynamicsClient(c.dynamics_config(dyn_conn))
    _check("Dynamics 365", dyn_conn, dynamics.whoami)
    if erp_conn is None and not Path(c.SANDBOX_ERP_DB).exists():
        raise Unreachable(
            f"ERP sandbox database {c.SANDBOX_ERP_DB} does not exist; create it with "
            f'`d365sync sandbox erp init --odbc "DRIVER={{SQLite3}};Database={c.SANDBOX_ERP_DB};"` '
            f"or set AIRFLOW_CONN_{c.ERP_CONN.upper()}"
        )
    erp = c.erp_client(erp_conn)
    _check("ERP", erp_conn, erp.server_info)
    return dynamics, erp


def _check(system: str, conn: c.Conn | None, probe: Any) -> Any:
    try:
        return probe()
    except Exception as exc:
        raise Unreachable(
            f"{system} is unreachable ({c.describe(conn)}): {type(exc).__name__}: {exc}"
        ) from None
