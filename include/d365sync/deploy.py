"""Deployment secrets: generate them, and refuse to start with weak or published ones.

``docker-compose.yaml`` has no usable default for any secret: Compose itself stops with "… is
required" when one is unset, and ``airflow-init`` runs ``d365sync deploy check-secrets`` first,
which refuses empty, short, placeholder and formerly published values (a token signed with a
secret from a public repository is a skeleton key to Airflow and to the operations UI).

``d365sync deploy generate-env`` writes a ``.env`` from ``.env.example`` with fresh random values
(``secrets.token_urlsafe`` and a Fernet key), never overwriting an existing file unless asked.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final


@dataclass(frozen=True)
class Secret:
    name: str
    # "token" (random text, min_length), "keys" (comma-separated tokens, each min_length: the old and
    # the new one during a rotation) or "fernet" (a urlsafe-base64 32-byte key, or several, comma-separated)
    kind: str
    purpose: str
    min_length: int = 16
    required: bool = True  # optional ones are checked only when set


SECRETS: Final[tuple[Secret, ...]] = (
    Secret("AIRFLOW__API_AUTH__JWT_SECRET", "token", "signs every Airflow and UI token", 32),
    Secret("AIRFLOW__API__SECRET_KEY", "token", "signs log-server requests and sessions", 32),
    Secret("AIRFLOW__CORE__FERNET_KEY", "fernet", "encrypts connection passwords in the metadata DB"),
    Secret("_AIRFLOW_WWW_USER_PASSWORD", "token", "password of the UI users airflow-init creates", 12),
    Secret("POSTGRES_PASSWORD", "token", "Airflow metadata database", 16),
    Secret("STATE_DB_PASSWORD", "token", "sync-state database", 16),
    Secret("ERP_DB_PASSWORD", "token", "the ERP stand-in database", 16),
    Secret("DATAVERSE_CLIENT_SECRET", "token", "the Dataverse sandbox app's client secret", 16),
    # the receiver ignores shorter keys (d365sync.ui.events.MIN_KEY_LENGTH)
    Secret("D365SYNC_WEBHOOK_KEY", "keys", "the key Dataverse's webhook presents to the event receiver", 16),
    # empty: the d365sync_pii connection of a secrets backend holds them (docs/security.md)
    Secret("D365SYNC_PII_KEYS", "fernet", "encrypts personal data in the sync state", required=False),
)

# Values that were published as defaults (this repository's history, Airflow's docs) or are
# obvious placeholders: refused whatever their length.
PUBLISHED: Final = frozenset(
    {
        "d365sync-change-me-jwt-secret-32-bytes",
        "d365sync-change-me-api-secret-key",
        "sandbox-secret",
        "admin",
        "airflow",
        "d365sync",
        "erp",
        "password",
        "secret",
        "changeme",
        "change-me",
    }
)
_PLACEHOLDER: Final = re.compile(r"change[-_ ]?me|<[^>]*>|^x+$|example", re.IGNORECASE)


def generate() -> dict[str, str]:
    """A fresh random value for every secret."""
    values: dict[str, str] = {}
    for secret in SECRETS:
        if secret.kind == "fernet":
            values[secret.name] = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        else:
            values[secret.name] = secrets.token_urlsafe(max(secret.min_length, 32))
    return values


def problems(env: Mapping[str, str]) -> list[str]:
    """What is wrong with the secrets in ``env`` (names only: a value is never echoed)."""
    found = []
    for secret in SECRETS:
        value = env.get(secret.name, "")
        if not value and not secret.required:
            continue
        why = _weakness(secret, value)
        if why:
            found.append(f"{secret.name} ({secret.purpose}): {why}")
    return found


def _weakness(secret: Secret, value: str) -> str | None:
    if not value:
        return "not set"
    if value.lower() in PUBLISHED or _PLACEHOLDER.search(value):
        return "a published default or placeholder"
    if secret.kind == "fernet":  # one key, or a comma-separated list, newest first
        for key in value.split(","):
            try:
                if len(base64.urlsafe_b64decode(key.strip().encode())) != 32:
                    return "not a Fernet key (32 url-safe base64-encoded bytes)"
            except (binascii.Error, ValueError):
                return "not a Fernet key (32 url-safe base64-encoded bytes)"
        return None
    if secret.kind == "keys":  # newest first, comma-separated: every one of them must be usable
        keys = [key.strip() for key in value.split(",")]
        if any(key.lower() in PUBLISHED or _PLACEHOLDER.search(key) for key in keys):
            return "a published default or placeholder"
        if any(len(key) < secret.min_length for key in keys):
            return f"a key shorter than {secret.min_length} characters"
        return None
    if len(value) < secret.min_length:
        return f"shorter than {secret.min_length} characters"
    return None


def render_env(example: str, values: Mapping[str, str]) -> str:
    """``.env.example``'s text with ``NAME=`` lines of the given names filled in."""
    lines = []
    for line in example.splitlines():
        name = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and name in values:
            line = f"{name}={values[name]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("deploy", help="deployment secrets (docker-compose.yaml)")
    actions = parser.add_subparsers(dest="deploy_action", required=True)
    check = actions.add_parser("check-secrets", help="refuse weak, missing or published secrets")
    check.set_defaults(func=_check)
    gen = actions.add_parser("generate-env", help="write .env from .env.example with fresh secrets")
    gen.add_argument("--example", type=Path, default=Path(".env.example"))
    gen.add_argument("--output", type=Path, default=Path(".env"))
    gen.add_argument("--force", action="store_true", help="overwrite an existing output file")
    gen.set_defaults(func=_generate)
    return parser


def _check(args: argparse.Namespace) -> int:
    found = problems(os.environ)
    if found:
        print("refusing to start: these secrets are unusable", file=sys.stderr)
        for line in found:
            print(f"  - {line}", file=sys.stderr)
        print("run `d365sync deploy generate-env` (or set them in .env) and start again", file=sys.stderr)
        return 2
    print(f"secrets ok ({len(SECRETS)} checked)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.force:
        print(f"{args.output} exists; not overwritten (use --force)", file=sys.stderr)
        return 2
    text = render_env(args.example.read_text(), generate())
    args.output.touch(mode=0o600, exist_ok=True)
    args.output.chmod(0o600)
    args.output.write_text(text)
    print(f"wrote {args.output} with fresh secrets ({', '.join(s.name for s in SECRETS)})")
    return 0
