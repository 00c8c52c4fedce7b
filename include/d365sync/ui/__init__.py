"""The operations UI mounted into the Airflow UI by ``plugins/d365sync_plugin.py``.

Import :func:`d365sync.ui.app.create_app`; this package module imports nothing, so the engine's
health report can use :mod:`d365sync.engine.health` without FastAPI.
"""
