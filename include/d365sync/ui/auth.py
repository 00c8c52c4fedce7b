"""Who is calling, and may they act: Airflow's own JWT, the auth manager's roles, CSRF.

Why this module: Airflow mounts plugin apps without any authentication. Every request to the
UI is therefore checked here, by one dependency applied to the whole app (see ``app.py``), in
the same way Airflow's API checks its own requests
(``airflow.api_fastapi.core_api.security.get_user``): the token is the ``Authorization:
Bearer`` header, else the ``_token`` cookie the Airflow UI sets at login, and the auth manager
validates it (signature, audience, expiry, revocation) and turns it into a user.

Roles. The UI has two abilities: *read* and *act* (decide reviews, replay or skip dead
letters), plus *reveal* (see unmasked e-mails and phones), which goes with *act*: whoever
decides a conflict must see what they choose between. The role map (SimpleAuthManager roles,
FAB roles, ``D365SYNC_UI_ROLE_MAP``) is :mod:`d365sync.roles`, shared with the operations DAGs,
which apply the same roles to the user who triggered their run. Other auth managers: *read* if
``is_authorized_view(WEBSITE)``, *act* if the user may trigger the replay DAG
(``is_authorized_dag`` POST RUN).

CSRF. A browser sends the ``_token`` cookie with any request, including one forged by another
site, so a write authenticated by the cookie must also carry a token the forger cannot know:
a signed double-submit token. A random nonce lives in the ``d365sync_csrf`` cookie (SameSite
strict); forms carry ``HMAC(secret, nonce | user)``. A write authenticated by a Bearer header
needs no token: no browser attaches that header on its own.

Machines. A route marked :func:`machine_to_machine` (the Dataverse webhook receiver) is called
by a system, not a person: the guard authenticates it with the route's own authenticator (a
shared key) *instead of* the Airflow token, so a user token never opens it and its key never
opens anything else. No session and no CSRF token: no browser sends the key on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from d365sync import roles
from d365sync.roles import ACT_LEVEL, LEVELS

TOKEN_COOKIE = "_token"  # airflow.api_fastapi.auth.managers.base_auth_manager.COOKIE_NAME_JWT_TOKEN
CSRF_COOKIE = "d365sync_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MACHINE_AUTH = "__d365sync_machine_auth__"
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


class NotAuthenticated(Exception):
    """No valid Airflow token: 401 for the API, a redirect to the login page for pages."""

    def __init__(self, reason: str, login_url: str | None = None) -> None:
        super().__init__(reason)
        self.login_url = login_url


class Forbidden(Exception):
    """Authenticated, but the role does not allow this (403)."""


@dataclass(frozen=True)
class Principal:
    """The authenticated caller as the UI sees them."""

    name: str
    role: str
    via: Literal["bearer", "cookie", "machine"]
    token: str

    @property
    def level(self) -> int:
        return roles.level(self.role)

    @property
    def can_read(self) -> bool:
        return self.level >= LEVELS["viewer"]

    @property
    def can_act(self) -> bool:
        return self.level >= ACT_LEVEL

    @property
    def can_reveal(self) -> bool:
        return self.can_act


class Authenticator(Protocol):
    """Turns a request into a :class:`Principal` or raises :class:`NotAuthenticated`."""

    async def __call__(self, request: Request) -> Principal: ...


def machine_to_machine(authenticate: Authenticator) -> Callable[[Endpoint], Endpoint]:
    """Mark an endpoint as called by a machine, authenticated by ``authenticate`` alone."""

    def mark(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, MACHINE_AUTH, authenticate)
        return endpoint

    return mark


def machine_authenticator(request: Request) -> Authenticator | None:
    """The authenticator of the matched route if it is a machine-to-machine one, else None."""
    endpoint = getattr(request.scope.get("route"), "endpoint", None)
    return getattr(endpoint, MACHINE_AUTH, None)


def request_token(request: Request) -> tuple[str, Literal["bearer", "cookie"]] | None:
    """The caller's JWT: an explicit Bearer header wins over the ambient cookie, as in Airflow."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), "bearer"
    if cookie := request.cookies.get(TOKEN_COOKIE):
        return cookie, "cookie"
    return None


class AirflowAuthenticator:
    """Validates the token with the API server's auth manager (any auth manager)."""

    def __init__(self, role_map: Mapping[str, str] | None = None, replay_dag_id: str = "replay_dead_letters"):
        self.role_map = roles.role_map(role_map)
        self.replay_dag_id = replay_dag_id

    async def __call__(self, request: Request) -> Principal:
        manager = auth_manager()
        found = request_token(request)
        if found is None:
            raise NotAuthenticated("not authenticated", _login_url(manager, request))
        token, via = found
        user = await self._user(manager, token, request)
        role = self.role_of(manager, user)
        return Principal(str(user.get_name()), role, via, token)

    async def _user(self, manager: Any, token: str, request: Request) -> Any:
        from jwt import InvalidTokenError

        try:
            return await manager.get_user_from_token(token)
        except InvalidTokenError as exc:  # expired, bad signature, revoked, malformed
            reason = f"invalid token: {type(exc).__name__}"
            raise NotAuthenticated(reason, _login_url(manager, request)) from None

    def role_of(self, manager: Any, user: Any) -> str:
        """The UI role of an auth-manager user (:mod:`d365sync.roles`; else by permissions)."""
        role = roles.role_of_user(user, self.role_map)
        return role if role is not None else self._role_by_permissions(manager, user)

    def _role_by_permissions(self, manager: Any, user: Any) -> str:
        from airflow.api_fastapi.auth.managers.models.resource_details import (
            AccessView,
            DagAccessEntity,
            DagDetails,
        )

        details = DagDetails(id=self.replay_dag_id)
        run = DagAccessEntity.RUN
        if manager.is_authorized_dag(method="POST", access_entity=run, details=details, user=user):
            return "op"
        return "viewer" if manager.is_authorized_view(access_view=AccessView.WEBSITE, user=user) else "none"


def auth_manager() -> Any:
    """The API server's auth manager; outside it (``uvicorn d365sync.ui…``) one from the config."""
    from airflow.api_fastapi.app import create_auth_manager, get_auth_manager

    try:
        return get_auth_manager()
    except RuntimeError:
        return create_auth_manager()


def _login_url(manager: Any, request: Request) -> str | None:
    try:
        return str(manager.get_url_login(next_url=str(request.url)))
    except Exception:  # a login link is a convenience; the 401 stands without it
        return None


# --- CSRF -----------------------------------------------------------------------------------


class CsrfCookieMiddleware:
    """Gives every browser a random CSRF nonce cookie (pure ASGI: no body buffering)."""

    def __init__(self, app: ASGIApp, cookie_path: Callable[[Scope], str]) -> None:
        self.app = app
        self.cookie_path = cookie_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = _cookie(scope, CSRF_COOKIE)
        fresh = nonce is None or len(nonce) < 32
        if fresh:
            nonce = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf_nonce"] = nonce
        await self.app(scope, receive, self._sender(send, nonce, scope) if fresh else send)

    def _sender(self, send: Send, nonce: str, scope: Scope) -> Callable[[Message], Awaitable[None]]:
        cookie = f"{CSRF_COOKIE}={nonce}; Path={self.cookie_path(scope)}; SameSite=Strict; HttpOnly"
        if scope.get("scheme") == "https":
            cookie += "; Secure"

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"set-cookie", cookie.encode("latin-1")))
            await send(message)

        return send_with_cookie


def _cookie(scope: Scope, name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k == name:
                    return v
    return None


class Csrf:
    """Signed double-submit tokens: ``HMAC(secret, nonce | user)``."""

    def __init__(self, secret: str | None = None) -> None:
        self._secret = secret

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = _airflow_secret() or secrets.token_urlsafe(32)
        return self._secret.encode()

    def token(self, nonce: str, user: str) -> str:
        return hmac.new(self.secret, f"{nonce}|{user}".encode(), hashlib.sha256).hexdigest()

    def valid(self, nonce: str | None, user: str, submitted: str | None) -> bool:
        if not nonce or not submitted:
            return False
        return hmac.compare_digest(self.token(nonce, user), submitted)


def _airflow_secret() -> str | None:
    """Airflow's ``[api] secret_key``: shared by every worker, unlike a per-process random key."""
    try:
        from airflow.configuration import conf

        return conf.get("api", "secret_key", fallback=None) or None
    except ImportError:
        return None


async def submitted_csrf(request: Request) -> str | None:
    """The CSRF token of a write: the ``X-CSRF-Token`` header or the form field."""
    if header := request.headers.get(CSRF_HEADER):
        return header
    if request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None
