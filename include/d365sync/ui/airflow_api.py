"""Trigger DAG runs through Airflow's public REST API, as the calling user.

Why the REST API and not the metadata DB: the API applies the caller's own permissions (a
viewer's token cannot trigger anything), validates the Params, and records who triggered the
run, exactly as if the operator had pressed "Trigger" in the Airflow UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


class TriggerError(RuntimeError):
    """Airflow refused or could not be reached; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TriggeredRun:
    dag_id: str
    dag_run_id: str
    state: str


class AirflowApi:
    """``POST /api/v2/dags/{dag_id}/dagRuns`` with the caller's JWT."""

    def __init__(
        self, base_url: str | None = None, timeout: float = 10.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        self.timeout = timeout
        self.transport = transport

    def trigger(
        self, base_url: str, dag_id: str, conf: dict[str, Any], token: str, note: str | None = None
    ) -> TriggeredRun:
        """Queue a manual run of ``dag_id`` (no logical date: a manual run of "now")."""
        url = f"{(self.base_url or base_url).rstrip('/')}/api/v2/dags/{dag_id}/dagRuns"
        body = {"logical_date": None, "conf": conf, "note": note}
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        try:
            with httpx.Client(timeout=self.timeout, transport=self.transport) as client:
                response = client.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise TriggerError(f"Airflow API not reachable at {url}: {type(exc).__name__}") from None
        if response.status_code >= 300:
            message = f"Airflow refused to trigger {dag_id}: {_detail(response)}"
            raise TriggerError(message, response.status_code)
        data = response.json()
        return TriggeredRun(dag_id, str(data.get("dag_run_id", "")), str(data.get("state", "")))


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return f"HTTP {response.status_code} {str(detail)[:300]}"
