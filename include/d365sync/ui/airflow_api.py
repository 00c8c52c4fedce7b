"""Trigger DAG runs through Airflow's public REST API, as the calling user.

Why the REST API and not the metadata DB: the API applies the caller's own permissions (a
viewer's token cannot trigger anything), validates the Params, and records who triggered the
run, exactly as if the operator had pressed "Trigger" in the Airflow UI.

Where the API is (security issue 11, finding 7): the caller's JWT goes only to a configured
address, never to one taken from the request. The ``Host`` header is the client's to choose, so
deriving the URL from it would post the operator's token to any server a forged request names.
The base URL is ``D365SYNC_AIRFLOW_API_URL``, else Airflow's ``[api] base_url``, else the API
server itself on loopback (``http://127.0.0.1:<[api] port>``, ``https`` when ``[api] ssl_cert``
is set): the plugin runs inside that server. And a trigger counts only when the answer shows the
run: a 2xx whose body lacks the requested DAG's ``dag_run_id`` is an error, not a success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


class TriggerError(RuntimeError):
    """Airflow refused or could not be reached; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class TriggerUnconfirmed(TriggerError):
    """A success status, but the body does not show a run of the DAG: nothing is known queued."""


@dataclass(frozen=True)
class TriggeredRun:
    dag_id: str
    dag_run_id: str
    state: str


def configured_api_url() -> str:
    """Airflow's ``[api] base_url``, else the API server on loopback (``[api] host``/``port``)."""
    from airflow.configuration import conf

    if base := (conf.get("api", "base_url", fallback="") or "").strip():
        return base.rstrip("/")
    host = (conf.get("api", "host", fallback="") or "").strip()
    host = "127.0.0.1" if host in WILDCARD_HOSTS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    port = conf.getint("api", "port", fallback=8080)
    tls = conf.get("api", "ssl_cert", fallback="") and conf.get("api", "ssl_key", fallback="")
    return f"{'https' if tls else 'http'}://{host}:{port}"


class AirflowApi:
    """``POST /api/v2/dags/{dag_id}/dagRuns`` with the caller's JWT, to the configured API only.

    ``base_url`` is ``D365SYNC_AIRFLOW_API_URL`` (:class:`~d365sync.ui.settings.UiSettings`);
    without it, :func:`configured_api_url` is read at each call.
    """

    def __init__(
        self, base_url: str | None = None, timeout: float = 10.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.configured = base_url.rstrip("/") if base_url else None
        self.timeout = timeout
        self.transport = transport

    @property
    def base_url(self) -> str:
        return self.configured or configured_api_url()

    def trigger(self, dag_id: str, conf: dict[str, Any], token: str, note: str | None = None) -> TriggeredRun:
        """Queue a manual run of ``dag_id`` (no logical date: a manual run of "now")."""
        url = f"{self.base_url}/api/v2/dags/{dag_id}/dagRuns"
        body = {"logical_date": None, "conf": conf, "note": note}
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        try:
            with httpx.Client(timeout=self.timeout, transport=self.transport) as client:
                response = client.post(url, json=body, headers=headers)  # redirects are not followed
        except httpx.HTTPError as exc:
            raise TriggerError(f"Airflow API not reachable at {url}: {type(exc).__name__}") from None
        if response.status_code >= 300:
            message = f"Airflow refused to trigger {dag_id}: {_detail(response)}"
            raise TriggerError(message, response.status_code)
        return _created_run(response, dag_id, url)


def _created_run(response: httpx.Response, dag_id: str, url: str) -> TriggeredRun:
    """The run the answer describes; :class:`TriggerUnconfirmed` unless it is a run of ``dag_id``."""
    try:
        data = response.json()
    except ValueError:
        data = None
    run_id = data.get("dag_run_id") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("dag_id") != dag_id
        or not isinstance(run_id, str)
        or not run_id
    ):
        raise TriggerUnconfirmed(
            f"{url} answered HTTP {response.status_code} without a {dag_id} run in its body "
            "(no dag_id/dag_run_id): not counted as triggered",
            response.status_code,
        )
    return TriggeredRun(dag_id, run_id, str(data.get("state", "")))


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):  # not JSON, or not an object
        detail = response.text
    return f"HTTP {response.status_code} {str(detail)[:300]}"
