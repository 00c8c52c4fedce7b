"""``d365sync events register|unregister|show``: the Dataverse webhook that tells the sync of changes.

``register --url URL [--entities customers,orders]`` registers (idempotently) a webhook named
``--name`` (default ``d365sync``) with one asynchronous step per Dynamics table of the chosen
entities (by default those whose file has ``events.dynamics: webhook``; none: nothing to do) and
per message (Create, Update, Delete); the Update steps filter on the Dynamics columns the
entities map, plus ``statecode``/``statuscode``.  Two entities on one
table share its steps.  ``unregister`` removes the webhook and its steps; ``show`` lists the
steps.  ``--dry-run`` prints what ``register`` would ask for without connecting.

The key Dataverse sends (header ``x-d365sync-webhook-key``) comes from the environment variable
``--key-env`` (default ``D365SYNC_WEBHOOK_KEY``), else from the Airflow Variable
``d365sync_webhook_key`` as Airflow passes Variables through the environment
(``AIRFLOW_VAR_D365SYNC_WEBHOOK_KEY``).  It is never printed.
The Dynamics connection is the DAGs' (``AIRFLOW_CONN_DYNAMICS_DEFAULT``), else the local sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

KEY_ENV = "D365SYNC_WEBHOOK_KEY"
KEY_VARIABLE = "d365sync_webhook_key"
DEFAULT_NAME = "d365sync"
STATE_COLUMNS = ("statecode", "statuscode")


def add_parser(commands: Any) -> None:
    events = commands.add_parser(
        "events", help="the Dataverse webhook that notifies the sync of changes (register, unregister, show)"
    )
    actions = events.add_subparsers(dest="events_action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--name", default=DEFAULT_NAME, help=f"webhook (service endpoint) name (default {DEFAULT_NAME})"
    )

    register = actions.add_parser(
        "register",
        parents=[common],
        help="create or update the webhook and its steps (idempotent)",
        description=(
            "Register the webhook for the entities' Dynamics tables. The key is read from the "
            f"environment variable named by --key-env (default {KEY_ENV}), else from the Airflow "
            f"Variable {KEY_VARIABLE} (AIRFLOW_VAR_{KEY_VARIABLE.upper()}); it is never printed."
        ),
    )
    register.add_argument(
        "--url", required=True, help="receiver URL, e.g. https://ops.example.com/d365sync/events/dataverse"
    )
    register.add_argument(
        "--entities",
        help="comma-separated entity names (default: those with events.dynamics: webhook)",
    )
    register.add_argument(
        "--entities-dir", type=Path, help="entity YAML directory (default: the shipped one)"
    )
    register.add_argument("--messages", default="Create,Update,Delete", help="comma-separated messages")
    register.add_argument(
        "--key-env", default=KEY_ENV, help=f"environment variable holding the key (default {KEY_ENV})"
    )
    register.add_argument(
        "--dry-run", action="store_true", help="print the tables and attributes; connect to nothing"
    )
    register.set_defaults(func=run_register)

    unregister = actions.add_parser("unregister", parents=[common], help="delete the webhook and its steps")
    unregister.set_defaults(func=run_unregister)

    show = actions.add_parser("show", parents=[common], help="list the webhook's steps")
    show.set_defaults(func=run_show)


def tables_for(specs: Mapping[str, Any], messages: tuple[str, ...]) -> list[Any]:
    """One :class:`~d365sync.dynamics.webhooks.TableEvents` per Dynamics table of ``specs``: the
    mapped Dynamics columns and the state columns as filtering attributes."""
    from d365sync.dynamics.webhooks import TableEvents, normalize

    events = [
        TableEvents(
            spec.dynamics.table,
            messages,
            tuple(f.dynamics for f in spec.fields.values() if f.dynamics) + STATE_COLUMNS,
        )
        for spec in specs.values()
    ]
    return normalize(events)


def run_register(args: argparse.Namespace) -> int:
    from d365sync.dynamics.webhooks import register_webhook

    try:
        specs = _specs(args)
        if not specs:
            print("nothing to register: no entity has events.dynamics: webhook (name some with --entities)")
            return 0
        tables = tables_for(specs, tuple(m.strip() for m in args.messages.split(",") if m.strip()))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = {
        "name": args.name,
        "url": _shown_url(args.url),
        "tables": {
            t.table: {"messages": list(t.messages), "filtering_attributes": list(t.filtering_attributes)}
            for t in tables
        },
    }
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    key = _key(args.key_env)
    if not key:
        print(
            f"error: no webhook key: set {args.key_env} (or the Airflow Variable {KEY_VARIABLE} as "
            f"AIRFLOW_VAR_{KEY_VARIABLE.upper()})",
            file=sys.stderr,
        )
        return 2
    return _with_client(
        lambda client: (
            register_webhook(client, name=args.name, url=args.url, key=key, tables=tables).summary() | plan
        )
    )


def run_unregister(args: argparse.Namespace) -> int:
    from d365sync.dynamics.webhooks import unregister_webhook

    return _with_client(
        lambda client: {"name": args.name, "deleted_steps": unregister_webhook(client, args.name)}
    )


def run_show(args: argparse.Namespace) -> int:
    from d365sync.dynamics.webhooks import webhook_steps

    def show(client: Any) -> dict[str, Any]:
        steps = webhook_steps(client, args.name)
        return {
            "name": args.name,
            "steps": {
                name: {
                    "enabled": rows[0]["statecode"] == 0,
                    "filteringattributes": rows[0]["filteringattributes"],
                }
                for name, rows in sorted(steps.items())
            },
        }

    return _with_client(show)


def _specs(args: argparse.Namespace) -> dict[str, Any]:
    from d365sync.spec import entities_dir, load_entities

    specs = load_entities(args.entities_dir or entities_dir())
    if not args.entities:  # the entities whose file asks for webhooks
        return {n: s for n, s in specs.items() if s.events.dynamics == "webhook"}
    names = [n.strip() for n in args.entities.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"no entity {', '.join(unknown)} (have {', '.join(sorted(specs))})")
    return {n: specs[n] for n in names}


def _key(env_name: str) -> str:
    """The key Dataverse will send: the first of the receiver's keys (during a rotation the new
    key comes first, the old one still accepted after it)."""
    keys = os.environ.get(env_name) or os.environ.get(f"AIRFLOW_VAR_{KEY_VARIABLE.upper()}") or ""
    return next((k.strip() for k in keys.split(",") if k.strip()), "")


def _shown_url(url: str) -> str:
    """The URL without its query, which may carry a key."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _with_client(action: Callable[[Any], dict[str, Any]]) -> int:
    from d365sync.dynamics import DynamicsClient, DynamicsError
    from d365sync.engine import connections as c
    from d365sync.engine.pii import mask_text

    try:
        conn = c.from_env(c.DYNAMICS_CONN)
        with DynamicsClient(c.dynamics_config(conn)) as client:
            result = action(client)
    except (DynamicsError, c.ConnectionConfigError, ValueError) as exc:
        print(f"error: {mask_text(str(exc))}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0
