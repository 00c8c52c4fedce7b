"""Airflow hook for the Dataverse Web API: an Airflow connection in, a configured client out.

Connection fields: host = environment URL, login = client (application) id, password = client
secret. Extras: ``tenant_id`` (required), ``authority_host``, ``api_version``, ``ca_bundle``,
``page_size``, ``batch_size``, ``max_concurrency``, ``plain_http_hosts`` (comma-separated hosts
besides loopback allowed over plain ``http://``: a sandbox on a private network, never Entra).
Precedence, highest first: constructor arguments, then connection extras (plain ``tenant_id`` or
the legacy ``extra__dynamics__tenant_id`` form), then :class:`~d365sync.dynamics.DynamicsConfig`
defaults.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from airflow.sdk import BaseHook

from d365sync.dynamics import DynamicsClient, DynamicsConfig, DynamicsError

_INT_FIELDS = ("page_size", "batch_size", "max_concurrency")
_STR_FIELDS = ("tenant_id", "authority_host", "api_version", "ca_bundle", "plain_http_hosts")


class DynamicsWebApiHook(BaseHook):
    """Builds a :class:`DynamicsClient` from an Airflow connection of type ``dynamics``."""

    conn_name_attr = "dynamics_conn_id"
    default_conn_name = "dynamics_default"
    conn_type = "dynamics"
    hook_name = "Dynamics 365 (Dataverse Web API)"

    def __init__(
        self,
        dynamics_conn_id: str = default_conn_name,
        *,
        tenant_id: str | None = None,
        authority_host: str | None = None,
        api_version: str | None = None,
        ca_bundle: str | None = None,
        page_size: int | None = None,
        batch_size: int | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        super().__init__()
        self.dynamics_conn_id = dynamics_conn_id
        self._overrides: dict[str, Any] = {
            "tenant_id": tenant_id,
            "authority_host": authority_host,
            "api_version": api_version,
            "ca_bundle": ca_bundle,
            "page_size": page_size,
            "batch_size": batch_size,
            "max_concurrency": max_concurrency,
        }
        self._client: DynamicsClient | None = None

    def get_config(self) -> DynamicsConfig:
        """Merge constructor arguments over connection extras over defaults, then validate."""
        conn = self.get_connection(self.dynamics_conn_id)
        settings = _settings(conn.extra_dejson, self._overrides)
        ca_bundle = settings.pop("ca_bundle", None)
        return DynamicsConfig(
            environment_url=_environment_url(conn.host or "", conn.schema),
            tenant_id=settings.pop("tenant_id", ""),
            client_id=conn.login or "",
            client_secret=conn.password or "",
            verify=ca_bundle or True,
            **settings,
        )

    def get_conn(self) -> DynamicsClient:
        """The configured client, built once per hook instance."""
        if self._client is None:
            self._client = DynamicsClient(self.get_config())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def test_connection(self) -> tuple[bool, str]:
        """Acquire a token and call WhoAmI; the UI's "Test" button shows the message."""
        try:
            with DynamicsClient(self.get_config()) as client:
                who = client.whoami()
        except (DynamicsError, ValueError) as exc:
            return False, str(exc)
        return True, (
            f"Connected as user {who.get('UserId')} "
            f"(organization {who.get('OrganizationId')}, business unit {who.get('BusinessUnitId')})"
        )


def application_user_ids(conn_id: str) -> frozenset[str]:
    """The sync's own Dataverse user: ``WhoAmI`` with the connection ``conn_id`` (short timeouts,
    two tries), for telling its writes apart in change notifications."""
    from d365sync.dynamics.config import RetrySettings

    config = DynamicsWebApiHook(conn_id).get_config()
    retry = RetrySettings(max_attempts=2, max_total_seconds=15.0, backoff_cap=2.0)
    quick = replace(config, connect_timeout=3.0, read_timeout=10.0, retry=retry)
    with DynamicsClient(quick) as client:
        user = client.whoami().get("UserId")
    return frozenset({str(uuid.UUID(str(user)))})


def _settings(extras: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Pick the known extras (plain or ``extra__dynamics__`` prefixed) and apply overrides."""
    merged: dict[str, Any] = {}
    for name in (*_STR_FIELDS, *_INT_FIELDS):
        value = overrides.get(name)
        if value in (None, ""):
            value = extras.get(name, extras.get(f"extra__dynamics__{name}"))
        if value in (None, ""):
            continue
        if isinstance(value, list | tuple):  # plain_http_hosts given as a JSON list
            value = ",".join(map(str, value))
        merged[name] = int(value) if name in _INT_FIELDS else str(value)
    return merged


def _environment_url(host: str, scheme: str | None) -> str:
    """Accept ``https://org.crm.dynamics.com`` or a bare host (the schema field is hidden)."""
    if "://" in host:
        return host
    return f"{scheme or 'https'}://{host}" if host else ""
