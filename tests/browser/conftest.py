"""Fixtures for the browser tests: a real ``airflow standalone`` and headless Debian Chromium.

The server (module scope) runs in a temp ``AIRFLOW_HOME`` with the repo's ``dags/`` and
``plugins/``, examples off, ``parallelism=2``, DAGs paused at creation (a triggered run stays
queued, nothing syncs behind the test's back), SimpleAuthManager users ``alice:op`` and
``victor:viewer`` with a passwords file the test writes, and free ports for the API server and
the two log servers (other sessions on the machine may run Airflow too). It is started in its own
process group and stopped by signalling that group, so the scheduler, DAG processor, triggerer
and API server children go with it. The operations UI reads a SQLite state store seeded with
the UI tests' conflicts and dead letters (``tests.ui.conftest.seed``).

The browser is Debian's ``/usr/bin/chromium`` driven by Selenium through Debian's
``/usr/bin/chromedriver`` (an explicit ``Service`` path, ``SE_OFFLINE=true``: Selenium Manager
never downloads anything), with the flags this machine needs (no sandbox as root, no background
networking: the network is closed). Without Chromium the tests skip, except with ``CI=true``,
where they fail: ``make test`` installs it (``scripts/install-system-deps.sh``).

Artifacts: screenshots of every step, and of the page on a failure, plus the standalone log, go
to ``var/test-artifacts/browser/`` (gitignored; ``D365SYNC_BROWSER_ARTIFACTS`` overrides).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from d365sync.engine.state import StateStore
from tests.conftest import IN_CI
from tests.dags.conftest import BIN, REPO, WARM_EXECUTOR, airflow_base_env
from tests.ui.conftest import seed

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("D365SYNC_BROWSER_ARTIFACTS") or REPO / "var" / "test-artifacts" / "browser")
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # the machine's network is closed: no update/sync pings
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,1000",
)
USERS = {"alice": "op", "victor": "viewer"}
STARTUP_TIMEOUT = 150.0  # standalone on a loaded 2-core machine: ~30 s usually
WAIT = 30.0  # explicit browser waits
REPLAY_DAG = "replay_dead_letters"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_chromium() -> None:
    """Skip (or, with ``CI=true``, fail) when Debian's chromium or chromedriver is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    message = f"{' and '.join(missing)} not installed (Debian packages chromium, chromium-driver)"
    if IN_CI:
        pytest.fail(f"{message}; CI=true requires them (make system-deps installs them)", pytrace=False)
    pytest.skip(f"{message}; run scripts/install-system-deps.sh as root, or set CI=true to fail instead")


@pytest.fixture(autouse=True)
def _needs_chromium(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("browser") is not None:
        require_chromium()


@dataclass
class AirflowServer:
    """A running ``airflow standalone``: its URL, users and state store."""

    url: str
    home: Path
    passwords: dict[str, str]
    store: StateStore
    log: Path

    def token(self, user: str) -> str:
        """A JWT for ``user`` from SimpleAuthManager's ``POST /auth/token``."""
        body = {"username": user, "password": self.passwords[user]}
        response = httpx.post(f"{self.url}/auth/token", json=body, timeout=30)
        assert response.status_code in (200, 201), response.text
        return str(response.json()["access_token"])

    def api(self, user: str, path: str) -> Any:
        """``GET /api/v2/<path>`` as ``user``; the JSON answer."""
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        response = httpx.get(f"{self.url}/api/v2/{path}", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _env(
    home: Path, port: int, passwords: Path, state_url: str, users: Mapping[str, str] = USERS
) -> dict[str, str]:
    env = airflow_base_env(home)
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # standalone spawns `airflow <cmd>`
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__EXECUTOR": WARM_EXECUTOR,
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in users.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
            "D365SYNC_UI_STATE_URL": state_url,
            "NO_COLOR": "1",
        }
    )
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole process group, wait for it to empty, then SIGKILL what is left."""

    def group_alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    if not group_alive():
        return
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_alive():
            return
        time.sleep(0.2)
    if group_alive():
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _healthy(url: str) -> bool:
    try:
        health = httpx.get(f"{url}/api/v2/monitor/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
    return all((health.get(p) or {}).get("status") == "healthy" for p in parts)


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"airflow standalone exited {proc.returncode}\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready after {STARTUP_TIMEOUT:.0f} s\n{log.read_text()[-6000:]}")
        time.sleep(0.5)  # polling interval of a readiness probe, not synchronisation


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """The screenshot folder, emptied of the previous run's files once per session."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.iterdir():
        if old.is_file() and old.suffix in {".png", ".html", ".log"}:
            old.unlink()
    return ARTIFACTS


@contextmanager
def standalone(
    home: Path,
    store: tuple[StateStore, str],
    artifacts: Path,
    extra_env: dict[str, str] | None = None,
    name: str = "",
    users: Mapping[str, str] = USERS,
) -> Iterator[AirflowServer]:
    """``airflow standalone`` on a free port, its UI reading ``store`` (store, URL); stopped by group.
    ``users`` (name: role) must include ``alice``, an operator."""
    passwords = {user: secrets.token_urlsafe(12) for user in users}
    passwords_file = home / "passwords.json"
    passwords_file.write_text(json.dumps(passwords))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = home / "standalone.log"
    env = {**_env(home, port, passwords_file, store[1], users), **(extra_env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "airflow"), "standalone"],
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown signals the group
        )
    server = AirflowServer(url, home, passwords, store[0], log)
    try:
        _wait_until(lambda: _healthy(url), proc, log, "/api/v2/monitor/health")
        # The replay button needs the DAG in the metadata DB: wait for the DAG processor's first pass.
        headers = {"Authorization": f"Bearer {server.token('alice')}"}

        def replay_dag_known() -> bool:
            answer = httpx.get(f"{url}/api/v2/dags/{REPLAY_DAG}", headers=headers, timeout=10)
            return answer.status_code == 200

        _wait_until(replay_dag_known, proc, log, f"DAG {REPLAY_DAG}")
        yield server
    finally:
        _stop(proc)
        shutil.copyfile(log, artifacts / f"airflow-standalone{name}.log")


@pytest.fixture(scope="module")
def airflow_server(tmp_path_factory: pytest.TempPathFactory, artifacts: Path) -> Iterator[AirflowServer]:
    """``airflow standalone`` with a state store seeded with the UI tests' conflicts and dead letters."""
    require_chromium()  # no point starting Airflow for tests that will skip
    home = tmp_path_factory.mktemp("airflow-standalone")
    state_url = f"sqlite:///{home / 'state.db'}"
    store = StateStore.open(state_url)
    seed(store)
    try:
        with standalone(home, (store, state_url), artifacts) as server:
            yield server
    finally:
        store.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Keep each phase's report on the item, so the browser fixture can screenshot a failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@dataclass
class Browser:
    """A Selenium Chrome session plus the test's screenshot helper."""

    driver: Any
    artifacts: Path
    prefix: str

    def shot(self, name: str) -> Path:
        """Save a screenshot of the whole viewport (the Airflow UI with the embedded page)."""
        path = self.artifacts / f"{self.prefix}-{name}.png"
        assert self.driver.save_screenshot(str(path)), f"screenshot {path} not saved"
        return path


@pytest.fixture
def browser(
    request: pytest.FixtureRequest, tmp_path: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Browser]:
    """Headless Debian Chromium with a fresh profile; screenshot + page source on failure."""
    require_chromium()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    prefix = re.sub(r"^test_", "", request.node.name)
    try:
        yield Browser(driver, artifacts, prefix)
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            driver.switch_to.default_content()
            driver.save_screenshot(str(artifacts / f"{prefix}-FAILED.png"))
            (artifacts / f"{prefix}-FAILED.html").write_text(driver.page_source)
        driver.quit()
