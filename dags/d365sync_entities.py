"""One sync DAG per entity file in include/entities (``sync_<entity>``); see d365sync.airflow.dag_factory."""

from __future__ import annotations

from d365sync.airflow.dag_factory import entity_dags

globals().update(entity_dags())
