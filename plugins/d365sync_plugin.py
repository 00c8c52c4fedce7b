"""Registers the d365sync operations UI with Airflow: one FastAPI app and its navigation entries.

Kept small on purpose: the API server imports every plugin at start, so this module imports only
the UI factory (FastAPI and Jinja2, already loaded by Airflow); the state store is opened on the
first request, and nothing here touches pandas, Great Expectations or pyarrow.

* ``/d365sync`` — the app (review queue, dead letters, health dashboard, audit log); every route
  checks the Airflow user itself (plugins get no authentication from Airflow).
* Navigation: "D365 Sync", a top-level entry of Airflow's navigation bar (``nav_top_level``,
  Airflow 3.1+), opening the app inside the Airflow UI (``url_route``); the app's own tabs lead to
  the health dashboard, dead letters, review queue and audit log.
* Per DAG: a "D365 Sync entity" tab on every DAG; on a ``sync_<entity>`` DAG it opens that
  entity's page.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from d365sync.ui.app import create_app

PREFIX = "/d365sync"
CATEGORY = "D365 Sync"


class D365SyncPlugin(AirflowPlugin):
    """The operations UI of the Dynamics 365 <-> ERP sync."""

    name = "d365sync"
    fastapi_apps = [{"app": create_app(), "url_prefix": PREFIX, "name": "D365 Sync operations"}]
    external_views = [
        {
            "name": CATEGORY,
            "href": f"{PREFIX}/",
            "url_route": "d365sync",
            "destination": "nav",
            "nav_top_level": True,
            "icon": f"{PREFIX}/static/icon.svg",
            "icon_dark_mode": f"{PREFIX}/static/icon-dark.svg",
        },
        {
            "name": "D365 Sync entity",
            "href": PREFIX + "/dag/{DAG_ID}",
            "url_route": "d365sync-entity",
            "destination": "dag",
        },
    ]
