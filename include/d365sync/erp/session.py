"""One ODBC connection, reopened on demand, running units of work as retried transactions.

A *unit* is a function of a cursor that does one chunk's or one page's work. It is committed
on success and rolled back on failure; on a transient failure the connection is thrown away,
a fresh one is opened after a backoff delay and the whole unit runs again. Because units are
transactions (and reads use keyset pages), a retry can neither duplicate nor half-apply work.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

import pyodbc

from d365sync.engine.pii import mask_text
from d365sync.erp.dialects import Dialect, detect_dialect, dialect_for
from d365sync.erp.errors import ErpConnectionError
from d365sync.erp.retry import RetryPolicy, is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")
Connect = Callable[[], pyodbc.Connection]


class Session:
    """Holds the current connection and the detected dialect; never any sync state."""

    def __init__(self, connect: Connect, dialect: str | Dialect | None, retry: RetryPolicy) -> None:
        self._connect = connect
        self._dialect = dialect_for(dialect) if isinstance(dialect, str) else dialect
        self._conn: pyodbc.Connection | None = None
        self.retry = retry

    @property
    def dialect(self) -> Dialect:
        if self._dialect is None:
            self.connection()
        assert self._dialect is not None
        return self._dialect

    def connection(self) -> pyodbc.Connection:
        if self._conn is None:
            conn = self._connect()
            conn.autocommit = False
            if self._dialect is None:
                self._dialect = detect_dialect(conn.getinfo(pyodbc.SQL_DBMS_NAME))
            if self._dialect.maxwrite:
                conn.maxwrite = self._dialect.maxwrite
            self._conn = conn
        return self._conn

    def run(self, unit: Callable[[pyodbc.Cursor], T]) -> T:
        """Run ``unit`` in one transaction, retrying transient failures with backoff."""
        delays = self.retry.delays()
        attempt = 1
        while True:
            try:
                return self._once(unit)
            except pyodbc.Error as exc:
                if not is_transient(exc):
                    raise
                self.discard()
                delay = next(delays, None)
                if delay is None:
                    raise ErpConnectionError(
                        f"ERP connection failed after {attempt} attempt(s); the chunk was rolled back: "
                        f"{driver_message(exc)}"
                    ) from exc
                log.warning(
                    "transient ERP failure (attempt %d), retrying in %.1fs: %s",
                    attempt,
                    delay,
                    driver_message(exc),
                )
                self.retry.sleep(delay)
                attempt += 1

    def _once(self, unit: Callable[[pyodbc.Cursor], T]) -> T:
        conn = self.connection()
        cursor = conn.cursor()
        try:
            result = unit(cursor)
            conn.commit()
            return result
        except BaseException:
            with contextlib.suppress(pyodbc.Error):
                conn.rollback()
            raise
        finally:
            with contextlib.suppress(pyodbc.Error):
                cursor.close()

    def discard(self) -> None:
        """Drop the connection after a failure; closing a dead connection may itself fail."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(pyodbc.Error):
                conn.close()

    def close(self) -> None:
        self.discard()


def driver_message(exc: BaseException) -> str:
    """The driver's text without the ODBC boilerplate, short enough for a log line.

    Drivers quote rejected values (``Truncated value: 'anna@example.com'``) and sometimes the
    connection string, so e-mails, phones and credentials are masked (:mod:`d365sync.engine.pii`).
    """
    args = getattr(exc, "args", ())
    text = str(args[1] if len(args) > 1 else (args[0] if args else exc))
    for noise in ("[unixODBC]", "(SQLExecDirectW)", "(SQLExecute)", "(SQLPrepare)", "(SQLEndTran)"):
        text = text.replace(noise, "")
    text = mask_text(" ".join(text.split()))
    return text if len(text) <= 400 else text[:397] + "..."
