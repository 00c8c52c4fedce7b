"""Airflow hook for the legacy ERP: turns an ``erp_odbc`` connection into an :class:`ErpClient`.

It is the providers' :class:`OdbcHook` (same connection-string rules, ``connect_kwargs``,
``placeholder``) with three differences:

* the client options below are read from the extras and are *not* copied into the ODBC
  connection string;
* the ``driver`` extra is honoured when it names a driver registered in ``odbcinst.ini``
  (``pyodbc.drivers()``): such a name cannot load an arbitrary library, which is the risk
  ``[providers.odbc] allow_driver_in_extra`` guards against; paths still need that setting;
* the placeholder is ``?`` (pyodbc), whatever the connection says.

Precedence for every option: constructor argument, then connection extra, then default.

Client extras: ``dialect`` (sqlite | postgresql | mariadb | mssql; detected when empty),
``chunk_size`` (rows per page/transaction, default 10000), ``fast_executemany`` (true/false;
default per dialect), ``retry_attempts`` (default 4) and ``retry_base_delay`` (seconds, 0.5).
"""

from __future__ import annotations

from typing import Any

import pyodbc
from airflow.providers.odbc.hooks.odbc import OdbcHook

from d365sync.erp.client import DEFAULT_CHUNK, ErpClient
from d365sync.erp.connstr import connection_string
from d365sync.erp.retry import RetryPolicy

CLIENT_EXTRAS = ("dialect", "chunk_size", "fast_executemany", "retry_attempts", "retry_base_delay")
_NOT_IN_CONN_STR = {"driver", "dsn", "connect_kwargs", "sqlalchemy_scheme", "placeholder", *CLIENT_EXTRAS}


class ErpOdbcHook(OdbcHook):
    """Connection type ``erp_odbc``: an ODBC data source that is a legacy ERP database."""

    conn_name_attr = "erp_conn_id"
    default_conn_name = "erp_default"
    conn_type = "erp_odbc"
    hook_name = "Legacy ERP (ODBC)"
    _placeholder = "?"

    def __init__(self, *args: Any, client_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_options = dict(client_options or {})

    @property
    def placeholder(self) -> str:  # type: ignore[override]
        return "?"

    @property
    def driver(self) -> str | None:
        extra = str(self.connection_extra_lower.get("driver") or "").strip().strip("{}").strip()
        if not self._driver and extra and extra in pyodbc.drivers():
            self._driver = extra
        if self._driver:
            return self._driver.strip().lstrip("{").rstrip("}").strip()
        return super().driver

    @property
    def odbc_connection_string(self) -> str:
        """As OdbcHook builds it, minus the client options, with every value ODBC-quoted.

        OdbcHook concatenates values as they are, so a password holding ``;`` injects
        attributes (``PWD=x;SERVER=evil``); :func:`connection_string` braces such values.
        """
        if not self._conn_str:
            conn = self.connection
            attributes: list[tuple[str, Any]] = [
                ("DRIVER", self.driver),
                ("DSN", self.dsn),
                ("SERVER", conn.host),
                ("DATABASE", self.database),
                ("UID", conn.login),
                ("PWD", conn.password),
                ("PORT", conn.port or None),
            ]
            attributes += [
                (k, v) for k, v in self.connection_extra.items() if k.lower() not in _NOT_IN_CONN_STR
            ]
            self._conn_str = connection_string(attributes)
        return self._conn_str

    def option(self, name: str, default: Any = None) -> Any:
        """Constructor ``client_options`` first, then the connection extra, then ``default``."""
        if name in self._client_options:
            return self._client_options[name]
        value = self.connection_extra_lower.get(name)
        return default if value in (None, "") else value

    def get_client(self) -> ErpClient:
        """A configured client; it opens (and reopens) connections through :meth:`get_conn`."""
        retry = RetryPolicy(
            attempts=int(self.option("retry_attempts", 4)),
            base_delay=float(self.option("retry_base_delay", 0.5)),
        )
        fast = self.option("fast_executemany")
        return ErpClient(
            self.get_conn,
            dialect=self.option("dialect") or None,
            chunk_size=int(self.option("chunk_size", DEFAULT_CHUNK)),
            retry=retry,
            fast_executemany=None if fast is None else _truthy(fast),
        )

    def test_connection(self) -> tuple[bool, str]:
        """Connect, detect the dialect and report the server — what the UI's Test button shows."""
        try:
            with self.get_client() as client:
                return True, f"Connected to {client.server_info()}"
        except Exception as exc:  # the UI needs a message, not a traceback
            return False, f"{type(exc).__name__}: {exc}"


def _truthy(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in {"1", "true", "yes", "on"}
