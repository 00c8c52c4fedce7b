"""The ``d365sync`` console script.

Sub-commands are contributed by the package areas that own them, so this module stays
a thin dispatcher with no heavy imports: each area exposes ``add_parser(subparsers)``
and sets ``func`` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# (command, module providing ``add_parser``) — imported lazily only when listed here.
_SANDBOX_AREAS = (
    "d365sync.sandbox.dataverse.cli",
    "d365sync.sandbox.erp_cli",
    "d365sync.sandbox.conflicts",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d365sync", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    importlib.import_module("d365sync.sync_cli").add_parser(commands)
    importlib.import_module("d365sync.privacy_cli").add_parser(commands)
    importlib.import_module("d365sync.webhook_cli").add_parser(commands)
    importlib.import_module("d365sync.sandbox.soak").add_parser(commands)
    importlib.import_module("d365sync.deploy").add_parser(commands)
    importlib.import_module("d365sync.onboard.cli").add_parser(commands)
    sandbox = commands.add_parser("sandbox", help="run or seed the local sandboxes")
    sandbox_kinds = sandbox.add_subparsers(dest="sandbox_kind", required=True)
    for module_name in _SANDBOX_AREAS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_parser(sandbox_kinds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `d365sync spec check | head`: the reader left; no traceback for that
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
