"""Security issue 11, finding 7: "replay now" follows the ``Host`` header and trusts any 2xx.

The UI posts the operator's JWT to Airflow's REST API. The address must come from configuration
(``D365SYNC_AIRFLOW_API_URL``, else Airflow's ``[api] base_url``, else the API server on
loopback), never from the request: here a forged ``Host`` names a recording server on loopback,
which must receive nothing. And the dead letter is marked replayed only when the answer shows a
run of the replay DAG; any other 2xx leaves it pending with an error banner.

Driven like the other UI tests: the real app mounted under ``/d365sync``, real Airflow JWTs, the
real Airflow configuration (``AIRFLOW__API__*`` variables) and loopback HTTP servers.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from d365sync.ui.airflow_api import AirflowApi, configured_api_url
from tests.ui.conftest import PREFIX, Env, FakeAirflowApi, fake_airflow_api
from tests.ui.test_pages import _flash, _post, _shown


@pytest.fixture
def attacker() -> Iterator[FakeAirflowApi]:
    """A server the attacker controls: it records whatever is sent to it."""
    with fake_airflow_api() as server:
        yield server


@pytest.fixture
def airflow_config(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Airflow's ``[api]`` settings as a deployment leaves them: nothing set."""
    for name in ("BASE_URL", "HOST", "PORT", "SSL_CERT", "SSL_KEY"):
        monkeypatch.delenv(f"AIRFLOW__API__{name}", raising=False)
    return monkeypatch


def _port(url: str) -> str:
    return str(urlsplit(url).port)


def _forged_replay(ui: Env, attacker: FakeAirflowApi) -> object:
    """An operator's replay request whose Host (and X-Forwarded-Host) name the attacker's server."""
    client = ui.as_role("op")
    csrf = ui.csrf()
    host = urlsplit(attacker.url).netloc
    headers = {"host": host, "x-forwarded-host": host, "x-forwarded-proto": "http"}
    return client.post(
        f"{PREFIX}/dead-letters/1/replay", data={"csrf_token": csrf}, headers=headers, follow_redirects=False
    )


@pytest.mark.parametrize("configured_by", ["default", "airflow_base_url", "d365sync_setting"])
def test_a_forged_host_header_never_receives_the_token(
    ui: Env, attacker: FakeAirflowApi, airflow_config: pytest.MonkeyPatch, configured_by: str
) -> None:
    # The real Airflow API (the loopback fake) is found through configuration only.
    if configured_by == "default":  # the API server itself on loopback, at [api] port
        airflow_config.setenv("AIRFLOW__API__PORT", _port(ui.api.url))
        ui.app.state.ctx.airflow = AirflowApi()
    elif configured_by == "airflow_base_url":
        airflow_config.setenv("AIRFLOW__API__BASE_URL", ui.api.url + "/")
        ui.app.state.ctx.airflow = AirflowApi()
    else:  # D365SYNC_AIRFLOW_API_URL, as the ui fixture builds the app
        ui.app.state.ctx.airflow = AirflowApi(ui.api.url)

    response = _forged_replay(ui, attacker)

    assert response.status_code == 303, response.text  # type: ignore[attr-defined]
    assert attacker.calls == [], "the forged Host received a request (with the operator's JWT)"
    (call,) = ui.api.calls
    assert call["path"] == "/api/v2/dags/replay_dead_letters/dagRuns"
    assert call["auth"] == f"Bearer {ui.tokens['op']}"
    assert _shown(ui, response) == "Replay of dead letter 1 queued."
    assert [d.id for d in ui.store.dead_letters("customers", status="replay")] == [1]


UNCONFIRMING = {  # a success status whose body does not show a run of the replay DAG
    "empty": (200, b""),
    "text": (200, b"OK"),
    "object": (200, b"{}"),
    "list": (200, b"[]"),
    "detail": (202, b'{"detail": "accepted"}'),
    "no-run-id": (200, b'{"dag_id": "replay_dead_letters", "state": "queued"}'),
    "blank-run-id": (200, b'{"dag_id": "replay_dead_letters", "dag_run_id": ""}'),
    "other-dag": (201, b'{"dag_id": "some_other_dag", "dag_run_id": "manual__1"}'),
    "no-dag-id": (200, b'{"dag_run_id": "manual__1", "state": "queued"}'),
    "no-content": (204, b""),
}


@pytest.mark.parametrize(("status", "answer"), UNCONFIRMING.values(), ids=UNCONFIRMING.keys())
def test_a_2xx_without_the_replay_run_does_not_mark_the_letter_replayed(
    ui: Env, status: int, answer: bytes
) -> None:
    ui.api.status, ui.api.answer = status, answer
    response = _post(ui, "op", "/dead-letters/1/replay", {})
    assert _flash(response) == {"error": ["replay_unconfirmed"], "id": ["1"], "status": ["pending"]}
    assert _shown(ui, response) == "Airflow did not confirm a replay run; dead letter 1 stays pending."
    assert len(ui.api.calls) == 1
    assert [d.id for d in ui.store.dead_letters("customers")] == [1, 2], "still pending"
    assert ui.store.dead_letters("customers", status="replay") == []


def test_the_default_api_is_the_api_server_on_loopback(airflow_config: pytest.MonkeyPatch) -> None:
    assert configured_api_url() == "http://127.0.0.1:8080"
    airflow_config.setenv("AIRFLOW__API__HOST", "0.0.0.0")
    airflow_config.setenv("AIRFLOW__API__PORT", "9091")
    assert configured_api_url() == "http://127.0.0.1:9091"
    airflow_config.setenv("AIRFLOW__API__HOST", "10.1.2.3")  # bound to one address: that one
    assert configured_api_url() == "http://10.1.2.3:9091"
    airflow_config.setenv("AIRFLOW__API__HOST", "::")
    assert configured_api_url() == "http://127.0.0.1:9091"
    airflow_config.setenv("AIRFLOW__API__HOST", "::1")
    assert configured_api_url() == "http://[::1]:9091"
    airflow_config.setenv("AIRFLOW__API__SSL_CERT", "/certs/api.pem")
    airflow_config.setenv("AIRFLOW__API__SSL_KEY", "/certs/api.key")
    assert configured_api_url() == "https://[::1]:9091"
    airflow_config.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/airflow/")
    assert configured_api_url() == "https://airflow.example.com/airflow"
    assert AirflowApi("http://api:8080/").base_url == "http://api:8080"


def test_an_unreachable_configured_api_changes_nothing(
    ui: Env, airflow_config: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with fake_airflow_api() as gone:
        port = _port(gone.url)  # a port nothing listens on once the block ends
    airflow_config.setenv("AIRFLOW__API__PORT", port)
    ui.app.state.ctx.airflow = AirflowApi(timeout=2)
    with caplog.at_level("WARNING", logger="d365sync.ui.routes"):
        response = _post(ui, "op", "/dead-letters/1/replay", {})
    assert _flash(response)["error"] == ["replay_unreachable"]
    assert f"http://127.0.0.1:{port}/api/v2/dags/replay_dead_letters/dagRuns" in caplog.text
    assert "testserver" not in caplog.text
    assert [d.id for d in ui.store.dead_letters("customers")] == [1, 2]
