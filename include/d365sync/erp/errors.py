"""Exceptions and per-row failure records of the ERP client.

Messages name the table, key and column an operator must look at, never connection strings
or passwords, so they are safe in Airflow task logs and in the dead-letter queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Key = tuple[Any, ...]


class ErpError(Exception):
    """Base class of everything the client raises on purpose."""


class ErpSpecError(ErpError):
    """A spec does not match the database (unknown table or column) or forbids the operation."""


class ErpConnectionError(ErpError):
    """The connection was lost and retries (if any) ran out; the current chunk was rolled back.

    ``partial`` holds the result of the chunks committed before the loss (a ``LoadResult``),
    so the caller can log it; rerunning the whole load is safe because writes are keyed.
    """

    partial: Any = None


class ErpDataError(ErpError):
    """A value read from the ERP cannot be converted (e.g. a CHAR(8) date that is no date).

    The client's reads no longer raise it: one such value must not abort a whole extract, so
    it is reported on its row instead (:class:`UnreadableValue` in ``Row.errors``). Kept, with
    the same message shape, for callers that want to stop on such a row themselves.
    """

    def __init__(self, table: str, key: Key, column: str, message: str) -> None:
        self.table, self.key, self.column = table, key, column
        super().__init__(f"{table} key={format_key(key)} column {column}: {message}")


class CursorNotReady(ErpError):
    """The new cursor is only known once the change stream has been read to the end."""


@dataclass(frozen=True)
class RowFailure:
    """One row that was not written, with enough context to fix it or dead-letter it."""

    table: str
    key: Key
    column: str | None
    message: str

    def __str__(self) -> str:
        where = f" column {self.column}" if self.column else ""
        return f"{self.table} key={format_key(self.key)}{where}: {self.message}"


@dataclass(frozen=True)
class UnreadableValue:
    """One value read from the ERP that its column's type cannot hold.

    The row is still delivered (see ``reading.Row``), with this value kept as the driver
    returned it (usually text), so the caller can dead-letter the row instead of losing it or
    aborting the read. ``rule`` is the column's declared type (``CHAR(8) date YYYYMMDD``,
    ``DECIMAL(15,2)``); ``message`` never repeats ``value``, which may need masking.
    """

    table: str
    key: Key
    column: str
    rule: str
    message: str
    value: Any

    def __str__(self) -> str:
        return f"{self.table} key={format_key(self.key)} column {self.column} ({self.rule}): {self.message}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"table", "key", "column", "rule", "message", "value"}``, key as text."""
        value = (
            self.value if self.value is None or isinstance(self.value, str | int | float) else str(self.value)
        )
        return {
            "table": self.table,
            "key": format_key(self.key),
            "column": self.column,
            "rule": self.rule,
            "message": self.message,
            "value": value,
        }


class RowRejected(ValueError):
    """Raised by validation for one value; turned into a :class:`RowFailure` by the caller."""

    def __init__(self, column: str | None, message: str) -> None:
        self.column = column
        super().__init__(message)


def format_key(key: Key) -> str:
    return "/".join(str(part) for part in key)
