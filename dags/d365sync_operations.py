"""``reconcile`` (nightly), ``health_report`` (daily, with the retention purge), ``replay_dead_letters``,
``apply_review_decisions`` and ``privacy_erase`` (manual, with Params)."""

from __future__ import annotations

from d365sync.airflow.dag_factory import operations_dags

globals().update(operations_dags())
