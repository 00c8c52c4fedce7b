"""Sandbox configuration: CLI flags merged over ``DIR/sandbox.json``.

``sandbox.json`` (optional) may hold any of::

    {
      "users": [{"client_id": "...", "client_secret": "...", "name": "Second app"}],
      "change_tracking_retention_seconds": 604800,
      "token_lifetime_seconds": 3600,
      "limits": {"requests": 6000, "window_seconds": 300, "concurrency": 52,
                 "execution_time_ms": 1200000, "execution_window_seconds": 300},
      "knobs": {"latency_ms": 0, "record_cost_ms": 0, "request_cost_ms": 0, "error_rate": 0.0}
    }

Flags given on the command line win over the file; the file wins over the defaults.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TENANT = "sandbox-tenant"
DEFAULT_CLIENT_ID = "51f81489-12ee-4a9e-aaae-a2591f45987d"
DEFAULT_CLIENT_SECRET = "sandbox-secret"
DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600
# The application user the demo's and the soak's simulated people edit Dynamics as (``sandbox.json``
# ``users``): their edits are not the sync's own, as a person's are not in a real environment,
# so webhook notifications of them start runs and the load's freshness check treats them as foreign.
PERSON_USER = {
    "client_id": "9b0c6f0e-3f7a-4b8e-9f50-2c6d1e7a4b31",
    "client_secret": "sandbox-person-secret",
    "name": "People (simulated users)",
}
DEFAULT_TOKEN_LIFETIME = 3600
CONFIG_FILE = "sandbox.json"

_IDS = uuid.UUID("0d2c8f6e-5e1b-4c43-9a0f-2f6b1f3c8a11")


def stable_id(kind: str, name: str) -> str:
    """A GUID derived from a name, so ids stay the same across restarts and machines."""
    return str(uuid.uuid5(_IDS, f"{kind}:{name}"))


@dataclass(frozen=True)
class AppUser:
    """An Entra app registration bound to a Dataverse application user."""

    client_id: str
    client_secret: str
    name: str

    @property
    def systemuserid(self) -> str:
        return stable_id("systemuser", self.client_id.lower())

    @property
    def object_id(self) -> str:
        return stable_id("serviceprincipal", self.client_id.lower())


@dataclass
class Limits:
    """Service protection limits per application user (reference §6)."""

    requests: int = 6000
    window_seconds: float = 300.0
    concurrency: int = 52
    execution_time_ms: int = 1_200_000
    """Combined server time per user over ``execution_window_seconds``."""
    execution_window_seconds: float = 300.0


@dataclass
class SandboxConfig:
    """Everything the server needs to start."""

    data_dir: Path
    tenant: str = DEFAULT_TENANT
    users: list[AppUser] = field(default_factory=list)
    env_url: str | None = None
    retention_seconds: float = DEFAULT_RETENTION_SECONDS
    token_lifetime: int = DEFAULT_TOKEN_LIFETIME
    limits: Limits = field(default_factory=Limits)
    knobs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def tenant_id(self) -> str:
        return stable_id("tenant", self.tenant.lower())

    @property
    def organization_id(self) -> str:
        return stable_id("organization", self.tenant.lower())

    @property
    def business_unit_id(self) -> str:
        return stable_id("businessunit", self.tenant.lower())

    def user(self, client_id: str) -> AppUser | None:
        wanted = client_id.lower()
        return next((u for u in self.users if u.client_id.lower() == wanted), None)


def load_file(data_dir: Path) -> dict[str, Any]:
    """Read ``DIR/sandbox.json`` if present (an empty dict otherwise)."""
    path = data_dir / CONFIG_FILE
    if not path.exists():
        return {}
    loaded = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return loaded


def build_config(
    data_dir: Path,
    *,
    tenant: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
    env_url: str | None = None,
    retention_seconds: float | None = None,
    token_lifetime: int | None = None,
    limits: dict[str, Any] | None = None,
    knobs: dict[str, Any] | None = None,
    seed: int = 0,
) -> SandboxConfig:
    """Merge flags (non-None wins), the config file and the defaults."""
    file = load_file(data_dir)
    default_user = AppUser(
        client_id or file.get("client_id") or DEFAULT_CLIENT_ID,
        client_secret or file.get("client_secret") or DEFAULT_CLIENT_SECRET,
        "sandbox-app",
    )
    users = [default_user]
    for raw in file.get("users", []):
        users.append(AppUser(str(raw["client_id"]), str(raw["client_secret"]), str(raw.get("name", "app"))))
    merged_limits = Limits(**{**file.get("limits", {}), **(limits or {})})
    return SandboxConfig(
        data_dir=data_dir,
        tenant=tenant or file.get("tenant") or DEFAULT_TENANT,
        users=users,
        env_url=(env_url or file.get("env_url") or None),
        retention_seconds=float(
            retention_seconds
            if retention_seconds is not None
            else file.get("change_tracking_retention_seconds", DEFAULT_RETENTION_SECONDS)
        ),
        token_lifetime=int(
            token_lifetime if token_lifetime is not None else file.get("token_lifetime_seconds", 3600)
        ),
        limits=merged_limits,
        knobs={**file.get("knobs", {}), **(knobs or {})},
        seed=seed,
    )
