"""d365sync: keep Dynamics 365 (Dataverse Web API) and a legacy ERP (ODBC) in bi-directional sync."""

from __future__ import annotations

__version__ = "0.1.0"
