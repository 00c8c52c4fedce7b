"""``d365sync_servicebus_inbox``: Dataverse notifications from an Azure Service Bus queue into the
event inbox; only when ``D365SYNC_SERVICEBUS_QUEUE`` is set (docs/events-servicebus.md)."""

from __future__ import annotations

from d365sync.airflow.dag_factory import servicebus_dags

globals().update(servicebus_dags())
