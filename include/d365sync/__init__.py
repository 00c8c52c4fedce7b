"""d365sync: keep Dynamics 365 (Dataverse Web API) and a legacy ERP (ODBC) in bi-directional sync."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# The shipped entity files; D365SYNC_ENTITIES_DIR points the DAGs and the UI elsewhere.
ENTITIES_DIR = Path(__file__).resolve().parent.parent / "entities"
