"""``d365sync entity scaffold`` and ``d365sync spec check [--live]``.

Both read the connections ``d365sync sync`` reads (``AIRFLOW_CONN_DYNAMICS_DEFAULT``,
``AIRFLOW_CONN_ERP_DEFAULT``; the local sandboxes when unset). Exit status: 0 fine, 1 problems
found (each printed with its fix), 2 a system unreachable or a bad argument.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from d365sync import ENTITIES_DIR


def add_parser(commands: Any) -> None:
    entity = commands.add_parser("entity", help="onboard a new entity from live metadata")
    kinds = entity.add_subparsers(dest="entity_command", required=True)
    scaffold = kinds.add_parser(
        "scaffold",
        help="draft an entity file from a Dataverse table and an ERP table",
        description="Reads EntityDefinitions (attributes, alternate keys, change tracking) and the ERP's "
        "ODBC catalog, pairs keys and columns, suggests transforms and validation, and leaves every "
        "ownership decision as `owner: TODO`.",
    )
    scaffold.add_argument("--dynamics-table", required=True, help="Dataverse logical name (contact)")
    scaffold.add_argument("--erp-table", required=True, help="ERP table (CUST_CONTACT)")
    scaffold.add_argument("--name", help="entity name (default: the Dataverse entity set, e.g. contacts)")
    scaffold.add_argument("--out", type=Path, help="write the draft here (default: print it)")
    scaffold.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    scaffold.set_defaults(func=run_scaffold)

    spec = commands.add_parser("spec", help="check entity files")
    spec_kinds = spec.add_subparsers(dest="spec_command", required=True)
    check = spec_kinds.add_parser(
        "check",
        help="check entity files (against both live systems with --live)",
        description="Without --live: every file loads and matches the shipped catalog. With --live: "
        "columns exist with fitting types and lengths, the alternate key is active, change tracking "
        "is on, the ERP cursor column is indexed, and creates can fill required columns.",
    )
    check.add_argument("targets", nargs="*", help="entity names or YAML paths (default: every entity)")
    check.add_argument("--entities", type=Path, default=ENTITIES_DIR, help="entity YAML directory")
    check.add_argument("--live", action="store_true", help="check against the live systems")
    check.set_defaults(func=run_check)


def _systems() -> tuple[Any, Any]:
    from d365sync.engine import connections as c
    from d365sync.sync_cli import open_systems

    return open_systems(c.from_env(c.DYNAMICS_CONN), c.from_env(c.ERP_CONN))


def _unreachable(exc: Exception) -> int:
    from d365sync.engine.pii import mask_text

    print(f"error: {mask_text(str(exc))}", file=sys.stderr)
    return 2


def run_scaffold(args: argparse.Namespace) -> int:
    from d365sync.dynamics.errors import DynamicsError
    from d365sync.erp.errors import ErpSpecError
    from d365sync.onboard.metadata import read_dynamics_table, read_erp_table
    from d365sync.onboard.scaffold import draft, render
    from d365sync.sync_cli import Unreachable

    if args.out is not None and args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    try:
        dynamics, erp = _systems()
    except Unreachable as exc:
        return _unreachable(exc)
    try:
        dv = read_dynamics_table(dynamics, args.dynamics_table)
        table = read_erp_table(erp, args.erp_table)
        found = draft(dv, table, args.name or dv.entity_set)
    except (DynamicsError, ErpSpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dynamics.close()
        erp.close()
    command = "d365sync entity scaffold " + shlex.join(
        ["--dynamics-table", args.dynamics_table, "--erp-table", args.erp_table]
    )
    text = render(found, command)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    todo = sum(line.count("TODO") for line in text.splitlines())
    print(
        f"wrote {args.out}: key {found.key.dv.name} ↔ {found.key.erp.name}, "
        f"{len(found.pairs)} column pair(s), "
        f"{len(found.unmatched_erp)} ERP column(s) unpaired, {todo} TODO(s) to decide"
    )
    return 0


def _paths(args: argparse.Namespace) -> list[Path]:
    if not args.targets:
        return sorted(p for p in args.entities.glob("*.yaml") if not p.name.startswith("_"))
    paths = []
    for target in args.targets:
        path = Path(target)
        paths.append(path if path.suffix in (".yaml", ".yml") else args.entities / f"{target}.yaml")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"error: no entity file {', '.join(missing)}")
    return paths


def run_check(args: argparse.Namespace) -> int:
    if not args.live:
        return _check_offline(args)
    from d365sync.onboard.check import check
    from d365sync.sync_cli import Unreachable

    try:
        dynamics, erp = _systems()
    except Unreachable as exc:
        return _unreachable(exc)
    status = 0
    try:
        reader = _LiveReader(dynamics, erp)
        for path in _paths(args):
            problems = check(path, reader)
            if not problems:
                print(f"{path.name}: OK against the live systems")
                continue
            status = 1
            print(f"{path.name}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  {problem}")
    finally:
        dynamics.close()
        erp.close()
    return status


def _check_offline(args: argparse.Namespace) -> int:
    from d365sync.spec import SpecError, load_entity, read_defaults

    status = 0
    for path in _paths(args):
        try:
            load_entity(path, defaults=read_defaults(path.parent))
        except SpecError as exc:
            status = 1
            print(f"{path.name}: {len(exc.issues)} problem(s)")
            for issue in exc.issues:
                print(f"  {issue}")
            continue
        print(f"{path.name}: OK (run with --live to check it against the systems)")
    return status


class _LiveReader:
    """Reads each table's metadata once for all files checked in one call."""

    def __init__(self, dynamics: Any, erp: Any) -> None:
        self.dynamics, self.erp = dynamics, erp
        self._dv: dict[str, Any] = {}

    def _table(self, name: str) -> Any:
        from d365sync.dynamics.errors import DynamicsApiError
        from d365sync.onboard.metadata import read_dynamics_table

        if name not in self._dv:
            try:
                self._dv[name] = read_dynamics_table(self.dynamics, name)
            except DynamicsApiError as exc:
                if exc.status == 404:
                    raise LookupError(f"Dynamics has no table {name!r} (EntityDefinitions: 404)") from None
                raise
        return self._dv[name]

    def __call__(self, dynamics_table: str, erp_table: str, lookups: tuple[str, ...]) -> Any:
        from d365sync.erp.errors import ErpSpecError
        from d365sync.onboard.check import Live
        from d365sync.onboard.metadata import read_erp_table

        tables = {name: self._table(name) for name in dict.fromkeys((dynamics_table, *lookups))}
        try:
            table = read_erp_table(self.erp, erp_table)
        except ErpSpecError as exc:
            raise LookupError(f"ERP: {exc}") from None
        return Live(tables, table)
