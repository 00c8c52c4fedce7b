"""Fixtures for the UI tests: Airflow's own auth manager and JWTs, a seeded state store, the app
mounted under ``/d365sync`` as the API server mounts it, and a fake Airflow REST API on loopback.

Tokens are real: signed by Airflow's ``JWTGenerator`` (through ``SimpleAuthManager.generate_jwt``)
with a test secret, and validated by the same auth manager the API server would use, including
its revoked-token check (which reads the metadata DB: a temporary SQLite file holding just the
``revoked_token`` table, bound to ``airflow.settings.Session`` for the session).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from d365sync.engine.state import AuditEntry, Failure, ReviewItem, StateStore
from d365sync.ui.airflow_api import AirflowApi
from d365sync.ui.app import create_app
from d365sync.ui.settings import UiSettings

PREFIX = "/d365sync"
SIMPLE = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
EMAIL, PHONE = "jane.doe@example.com", "+44 20 7946 0958"
ERP_EMAIL = "j.doe@contoso.org"
PII = (EMAIL, PHONE, ERP_EMAIL, "7946 0958", "jane.doe")


@pytest.fixture(scope="session")
def auth_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Airflow's SimpleAuthManager with a known JWT secret and a revoked-token table."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import scoped_session, sessionmaker

    mp = pytest.MonkeyPatch()
    mp.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "d365sync-ui-test-secret-" + "0" * 48)
    mp.setenv("AIRFLOW__CORE__AUTH_MANAGER", SIMPLE)
    mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    from airflow import settings
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.models.revoked_token import RevokedToken

    engine = create_engine(f"sqlite:///{tmp_path_factory.mktemp('airflow') / 'airflow.db'}")
    RevokedToken.__table__.create(engine)
    mp.setattr(settings, "Session", scoped_session(sessionmaker(bind=engine, expire_on_commit=False)))
    try:
        yield create_auth_manager()
    finally:
        settings.Session.remove()
        mp.undo()
        engine.dispose()


@pytest.fixture(scope="session")
def tokens(auth_manager: Any) -> dict[str, str]:
    """One real Airflow JWT per SimpleAuthManager role."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    names = {"viewer": "vera", "user": "ursula", "op": "oscar", "admin": "ada"}
    return {
        role: auth_manager.generate_jwt(SimpleAuthManagerUser(username=n, role=role))
        for role, n in names.items()
    }


@dataclass
class FakeAirflowApi:
    """A loopback HTTP server standing in for ``POST /api/v2/dags/{dag_id}/dagRuns``.

    It answers like Airflow (``dag_id``, ``dag_run_id``, ``state``) with ``status``; ``answer``
    replaces that body with raw bytes (an unexpected answer). Every request is recorded.
    """

    url: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    answer: bytes | None = None


def _handler(api: FakeAirflowApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = raw.decode(errors="replace")
            api.calls.append({"path": self.path, "auth": self.headers.get("authorization"), "body": body})
            dag_id = self.path.split("/")[4] if self.path.count("/") >= 5 else ""
            answer = {"dag_id": dag_id, "dag_run_id": f"manual__{len(api.calls)}", "state": "queued"}
            if api.status >= 300:
                answer = {"detail": "Forbidden"}
            data = json.dumps(answer).encode() if api.answer is None else api.answer
            self.send_response(api.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_PATCH = do_DELETE = do_POST  # a recorder: whatever arrives is kept

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def fake_airflow_api() -> Iterator[FakeAirflowApi]:
    """A :class:`FakeAirflowApi` on a free loopback port, for the duration of the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    api = FakeAirflowApi(f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def airflow_api() -> Iterator[FakeAirflowApi]:
    with fake_airflow_api() as api:
        yield api


def seed(store: StateStore, now: datetime | None = None) -> None:
    """Reviews, dead letters, audit rows and runs with e-mails and phones in them."""
    now = now or datetime.now(UTC)
    store.open_reviews(
        "customers",
        "run-1",
        [
            ReviewItem(
                "C001", "emailaddress1", "old@example.com", EMAIL, ERP_EMAIL, f"both changed: {EMAIL}"
            ),
            ReviewItem("C002", "telephone1", "+44 20 0000 0000", PHONE, "+44 20 7946 0000", "both changed"),
            ReviewItem("C003", "creditlimit", 100, 150, 175, "both changed"),
        ],
    )
    store.open_reviews(
        "orders", "run-1", [ReviewItem("O001", "status", "new", "open", "held", "both changed")]
    )
    store.dead_letter(
        "customers",
        "load",
        "run-1",
        [
            Failure(
                "C010", f"duplicate e-mail {EMAIL} (phone {PHONE})", {"emailaddress1": EMAIL, "phone": PHONE}
            ),
            Failure("C011", "HTTP 400 invalid option set value 7", {"statuscode": 7}),
        ],
    )
    entry = AuditEntry(
        "C001", "erp", "update", ["EMAIL", "PHONE"], {"EMAIL": ERP_EMAIL}, {"EMAIL": EMAIL, "PHONE": PHONE}
    )
    store.audit("run-1", "customers", [entry], actor="sync")
    store.start_run("run-1", "customers", now - timedelta(hours=1))
    store.finish_run(
        "run-1", "customers", "success", {"records": 10, "extracted_dynamics": 6, "extracted_erp": 4}
    )


@dataclass
class Env:
    store: StateStore
    client: TestClient
    app: FastAPI
    api: FakeAirflowApi
    tokens: dict[str, str]
    docs: Path

    def as_role(self, role: str | None, via: str = "cookie") -> TestClient:
        """The client authenticated as ``role`` (by cookie or Bearer header), or anonymous."""
        self.client.cookies.clear()
        self.client.headers.pop("authorization", None)
        if role is not None and via == "cookie":
            self.client.cookies.set("_token", self.tokens[role])
        elif role is not None:
            self.client.headers["authorization"] = f"Bearer {self.tokens[role]}"
        return self.client

    def csrf(self) -> str:
        """Load a page (which sets the CSRF cookie) and read the form token from it."""
        page = self.client.get(f"{PREFIX}/reviews")
        assert page.status_code == 200, page.text
        marker = '<meta name="csrf-token" content="'
        start = page.text.index(marker) + len(marker)
        return page.text[start : page.text.index('"', start)]


@pytest.fixture
def ui(tmp_path: Path, tokens: dict[str, str], airflow_api: FakeAirflowApi) -> Iterator[Env]:
    store = StateStore.open(f"sqlite:///{tmp_path / 'state.db'}")
    seed(store)
    docs = tmp_path / "docs" / "customers"
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html>Data Docs</html>")
    settings = UiSettings(state_url=f"sqlite:///{tmp_path / 'state.db'}", data_docs_dir=tmp_path / "docs")
    app = create_app(settings=settings, airflow_api=AirflowApi(airflow_api.url))
    outer = FastAPI()
    outer.mount(PREFIX, app)
    with TestClient(outer, follow_redirects=False) as client:
        yield Env(store, client, app, airflow_api, tokens, tmp_path / "docs")
    app.state.ctx.close()
    store.close()
