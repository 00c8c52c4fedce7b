"""The ERP sandbox: a legacy-style schema per dialect and a deterministic dirty-data seeder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def sqlite_airflow_connection(database: Path) -> dict[str, Any]:
    """The ``erp_odbc`` Airflow connection to a SQLite ERP file through the SQLite3 ODBC driver,
    as ``AIRFLOW_CONN_ERP_DEFAULT`` takes it (JSON)."""
    return {"conn_type": "erp_odbc", "schema": str(database), "extra": {"driver": "SQLite3"}}
