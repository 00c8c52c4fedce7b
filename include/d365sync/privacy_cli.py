"""``d365sync privacy …``: personal data in the stores the sync owns (docs/security.md).

* ``generate-key [--out FILE]`` — a new Fernet key (printed, or written to FILE with mode 600);
* ``rotate-keys`` — re-encrypt every encrypted value with the newest key (the first listed);
* ``purge [--now ISO]`` — apply the retention periods of ``_defaults.yaml`` ``privacy.retention``;
* ``erase --entity E --key K`` — remove or anonymise one data subject, record it in the audit log;
* ``export --entity E --key K`` — print (JSON) everything held about one key, decrypted.

Connections as for ``d365sync sync`` (``AIRFLOW_CONN_SYNC_STATE_DEFAULT``, else the sandbox's
state file); keys from ``AIRFLOW_CONN_D365SYNC_PII`` (its password) or ``D365SYNC_PII_KEYS``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from d365sync.sync_cli import ENTITIES_DIR


def add_parser(commands: Any) -> None:
    privacy = commands.add_parser("privacy", help="personal data: keys, retention, erasure, export")
    actions = privacy.add_subparsers(dest="privacy_action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--entities", type=Path, default=ENTITIES_DIR, help="entity YAML directory")
    common.add_argument("--staging", type=Path, default=Path("var/staging"), help="staging root")

    key = actions.add_parser("generate-key", help="print a new Fernet key (or write it to --out)")
    key.add_argument("--out", type=Path, help="write the key to this file (mode 600) instead")
    key.set_defaults(func=generate_key)

    rotate = actions.add_parser(
        "rotate-keys", parents=[common], help="re-encrypt everything with the newest key"
    )
    rotate.set_defaults(func=rotate_keys)

    purge = actions.add_parser(
        "purge", parents=[common], help="delete rows and staging files past their retention"
    )
    purge.add_argument("--now", help="ISO time to measure ages from (default: now)")
    purge.set_defaults(func=purge_expired)

    for name, func, what in (
        ("erase", erase, "remove or anonymise one data subject everywhere the sync keeps data"),
        ("export", export, "print (JSON) everything held about one data subject, decrypted"),
    ):
        sub = actions.add_parser(name, parents=[common], help=what)
        sub.add_argument("--entity", required=True, help="entity name (a file in the entities directory)")
        sub.add_argument("--key", required=True, help="the subject's record key (customer number)")
        if name == "erase":
            sub.add_argument("--actor", default=f"cli:{_user()}", help="who asked (audit log)")
        sub.set_defaults(func=func)


def generate_key(args: argparse.Namespace) -> int:
    from d365sync.engine.privacy import generate_key as new_key

    key = new_key()
    if args.out is None:
        print(key)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    print(f"wrote a new key to {args.out}", file=sys.stderr)
    return 0


def rotate_keys(args: argparse.Namespace) -> int:
    from d365sync.engine.data_subjects import rotate_keys as rotate

    with _store(args, register=True) as store:
        counts = rotate(store)
    print(json.dumps({"rotated": counts}))
    return 0


def purge_expired(args: argparse.Namespace) -> int:
    from d365sync.engine import data_subjects
    from d365sync.engine.stages.context import aware
    from d365sync.spec import load_privacy_settings

    now = aware(args.now) if args.now else None
    retention = load_privacy_settings(args.entities).retention
    with _store(args) as store:
        counts = data_subjects.purge(store, retention, now)
    counts |= data_subjects.purge_staging([args.staging], retention.staging_days, now)
    print(json.dumps({"purged": counts, "retention": retention.model_dump()}))
    return 0


def erase(args: argparse.Namespace) -> int:
    from d365sync.engine import data_subjects

    spec = _spec(args)
    with _store(args) as store:
        report = data_subjects.erase(
            store, spec.name, args.key, actor=args.actor, fields=spec.pii_fields, staging_roots=[args.staging]
        )
    print(json.dumps(report))
    return 0


def export(args: argparse.Namespace) -> int:
    from d365sync.engine import data_subjects

    spec = _spec(args)
    with _store(args, register=True) as store:
        print(json.dumps(data_subjects.export(store, spec.name, args.key), indent=2, ensure_ascii=False))
    return 0


def _spec(args: argparse.Namespace) -> Any:
    from d365sync.spec import load_entities

    specs = load_entities(args.entities)
    if args.entity not in specs:
        raise SystemExit(f"error: no entity {args.entity!r} (have {', '.join(sorted(specs))})")
    return specs[args.entity]


def _store(args: argparse.Namespace, *, register: bool = False) -> Any:
    """The state store of ``d365sync sync``; ``register``: every entity's ``pii`` fields known
    (decrypting needs the keys, so a missing key is an error there)."""
    from d365sync.engine import connections as c
    from d365sync.engine.privacy import Privacy, PrivacyConfigError
    from d365sync.engine.state import StateStore
    from d365sync.spec import load_entities

    try:
        privacy = Privacy.from_env()
        if register:
            for name, spec in load_entities(args.entities).items():
                privacy.register(name, spec.pii_fields)
        url, schema = c.state_url(c.from_env(c.STATE_CONN))
    except (PrivacyConfigError, c.ConnectionConfigError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return StateStore.open(url, schema=schema, privacy=privacy)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
