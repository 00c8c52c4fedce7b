"""Access control for every route of the app, found by enumerating ``app.routes``.

A route added later is covered the moment it exists: it must be an ``APIRoute`` guarded by the
app-level dependency, and it gets the same anonymous / viewer / operator / CSRF checks. A new
route with path parameters fails ``test_every_route_has_a_sample`` until a sample is added here.

Machine-to-machine routes (the webhook receiver) are guarded too, by their own key instead of a
user: no Airflow role opens them (their own tests are in ``test_events_receiver.py``), and a new
one fails ``test_machine_routes_are_the_known_ones`` until it is reviewed and listed here.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.routing import APIRoute

from d365sync.engine.causes import cause_of
from d365sync.ui.app import create_app, guard
from d365sync.ui.auth import MACHINE_AUTH
from d365sync.ui.queries import LetterGroup
from d365sync.ui.settings import UiSettings
from tests.ui.conftest import PREFIX, Env

# Sample path parameters and form bodies per route path (ids point at seeded rows).
PARAMS = {
    "review_id": "3",
    "dead_letter_id": "2",
    "name": "style.css",
    "path": "customers/index.html",
    "dag_id": "sync_customers",
    "entity": "customers",
    # the group of the seeded letter C011 (customers, load, "HTTP 400 invalid option set value 7")
    "action": "skip",
    "token": LetterGroup("customers", "load", cause_of("HTTP 400 invalid option set value 7").text).token,
}
FORMS: dict[str, dict[str, Any]] = {
    "/reviews/{review_id}/decide": {"choice": "erp", "comment": "ERP is right"},
    "/reviews/bulk": {"choice": "dynamics", "scope": "selected", "ids": ["4"], "comment": "bulk"},
    "/dead-letters/{dead_letter_id}/replay": {},
    "/dead-letters/{dead_letter_id}/skip": {"reason": "fixed by hand"},
    "/dead-letters/groups/{token}/{action}": {"reason": "fixed by hand"},
}


def _app_routes() -> list[APIRoute]:
    app = create_app(settings=UiSettings(state_url="sqlite:///:memory:"))
    return list(app.routes)  # type: ignore[arg-type]


ROUTES = _app_routes()
MACHINE_ROUTES = [route for route in ROUTES if hasattr(route.endpoint, MACHINE_AUTH)]
MACHINE_PATHS = {"/events/dataverse"}
USER_ROUTES = [route for route in ROUTES if route not in MACHINE_ROUTES]
CASES = [(route.path, method) for route in USER_ROUTES for method in sorted(route.methods or ())]
READS = [(p, m) for p, m in CASES if m == "GET"]
WRITES = [(p, m) for p, m in CASES if m != "GET"]


def _url(path: str) -> str:
    return PREFIX + re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PARAMS[m.group(1)], path)


def test_every_route_is_an_api_route_guarded_at_app_level() -> None:
    assert ROUTES, "the app has no routes"
    for route in ROUTES:
        assert isinstance(route, APIRoute), f"{route!r} is not an APIRoute: app-level dependencies skip it"
        assert route.dependant.dependencies[0].call is guard, f"{route.path} does not run the guard first"


def test_machine_routes_are_the_known_ones() -> None:
    assert {route.path for route in MACHINE_ROUTES} == MACHINE_PATHS


@pytest.mark.parametrize("via", ["cookie", "bearer"])
@pytest.mark.parametrize("role", [None, "viewer", "op", "admin"])
@pytest.mark.parametrize("path", sorted(MACHINE_PATHS))
def test_no_airflow_user_opens_a_machine_route(
    ui: Env, monkeypatch: pytest.MonkeyPatch, path: str, role: str | None, via: str
) -> None:
    monkeypatch.delenv("AIRFLOW_VAR_D365SYNC_WEBHOOK_KEY", raising=False)
    client = ui.as_role(role, via)
    response = client.post(PREFIX + path, json={}, headers={"x-csrf-token": ui.csrf() if role else ""})
    assert response.status_code == 503  # no webhook key configured: closed to everyone
    assert response.json() == {"detail": "webhook receiver not configured"}


def test_every_route_has_a_sample() -> None:
    for path, method in CASES:
        for name in re.findall(r"\{(\w+)", path):
            assert name in PARAMS, f"add a sample for {{{name}}} ({method} {path})"
        if method != "GET":
            assert path in FORMS, f"add a form sample for {method} {path}"
    assert READS and WRITES


@pytest.mark.parametrize(("path", "method"), READS)
def test_anonymous_read_redirects_to_login_or_401(ui: Env, path: str, method: str) -> None:
    response = ui.as_role(None).get(_url(path))
    if path.startswith("/api/"):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    else:
        assert response.status_code == 303
        assert response.headers["location"].startswith("/auth/login?next=")


@pytest.mark.parametrize(("path", "method"), WRITES)
def test_anonymous_write_is_401(ui: Env, path: str, method: str) -> None:
    response = ui.as_role(None).request(method, _url(path), data=FORMS[path])
    assert response.status_code == 401


@pytest.mark.parametrize("role", ["viewer", "op"])
@pytest.mark.parametrize(("path", "method"), READS)
def test_readers_can_read(ui: Env, path: str, method: str, role: str) -> None:
    response = ui.as_role(role).get(_url(path))
    assert response.status_code in (200, 303), response.text[:500]


@pytest.mark.parametrize("role", ["viewer", "user"])
@pytest.mark.parametrize(("path", "method"), WRITES)
def test_viewer_and_user_cannot_act(ui: Env, path: str, method: str, role: str) -> None:
    client = ui.as_role(role)
    form = {**FORMS[path], "csrf_token": ui.csrf()}
    response = client.request(method, _url(path), data=form)
    assert response.status_code == 403, response.text[:500]
    assert "may read but not act" in response.json()["detail"]


@pytest.mark.parametrize("role", ["op", "admin"])
@pytest.mark.parametrize(("path", "method"), WRITES)
def test_operator_can_act(ui: Env, path: str, method: str, role: str) -> None:
    client = ui.as_role(role)
    form = {**FORMS[path], "csrf_token": ui.csrf()}
    response = client.request(method, _url(path), data=form)
    assert response.status_code == 303, response.text[:500]
    assert "error=" not in response.headers["location"], response.headers["location"]


@pytest.mark.parametrize(("path", "method"), WRITES)
def test_write_without_csrf_token_is_refused(ui: Env, path: str, method: str) -> None:
    client = ui.as_role("op")
    ui.csrf()  # the browser has the nonce cookie, but the form lacks the token
    response = client.request(method, _url(path), data=FORMS[path])
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]


@pytest.mark.parametrize(("path", "method"), WRITES)
def test_csrf_token_of_another_user_or_session_is_refused(ui: Env, path: str, method: str) -> None:
    ui.as_role("admin")
    admin_token = ui.csrf()
    client = ui.as_role("op")
    response = client.request(method, _url(path), data={**FORMS[path], "csrf_token": admin_token})
    assert response.status_code == 403  # tied to the user (and the nonce cookie was cleared too)


@pytest.mark.parametrize(("path", "method"), WRITES)
def test_bearer_write_needs_no_csrf_token(ui: Env, path: str, method: str) -> None:
    response = ui.as_role("op", via="bearer").request(method, _url(path), data=FORMS[path])
    assert response.status_code == 303


def test_invalid_expired_and_revoked_tokens_are_rejected(ui: Env, auth_manager: Any) -> None:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    client = ui.as_role(None)
    client.headers["authorization"] = "Bearer not-a-jwt"
    assert client.get(f"{PREFIX}/api/health").status_code == 401
    expired = auth_manager.generate_jwt(
        SimpleAuthManagerUser(username="old", role="admin"), expiration_time_in_seconds=-3600
    )
    client.headers["authorization"] = f"Bearer {expired}"
    assert client.get(f"{PREFIX}/api/health").status_code == 401
    revoked = auth_manager.generate_jwt(SimpleAuthManagerUser(username="gone", role="admin"))
    client.headers["authorization"] = f"Bearer {revoked}"
    assert client.get(f"{PREFIX}/api/health").status_code == 200
    auth_manager.revoke_token(revoked)  # what Airflow's logout does
    assert client.get(f"{PREFIX}/api/health").status_code == 401


def test_token_signed_with_another_secret_is_rejected(ui: Env) -> None:
    import jwt

    forged = jwt.encode({"sub": "mallory", "role": "admin", "aud": "apache-airflow"}, "x" * 64, "HS512")
    client = ui.as_role(None)
    client.headers["authorization"] = f"Bearer {forged}"
    assert client.get(f"{PREFIX}/api/health").status_code == 401


def test_role_without_access_is_forbidden(ui: Env, auth_manager: Any) -> None:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    nobody = auth_manager.generate_jwt(SimpleAuthManagerUser(username="nobody", role=None))
    client = ui.as_role(None)
    client.headers["authorization"] = f"Bearer {nobody}"
    assert client.get(f"{PREFIX}/api/health").status_code == 403
