"""Provider metadata read by Airflow's ProvidersManager via the ``apache_airflow_provider`` entry
point; it is what gives the ``dynamics`` connection type its form and its "Test" button.

Declarative ``conn-fields``/``ui-field-behaviour`` replace the hook methods deprecated in 3.2.
"""

from __future__ import annotations

from typing import Any


def _optional(label: str, kind: str = "string", **schema: Any) -> dict[str, Any]:
    return {"label": label, "schema": {"type": [kind, "null"], **schema}}


def _dynamics_connection() -> dict[str, Any]:
    return {
        "connection-type": "dynamics",
        "hook-class-name": "d365sync.airflow.hook.DynamicsWebApiHook",
        "hook-name": "Dynamics 365 (Dataverse Web API)",
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "port"],
            "relabeling": {
                "host": "Environment URL",
                "login": "Client ID",
                "password": "Client Secret",
            },
            "placeholders": {
                "host": "https://contoso.crm4.dynamics.com",
                "login": "00000000-0000-0000-0000-000000000000 (application id)",
                "password": "client secret of the app registration",
                "tenant_id": "contoso.onmicrosoft.com or tenant GUID",
                "authority_host": "https://login.microsoftonline.com",
            },
        },
        "conn-fields": {
            "tenant_id": _optional("Tenant ID"),
            "authority_host": _optional("Authority host"),
            "api_version": _optional("Web API version", default="v9.2"),
            "ca_bundle": _optional("CA bundle path"),
            "page_size": _optional("Page size", "integer", default=5000, minimum=1, maximum=5000),
            "batch_size": _optional("Batch size", "integer", default=1000, minimum=1, maximum=1000),
            "max_concurrency": _optional("Max concurrency", "integer", default=4, minimum=1, maximum=52),
        },
    }


def _erp_connection() -> dict[str, Any]:
    return {
        "connection-type": "erp_odbc",
        "hook-class-name": "d365sync.airflow.erp_hook.ErpOdbcHook",
        "hook-name": "Legacy ERP (ODBC)",
        "ui-field-behaviour": {
            "hidden-fields": [],
            "relabeling": {"schema": "Database (or SQLite file path)"},
            "placeholders": {
                "host": "erp-db.example.net,1433",
                "schema": "ERPPROD",
                "extra": '{"Encrypt": "yes"}',
            },
        },
        "conn-fields": {
            "driver": _optional("ODBC driver (name registered in odbcinst.ini)"),
            "dialect": _optional(
                "SQL dialect (empty = detected)", enum=[None, "sqlite", "postgresql", "mariadb", "mssql"]
            ),
            "chunk_size": _optional("Rows per chunk", "integer", minimum=1),
            "fast_executemany": _optional("fast_executemany (empty = per dialect)", "boolean"),
            "retry_attempts": _optional("Retry attempts", "integer", minimum=1),
            "retry_base_delay": _optional("Retry base delay (s)", "number", minimum=0),
        },
    }


def get_provider_info() -> dict[str, Any]:
    """Entry point ``apache_airflow_provider.provider_info`` of the d365-erp-sync distribution."""
    return {
        "package-name": "d365-erp-sync",
        "name": "D365 ERP Sync",
        "description": "Dynamics 365 (Dataverse Web API) and legacy ERP (ODBC) connections.",
        "versions": ["0.1.0"],
        "connection-types": [_dynamics_connection(), _erp_connection()],
    }
