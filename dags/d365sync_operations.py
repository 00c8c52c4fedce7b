"""``reconcile`` (nightly), ``health_report`` (daily), ``replay_dead_letters`` and
``apply_review_decisions`` (manual, with Params)."""

from __future__ import annotations

from d365sync.airflow.dag_factory import operations_dags

globals().update(operations_dags())
