"""``docker-compose.yaml`` as data: interpolation, the Airflow services' environment, and its
translation to processes on loopback.

The process-level test (``test_celery_topology.py``) derives every setting from the compose
file's ``x-airflow-common`` environment through :func:`localize`, which only swaps the compose
network's endpoints (service host, port, database, user, password), container paths and listen
ports for local ones. ``test_compose_file.py`` checks with :func:`mask` that nothing else differs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from d365sync import deploy

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"

# The Airflow services built from x-airflow-common (flower is optional, under a profile).
AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
    "flower",
)
# Settings that are a listen port of the process that reads them (free ports on loopback).
PORT_KEYS = (
    "AIRFLOW__API__PORT",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT",
    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT",
    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT",
)
_VAR = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose-style ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``, ``$NAME`` and ``$$``."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("plain")
        op, default = match.group("op"), match.group("default") or ""
        value = env.get(name)
        if op == ":-":
            return value if value else default
        if op == "-":
            return value if value is not None else default
        if op in (":?", "?") and not value:
            raise ValueError(f"{name} is required: {default}")
        return value or ""

    return _VAR.sub(one, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_raw() -> dict[str, Any]:
    """The compose file as YAML data (anchors and ``<<`` merges resolved, no interpolation)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


# What `d365sync deploy generate-env` puts in a .env: the compose file has no default for a secret.
SECRETS: dict[str, str] = deploy.generate()


def load(env: Mapping[str, str] | None = None, secrets: Mapping[str, str] = SECRETS) -> dict[str, Any]:
    """The compose file interpolated with ``env`` (an ``.env`` file's content; defaults otherwise)
    on top of generated ``secrets``."""
    return _interpolate_tree(load_raw(), {**secrets, **(env or {})})


def _as_strings(environment: Any) -> dict[str, str]:
    if isinstance(environment, list):
        pairs = (item.split("=", 1) for item in environment)
        return {k: v for k, v in pairs}
    return {str(k): "" if v is None else str(v) for k, v in (environment or {}).items()}


def common_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``x-airflow-common.environment``, interpolated."""
    return _as_strings(load(env)["x-airflow-common"]["environment"])


def service_environment(service: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    return _as_strings(load(env)["services"][service].get("environment"))


def service_command(service: str, env: Mapping[str, str] | None = None) -> list[str] | str:
    return load(env)["services"][service]["command"]


@dataclass(frozen=True)
class Endpoint:
    """Where a compose service is reached: inside the compose network, or on loopback."""

    host: str
    port: int
    database: str | None = None
    user: str | None = None
    password: str | None = None


# The compose network as the file defines it (checked against the file by test_compose_file.py).
COMPOSE_ENDPOINTS: dict[str, Endpoint] = {
    "postgres": Endpoint("postgres", 5432, "airflow", "airflow", SECRETS["POSTGRES_PASSWORD"]),
    "state-db": Endpoint("state-db", 5432, "sync_state", "d365sync", SECRETS["STATE_DB_PASSWORD"]),
    "erp-db": Endpoint("erp-db", 5432, "erp", "erp", SECRETS["ERP_DB_PASSWORD"]),
    "redis": Endpoint("redis", 6379, "0"),
    "dataverse": Endpoint("dataverse", 8765),
    "airflow-apiserver": Endpoint("airflow-apiserver", 8080),
}
COMPOSE_PATHS = ("/opt/d365sync/staging", "/opt/d365sync", "/opt/airflow")

_URL = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?:(?P<userinfo>[^@/\s\"']*)@)?(?P<host>[A-Za-z0-9.-]+)"
    r"(?::(?P<port>\d+))?(?P<path>/[^\s\"'?;]*)?"
)
_ODBC = re.compile(
    r"SERVER=(?P<host>[^;]+);PORT=(?P<port>\d+);DATABASE=(?P<db>[^;]*);UID=(?P<user>[^;]*);PWD=(?P<pw>[^;]*);"
)


@dataclass
class Localizer:
    """Maps compose endpoints, container paths and listen ports to local ones."""

    endpoints: dict[str, Endpoint]
    paths: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)

    def _endpoint(self, host: str, port: str | int | None) -> Endpoint | None:
        compose = COMPOSE_ENDPOINTS.get(host)
        if compose is None or (port is not None and int(port) != compose.port):
            return None
        return self.endpoints[host]

    def _url(self, match: re.Match[str]) -> str:
        local = self._endpoint(match["host"], match["port"])
        if local is None:
            return match.group(0)
        userinfo = ""
        if match["userinfo"] is not None:
            userinfo = (local.user or "") + (f":{local.password}" if local.password else "") + "@"
        path = match["path"] or ""
        if local.database is not None and path:
            path = "/" + local.database
        return f"{match['scheme']}://{userinfo}{local.host}:{local.port}{path}"

    def _odbc(self, match: re.Match[str]) -> str:
        local = self._endpoint(match["host"], match["port"])
        if local is None:
            return match.group(0)
        return (
            f"SERVER={local.host};PORT={local.port};DATABASE={local.database};"
            f"UID={local.user or ''};PWD={local.password or ''};"
        )

    def text(self, value: str) -> str:
        value = _ODBC.sub(self._odbc, _URL.sub(self._url, value))
        for compose_path in COMPOSE_PATHS:
            value = value.replace(compose_path, self.paths[compose_path])
        return value

    def _connection(self, conn: dict[str, Any]) -> dict[str, Any]:
        local = self._endpoint(str(conn.get("host", "")), conn.get("port"))
        out = {k: self._tree(v) for k, v in conn.items()}
        if local is not None:
            out.update(host=local.host, port=local.port, schema=local.database, login=local.user)
            out["password"] = local.password or ""
        return out

    def _tree(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.text(node)
        if isinstance(node, dict):
            return {k: self._tree(v) for k, v in node.items()}
        return node

    def value(self, key: str, value: str) -> str:
        if key in PORT_KEYS:
            return str(self.ports[key])
        if value.startswith("{"):
            return json.dumps(self._connection(json.loads(value)))
        return self.text(value)

    def environment(self, compose_env: Mapping[str, str]) -> dict[str, str]:
        return {key: self.value(key, value) for key, value in compose_env.items()}


def mask(key: str, value: str, paths: Mapping[str, str]) -> str:
    """A value with endpoints, ports and deployment paths blanked: equal masks = same setting."""
    if key in PORT_KEYS:
        return "<port>"
    for local, placeholder in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        value = value.replace(local, placeholder)
    if value.startswith("{"):
        conn = json.loads(value)
        for name in ("host", "port", "schema", "login", "password"):
            if name in conn and not str(conn[name]).startswith("http"):
                conn[name] = f"<{name}>"
        value = json.dumps(conn, sort_keys=True)

    def endpoint(m: re.Match[str]) -> str:
        path = "/<db>" if m["path"] and m["scheme"] != "http" else m["path"] or ""
        return f"{m['scheme']}://<endpoint>{path}"

    value = _URL.sub(endpoint, value)
    return _ODBC.sub("SERVER=<endpoint>;", value)
