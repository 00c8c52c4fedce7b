"""``docker-compose.yaml`` has no usable default secret and publishes nothing beyond loopback.

Issue 11, finding 1: the file used to fall back to a published JWT secret and API secret key, the
admin password ``admin`` and an empty Fernet key, and published its ports on every interface, so a
token forged with the default secret was accepted as admin. Now Compose refuses to interpolate
without each secret, ``airflow-init`` refuses weak or published ones before it touches anything,
and ``d365sync deploy generate-env`` writes a ``.env`` with fresh ones.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from d365sync import deploy
from tests.deploy import compose

EXAMPLE = compose.REPO / ".env.example"
FORMER_DEFAULTS = {
    "AIRFLOW__API_AUTH__JWT_SECRET": "d365sync-change-me-jwt-secret-32-bytes",
    "AIRFLOW__API__SECRET_KEY": "d365sync-change-me-api-secret-key",
    "AIRFLOW__CORE__FERNET_KEY": "",
    "_AIRFLOW_WWW_USER_PASSWORD": "admin",
    "POSTGRES_PASSWORD": "airflow",
    "STATE_DB_PASSWORD": "d365sync",
    "ERP_DB_PASSWORD": "erp",
    "DATAVERSE_CLIENT_SECRET": "sandbox-secret",
}


@pytest.mark.parametrize("name", [s.name for s in deploy.SECRETS if s.required])
def test_compose_refuses_to_start_without_each_secret(name: str) -> None:
    others = {k: v for k, v in compose.SECRETS.items() if k != name}
    with pytest.raises(ValueError, match=f"{name} is required: run `d365sync deploy generate-env`"):
        compose.load(secrets=others)


def test_the_former_defaults_appear_nowhere_in_the_deployment_files() -> None:
    texts = {p.name: p.read_text() for p in (compose.COMPOSE_FILE, EXAMPLE)}
    for name, text in texts.items():
        for value in ("d365sync-change-me", "sandbox-secret", ":-admin}", "FERNET_KEY:-}"):
            assert value not in text, f"{name} still holds {value!r}"


def test_published_ports_are_bound_to_loopback_unless_configured() -> None:
    published = {
        name: service["ports"] for name, service in compose.load()["services"].items() if service.get("ports")
    }
    assert set(published) >= {"airflow-apiserver", "dataverse", "flower"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    opened = compose.load({"D365SYNC_BIND_ADDRESS": "0.0.0.0"})["services"]["airflow-apiserver"]["ports"]
    assert opened == ["0.0.0.0:8080:8080"]


def test_airflow_init_checks_the_secrets_before_anything_else() -> None:
    script = compose.service_command("airflow-init")
    assert isinstance(script, list)
    commands = [line.strip() for line in script[1].splitlines() if line.strip()]
    assert commands[:2] == ["set -euo pipefail", "d365sync deploy check-secrets"]


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    names = {s.name for s in deploy.SECRETS}  # none of them inherited from this process
    clean = {k: v for k, v in os.environ.items() if k not in names}
    return subprocess.run(
        [sys.executable, "-m", "d365sync.cli", "deploy", "check-secrets"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_secrets_refuses_the_former_defaults_without_echoing_them() -> None:
    done = _check(FORMER_DEFAULTS)
    assert done.returncode == 2, done.stdout + done.stderr
    for name in FORMER_DEFAULTS:
        assert name in done.stderr
    assert "published default" in done.stderr and "not set" in done.stderr
    for value in FORMER_DEFAULTS.values():
        if len(value) > 8:
            assert value not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("AIRFLOW__API_AUTH__JWT_SECRET", "short-but-random-x9", "shorter than 32"),
        ("AIRFLOW__API_AUTH__JWT_SECRET", "please-change-me-please-change-me-1234", "placeholder"),
        ("AIRFLOW__CORE__FERNET_KEY", "bm90LWEta2V5", "not a Fernet key"),
        ("D365SYNC_WEBHOOK_KEY", "a-15-chars-key!", "a key shorter than 16"),
        # a rotation: each key must be usable, the receiver ignores short ones
        ("D365SYNC_WEBHOOK_KEY", "0123456789abcdef-new-key,short", "a key shorter than 16"),
        ("D365SYNC_WEBHOOK_KEY", "0123456789abcdef-new-key,change-me-change-me", "placeholder"),
    ],
)
def test_check_secrets_names_the_weakness(name: str, value: str, why: str) -> None:
    found = deploy.problems({**deploy.generate(), name: value})
    assert len(found) == 1 and found[0].startswith(name) and why in found[0], found


def test_a_webhook_key_rotation_passes_when_both_keys_are_usable() -> None:
    rotation = "0123456789abcdef-new-key,0123456789abcdef-old-key"
    assert deploy.problems({**deploy.generate(), "D365SYNC_WEBHOOK_KEY": rotation}) == []
    found = deploy.problems({**deploy.generate(), "D365SYNC_WEBHOOK_KEY": ""})
    assert found == [
        "D365SYNC_WEBHOOK_KEY (the key Dataverse's webhook presents to the event receiver): not set"
    ]


def test_generated_env_file_starts_the_stack(tmp_path: Path) -> None:
    out = tmp_path / ".env"
    args = ["deploy", "generate-env", "--example", str(EXAMPLE), "--output", str(out)]
    assert subprocess.run([sys.executable, "-m", "d365sync.cli", *args], timeout=120).returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    lines = [line for line in out.read_text().splitlines() if "=" in line and not line.startswith("#")]
    dotenv = dict(line.split("=", 1) for line in lines)
    assert deploy.problems(dotenv) == []
    assert _check({s.name: dotenv[s.name] for s in deploy.SECRETS}).returncode == 0
    env = compose.load(dotenv, secrets={})  # the .env alone is enough to interpolate the file
    assert env["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == dotenv["POSTGRES_PASSWORD"]
    # two runs, two different secrets; an existing .env is never overwritten silently
    again = subprocess.run([sys.executable, "-m", "d365sync.cli", *args], capture_output=True, text=True)
    assert again.returncode == 2 and "not overwritten" in again.stderr
    assert deploy.generate()["AIRFLOW__API_AUTH__JWT_SECRET"] != dotenv["AIRFLOW__API_AUTH__JWT_SECRET"]
