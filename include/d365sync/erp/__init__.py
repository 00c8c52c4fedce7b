"""Airflow-free client for the legacy ERP over ODBC (SQLite, PostgreSQL, MariaDB, SQL Server).

Typical use::

    client = ErpClient("DRIVER={PostgreSQL Unicode};SERVER=…;DATABASE=erp;UID=…;PWD=…;")
    stream = client.extract_changes(CUSTOMERS, since=stored_cursor)
    for chunk in stream:
        stage(chunk)
    store(stream.cursor)          # only after the downstream load committed
    # a row whose value cannot be converted is still delivered: row.errors names the column
    result = client.upsert(CUSTOMERS, rows)   # LoadResult with failures and conflicts
"""

from __future__ import annotations

from d365sync.erp.client import ErpClient
from d365sync.erp.dialects import Dialect, detect_dialect, dialect_for
from d365sync.erp.errors import (
    CursorNotReady,
    ErpConnectionError,
    ErpDataError,
    ErpError,
    ErpSpecError,
    Key,
    RowFailure,
    UnreadableValue,
)
from d365sync.erp.reading import (
    ChangeStream,
    ExtractCursor,
    Row,
    RowReader,
    SnapshotChunk,
    SnapshotDiff,
    digest,
)
from d365sync.erp.retry import NO_RETRY, RetryPolicy, is_transient
from d365sync.erp.spec import Column, ColumnType, TableSpec
from d365sync.erp.writing import Conflict, LoadResult

__all__ = [
    "NO_RETRY",
    "ChangeStream",
    "Column",
    "ColumnType",
    "Conflict",
    "CursorNotReady",
    "Dialect",
    "ErpClient",
    "ErpConnectionError",
    "ErpDataError",
    "ErpError",
    "ErpSpecError",
    "ExtractCursor",
    "Key",
    "LoadResult",
    "RetryPolicy",
    "Row",
    "RowFailure",
    "RowReader",
    "SnapshotChunk",
    "SnapshotDiff",
    "TableSpec",
    "UnreadableValue",
    "detect_dialect",
    "dialect_for",
    "digest",
    "is_transient",
]
