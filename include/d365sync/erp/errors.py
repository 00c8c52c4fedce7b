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
    """A value read from the ERP cannot be converted (e.g. a CHAR(8) date that is no date)."""

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


class RowRejected(ValueError):
    """Raised by validation for one value; turned into a :class:`RowFailure` by the caller."""

    def __init__(self, column: str | None, message: str) -> None:
        self.column = column
        super().__init__(message)


def format_key(key: Key) -> str:
    return "/".join(str(part) for part in key)
