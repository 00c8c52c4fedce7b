"""The three connections a run needs, read the way Airflow reads them, without Airflow.

Why not the hooks: the CLI and the engine must work where Airflow is not configured (a laptop,
a CI job), yet an operator should set connections once, as ``AIRFLOW_CONN_*`` variables, for
both the DAGs and ``d365sync sync``. So this module parses the JSON and URI forms Airflow
accepts for ``dynamics_default``, ``erp_default`` and ``sync_state_default`` and builds the
same clients the hooks build (the field rules mirror ``d365sync.airflow.hook`` and
``erp_hook``). With none of them set it falls back to the local sandbox defaults.

Secrets stay inside the returned objects: :func:`describe` renders a connection for logs with
the password replaced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

DYNAMICS_CONN = "dynamics_default"
ERP_CONN = "erp_default"
STATE_CONN = "sync_state_default"
SANDBOX_URL = "http://127.0.0.1:8765"
SANDBOX_ERP_DB = "var/demo/erp.db"
SANDBOX_STATE_DB = "var/demo/state.db"
_ERP_CLIENT_EXTRAS = ("dialect", "chunk_size", "fast_executemany", "retry_attempts", "retry_base_delay")
_NOT_IN_CONN_STR = {
    "driver",
    "dsn",
    "connect_kwargs",
    "sqlalchemy_scheme",
    "placeholder",
    *_ERP_CLIENT_EXTRAS,
}


class ConnectionConfigError(RuntimeError):
    """A configured connection is malformed or its system cannot be reached."""


@dataclass(frozen=True)
class Conn:
    """An Airflow connection's fields, as parsed from an environment variable."""

    conn_id: str
    conn_type: str = ""
    host: str = ""
    login: str = ""
    password: str = field(default="", repr=False)
    schema: str = ""
    port: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, conn_id: str, connection: Any, extra: Mapping[str, Any]) -> Conn:
        """From any object with Airflow's connection attributes (``extra`` already decoded)."""
        c = connection
        return cls(
            conn_id,
            c.conn_type or "",
            c.host or "",
            c.login or "",
            c.password or "",
            c.schema or "",
            c.port,
            extra,
        )

    def option(self, name: str, default: Any = None) -> Any:
        """An extra, plain or in the legacy ``extra__<type>__name`` form."""
        value = self.extra.get(name, self.extra.get(f"extra__{self.conn_type}__{name}"))
        return default if value in (None, "") else value


def from_env(conn_id: str, environ: Mapping[str, str] | None = None) -> Conn | None:
    """``AIRFLOW_CONN_<ID>`` parsed (JSON or URI form), or None when it is not set."""
    raw = (environ if environ is not None else os.environ).get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if not raw:
        return None
    raw = raw.strip()
    return _from_json(conn_id, raw) if raw.startswith("{") else _from_uri(conn_id, raw)


def _from_json(conn_id: str, raw: str) -> Conn:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConnectionConfigError(f"AIRFLOW_CONN_{conn_id.upper()} is not valid JSON: {exc.msg}") from None
    extra = data.get("extra") or {}
    if isinstance(extra, str):
        extra = json.loads(extra) if extra.strip() else {}
    port = data.get("port")
    return Conn(
        conn_id,
        str(data.get("conn_type") or ""),
        str(data.get("host") or ""),
        str(data.get("login") or ""),
        str(data.get("password") or ""),
        str(data.get("schema") or ""),
        int(port) if port not in (None, "") else None,
        dict(extra),
    )


def _from_uri(conn_id: str, raw: str) -> Conn:
    """Airflow's URI form: ``type://login:password@host:port/schema?extra=…`` (``__extra__`` JSON too)."""
    parts = urlsplit(raw)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    extra: dict[str, Any] = json.loads(query.pop("__extra__")) if "__extra__" in query else query
    host = unquote(parts.hostname or "")
    if "://" in host or host.startswith(("http%3A", "https%3A")):
        host = unquote(host)
    return Conn(
        conn_id,
        parts.scheme.replace("-", "_"),
        host,
        unquote(parts.username or ""),
        unquote(parts.password or ""),
        unquote(parts.path[1:] if parts.path.startswith("/") else parts.path),
        _port(conn_id, parts),
        extra,
    )


def _port(conn_id: str, parts: SplitResult) -> int | None:
    """The URI's port; the error never repeats the netloc, which holds the password."""
    try:
        return parts.port
    except ValueError:
        raise ConnectionConfigError(
            f"AIRFLOW_CONN_{conn_id.upper()}: the URI's port is not a number; "
            "URL-encode special characters in the login and password (%40 for @, %2F for /, %23 for #)"
        ) from None


def describe(conn: Conn | None) -> str:
    """A log-safe one-liner: no password, no secret extras."""
    if conn is None:
        return "not configured (sandbox default)"
    where = conn.host or conn.schema or "?"
    return f"{conn.conn_id} ({conn.conn_type or 'untyped'}) → {where}"


# ------------------------------------------------------------------------------- Dynamics
def dynamics_config(conn: Conn | None) -> Any:
    """A :class:`DynamicsConfig` from the connection, or the sandbox's default app user."""
    from d365sync.dynamics import DynamicsConfig
    from d365sync.sandbox.dataverse.process import (
        DEFAULT_CLIENT_ID,
        DEFAULT_CLIENT_SECRET,
        DEFAULT_TENANT,
    )

    if conn is None:
        return DynamicsConfig(
            environment_url=SANDBOX_URL,
            tenant_id=DEFAULT_TENANT,
            client_id=DEFAULT_CLIENT_ID,
            client_secret=DEFAULT_CLIENT_SECRET,
            authority_host=SANDBOX_URL,
        )
    settings = {
        k: conn.option(k) for k in ("authority_host", "api_version", "plain_http_hosts") if conn.option(k)
    }
    settings |= {
        k: int(conn.option(k)) for k in ("page_size", "batch_size", "max_concurrency") if conn.option(k)
    }
    return DynamicsConfig(
        environment_url=_environment_url(conn),
        tenant_id=str(conn.option("tenant_id", "")),
        client_id=conn.login,
        client_secret=conn.password,
        verify=conn.option("ca_bundle") or True,
        **settings,
    )


def _environment_url(conn: Conn) -> str:
    """``https://org.crm.dynamics.com`` as host, or a bare host with the scheme in ``schema``."""
    if "://" in conn.host:
        return conn.host
    port = f":{conn.port}" if conn.port else ""
    return f"{conn.schema or 'https'}://{conn.host}{port}" if conn.host else ""


# ------------------------------------------------------------------------------------ ERP
def erp_conn_str(conn: Conn | None) -> str:
    """The ODBC connection string the ErpOdbcHook would build; the sandbox SQLite file if unset.

    Every value is quoted by the ODBC rules (:mod:`d365sync.erp.connstr`): a password holding
    ``;`` stays one ``PWD`` value instead of injecting attributes such as ``SERVER=``.
    """
    from d365sync.erp.connstr import connection_string

    if conn is None:
        return connection_string([("DRIVER", "SQLite3"), ("Database", Path(SANDBOX_ERP_DB).resolve())])
    driver = str(conn.option("driver") or "").strip("{} ")
    attributes: list[tuple[str, Any]] = [
        ("DRIVER", driver),
        ("DSN", conn.option("dsn")),
        ("SERVER", conn.host),
        ("DATABASE", conn.schema),
        ("UID", conn.login),
        ("PWD", conn.password),
        ("PORT", conn.port or None),
    ]
    attributes += [(k, v) for k, v in conn.extra.items() if k.lower() not in _NOT_IN_CONN_STR]
    try:
        return connection_string(attributes)
    except ValueError as exc:
        raise ConnectionConfigError(f"{conn.conn_id}: {exc}") from None


def erp_client(conn: Conn | None) -> Any:
    """An :class:`ErpClient` with the connection's client options (dialect, chunk size, retries)."""
    from d365sync.erp import ErpClient, RetryPolicy

    options = conn or Conn(ERP_CONN)
    retry = RetryPolicy(
        attempts=int(options.option("retry_attempts", 4)),
        base_delay=float(options.option("retry_base_delay", 0.5)),
    )
    fast = options.option("fast_executemany")
    return ErpClient(
        erp_conn_str(conn),
        dialect=options.option("dialect"),
        chunk_size=int(options.option("chunk_size", 10_000)),
        retry=retry,
        fast_executemany=None if fast is None else str(fast).lower() in {"1", "true", "yes", "on"},
    )


# ---------------------------------------------------------------------------------- state
def state_url(conn: Conn | None) -> tuple[str, str | None]:
    """(SQLAlchemy URL, PostgreSQL schema or None) of the sync state store."""
    if conn is None:
        return f"sqlite:///{Path(SANDBOX_STATE_DB).resolve()}", None
    explicit = conn.option("sqlalchemy_url") or conn.option("url")
    schema = conn.option("schema")
    if explicit:
        return str(explicit), schema
    kind = conn.conn_type.lower()
    if kind == "sqlite":
        return f"sqlite:///{conn.host or conn.schema}", None
    if kind in ("postgres", "postgresql"):
        from sqlalchemy.engine import URL

        # URL.create quotes every part: a password with ``@ # / :`` stays the password (a
        # concatenated URL would make part of it the host, and the driver's error would show it).
        url = URL.create(
            "postgresql+psycopg2",
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or None,
            port=conn.port,
            database=conn.schema or None,
        )
        return url.render_as_string(hide_password=False), schema
    raise ConnectionConfigError(
        f"{conn.conn_id}: unsupported state store type {conn.conn_type!r} (sqlite, postgres)"
    )
