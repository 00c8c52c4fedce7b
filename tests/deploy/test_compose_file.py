"""``docker-compose.yaml``: valid against the Compose Specification schema, and the same settings
as the process-level topology test (``test_celery_topology.py``) modulo endpoints and ports."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tests.deploy import compose
from tests.deploy.test_celery_topology import DOTENV
from tests.deploy.topology import localizer

SCHEMA = Path(__file__).with_name("compose-spec.json")
REQUIRED_SERVICES = {
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
    "flower",
    "postgres",
    "state-db",
    "erp-db",
    "redis",
    "dataverse",
}
# Names the standalone demo sets (scripts/demo.sh write_env); the compose file must use them.
DEMO_NAMES = {
    "AIRFLOW_HOME",
    "AIRFLOW__CORE__DAGS_FOLDER",
    "AIRFLOW__CORE__PLUGINS_FOLDER",
    "AIRFLOW__CORE__LOAD_EXAMPLES",
    "AIRFLOW__CORE__PARALLELISM",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL",
    "AIRFLOW__API__PORT",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
    "D365SYNC_STAGING_ROOT",
    "AIRFLOW_CONN_DYNAMICS_DEFAULT",
    "AIRFLOW_CONN_ERP_DEFAULT",
    "AIRFLOW_CONN_SYNC_STATE_DEFAULT",
}
# Service-specific additions on top of x-airflow-common (everything else must be inherited as is).
SERVICE_EXTRAS = {
    "airflow-worker": {"DUMB_INIT_SETSID"},
    # the webhook receiver's key: the api-server hosts the receiver, airflow-init registers the
    # webhook; no other service gets it
    "airflow-apiserver": {"D365SYNC_WEBHOOK_KEY"},
    "airflow-init": {
        "_AIRFLOW_WWW_USER_PASSWORD",
        "D365SYNC_SEED_ERP",
        "DEMO_ROWS",
        "ERP_ODBC",
        "D365SYNC_WEBHOOK_URL",
        # checked by `d365sync deploy check-secrets` before anything starts
        "POSTGRES_PASSWORD",
        "STATE_DB_PASSWORD",
        "ERP_DB_PASSWORD",
        "DATAVERSE_CLIENT_SECRET",
        "D365SYNC_WEBHOOK_KEY",
    },
}


def test_compose_file_validates_against_the_compose_spec() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose.load_raw())]
    assert errors == []
    # the schema does reject what it should (guards against a permissive or empty schema file)
    broken = compose.load_raw()
    broken["services"]["redis"]["healthcheck"]["every"] = "10s"
    assert list(validator.iter_errors(broken))


def test_layout_follows_the_official_airflow_compose() -> None:
    data = compose.load_raw()
    assert set(data["services"]) >= REQUIRED_SERVICES
    assert "x-airflow-common" in data
    services = data["services"]
    for name in compose.AIRFLOW_SERVICES:
        assert services[name]["image"] == data["x-airflow-common"]["image"], name
    for name, service in services.items():
        if name != "airflow-init":
            assert "healthcheck" in service, f"{name} has no healthcheck"
    assert services["flower"]["profiles"] == ["flower"]
    env = compose.common_environment()
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/")
    assert json.loads(env["AIRFLOW_CONN_ERP_DEFAULT"])["extra"]["driver"] == "PostgreSQL Unicode"
    assert env["D365SYNC_STAGING_ROOT"].startswith("file://")
    assert "staging:/opt/d365sync/staging" in data["x-airflow-common"]["volumes"]


def test_compose_endpoints_are_the_ones_the_topology_test_localizes() -> None:
    services = compose.load()["services"]
    for name in ("postgres", "state-db", "erp-db"):
        endpoint = compose.COMPOSE_ENDPOINTS[name]
        env = services[name]["environment"]
        assert (env["POSTGRES_DB"], env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]) == (
            endpoint.database,
            endpoint.user,
            endpoint.password,
        ), name


@pytest.mark.parametrize("service", compose.AIRFLOW_SERVICES)
def test_every_airflow_service_gets_the_common_settings(service: str) -> None:
    common = compose.common_environment()
    env = compose.service_environment(service) or common
    assert set(env) - set(common) == SERVICE_EXTRAS.get(service, set())
    assert {k: env[k] for k in common} == common
    assert set(env) >= DEMO_NAMES


def test_airflow_init_registers_the_webhook_with_the_receivers_key() -> None:
    """The receiver (api-server) and the registration (airflow-init) read one key, a required
    secret; the webhook calls the api-server on the compose network unless the URL is set, and
    an empty URL leaves the registration to the operator."""
    services = compose.load()["services"]
    key = compose.SECRETS["D365SYNC_WEBHOOK_KEY"]
    assert services["airflow-apiserver"]["environment"]["D365SYNC_WEBHOOK_KEY"] == key
    init = services["airflow-init"]["environment"]
    assert init["D365SYNC_WEBHOOK_KEY"] == key
    assert init["D365SYNC_WEBHOOK_URL"] == "http://airflow-apiserver:8080/d365sync/events/dataverse"
    assert (
        compose.service_environment("airflow-init", {"D365SYNC_WEBHOOK_URL": ""})["D365SYNC_WEBHOOK_URL"]
        == ""
    )
    other = compose.service_environment("airflow-init", {"D365SYNC_WEBHOOK_URL": "https://ops.example.org/x"})
    assert other["D365SYNC_WEBHOOK_URL"] == "https://ops.example.org/x"
    script = compose.service_command("airflow-init")
    assert isinstance(script, list)
    lines = [line.strip() for line in script[1].splitlines()]
    register = lines.index('d365sync events register --url "${D365SYNC_WEBHOOK_URL}"')
    assert (
        lines[register - 1] == 'if [[ -n "${D365SYNC_WEBHOOK_URL}" ]]; then' and lines[register + 1] == "fi"
    )
    assert lines.index("d365sync deploy check-secrets") < register


def test_topology_test_uses_the_compose_settings(tmp_path: Path) -> None:
    """The environment the process-level test gives its processes == the compose environment,
    value by value, once endpoints (host, port, database, user, password), container paths and
    listen ports are masked."""
    local = localizer(tmp_path, "parity", 41001, 41002, 7)
    for service in ("airflow-worker", "airflow-init", "airflow-apiserver"):
        compose_env = compose.service_environment(service, DOTENV)
        local_env = local.environment(compose_env)
        assert set(local_env) == set(compose_env)
        compose_paths = {p: f"<path{i}>" for i, p in enumerate(compose.COMPOSE_PATHS)}
        local_paths = {local.paths[p]: f"<path{i}>" for i, p in enumerate(compose.COMPOSE_PATHS)}
        for key, value in compose_env.items():
            assert compose.mask(key, local_env[key], local_paths) == compose.mask(
                key, value, compose_paths
            ), key
        # and localization really moved every endpoint off the compose network
        for name in compose.COMPOSE_ENDPOINTS:
            assert f"//{name}:" not in json.dumps(local_env) and f"SERVER={name};" not in json.dumps(
                local_env
            )
    # the test's .env only tunes sizes, intervals, the pause default, the password and the seed size,
    # and sets the personal-data key (a deployment's own secret, empty in the compose defaults)
    assert set(DOTENV) <= {
        "D365SYNC_PII_KEYS",
        "AIRFLOW__CORE__PARALLELISM",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION",
        "_AIRFLOW_WWW_USER_PASSWORD",
        "DEMO_ROWS",
    }
