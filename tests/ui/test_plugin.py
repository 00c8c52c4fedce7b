"""The plugin as Airflow loads it: the plugins manager finds the app and the views, and the real
Airflow API app mounts it, with its own middlewares, and lets only a logged-in user through.

Both run in a child process: Airflow reads ``AIRFLOW_HOME`` and the plugins folder when it is
first imported, and other tests import it earlier with other settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.dags.conftest import BIN, airflow_base_env

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("pandas", "great_expectations", "pyarrow")

LOAD = """
import json, sys
from airflow import plugins_manager
before = {m for m in sys.modules if m.split(".")[0] in HEAVY}
apps, middlewares = plugins_manager.get_fastapi_plugins()
views, react = plugins_manager._get_ui_plugins()
after = {m for m in sys.modules if m.split(".")[0] in HEAVY}
print(json.dumps({
    "apps": [{"prefix": a["url_prefix"], "name": a["name"], "type": type(a["app"]).__name__} for a in apps],
    "views": views,
    "errors": plugins_manager.get_import_errors(),
    "heavy_before": sorted(before),
    "heavy_after": sorted(after),
}))
"""

SERVE = """
import json
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import create_app, get_auth_manager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

app = create_app()
client = TestClient(app, follow_redirects=False)
out = {"anonymous": client.get("/d365sync/reviews").status_code,
       "location": client.get("/d365sync/reviews").headers.get("location")}
token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="vera", role="viewer"))
client.cookies.set("_token", token)
page = client.get("/d365sync/health")
out |= {"viewer": page.status_code, "svg": page.text.count("<svg"),
        "viewer_post": client.post("/d365sync/dead-letters/1/skip", data={"reason": "x"}).status_code}
plugins = client.get("/api/v2/plugins", headers={"Authorization": f"Bearer {token}"}).json()
out["listed"] = [p["name"] for p in plugins["plugins"]]
print(json.dumps(out))
"""


def _child(code: str, env: dict[str, str], timeout: float = 300) -> dict[str, Any]:
    script = f"HEAVY = {HEAVY!r}\n" + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _env(home: Path) -> dict[str, str]:
    env = airflow_base_env(home)
    env["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
    env["D365SYNC_UI_STATE_URL"] = f"sqlite:///{home / 'state.db'}"
    env["AIRFLOW__API_AUTH__JWT_SECRET"] = "d365sync-plugin-test-" + "1" * 48
    env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = "vera:viewer,oscar:op"
    env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = str(home / "passwords.json")
    return env


def test_plugins_manager_loads_the_app_and_views_without_heavy_imports(tmp_path: Path) -> None:
    found = _child(LOAD, _env(tmp_path))
    assert found["errors"] == {}
    assert found["apps"] == [{"prefix": "/d365sync", "name": "D365 Sync operations", "type": "FastAPI"}]
    (nav,) = [v for v in found["views"] if v["destination"] == "nav"]
    assert nav["name"] == "D365 Sync" and nav["nav_top_level"] is True, "a top-level entry, not under Plugins"
    assert nav["href"] == "/d365sync/" and nav["url_route"] == "d365sync"
    assert (
        nav["icon"] == "/d365sync/static/icon.svg"
        and nav["icon_dark_mode"] == "/d365sync/static/icon-dark.svg"
    )
    (per_dag,) = [v for v in found["views"] if v["destination"] == "dag"]
    assert per_dag["href"] == "/d365sync/dag/{DAG_ID}" and per_dag["url_route"] == "d365sync-entity"
    assert found["heavy_after"] == found["heavy_before"] == []


@pytest.mark.slow
def test_airflow_api_server_app_mounts_the_plugin_behind_its_auth(tmp_path: Path) -> None:
    env = _env(tmp_path)
    migrated = subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300
    )
    assert migrated.returncode == 0, migrated.stderr[-4000:]
    out = _child(SERVE, env)
    assert out["anonymous"] == 303 and out["location"].startswith("/auth/login")
    assert out["viewer"] == 200 and out["svg"] >= 8
    assert out["viewer_post"] == 403
    assert "d365sync" in out["listed"]
