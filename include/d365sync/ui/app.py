"""The operations UI: a FastAPI app that the Airflow plugin mounts (``/d365sync``).

Why a factory that does nothing heavy: the API server builds the app when it loads the plugin.
The state store is opened on the first request, and the auth manager is looked up per
request, so importing the plugin costs FastAPI and Jinja2, both already loaded by Airflow.

Security, in one place: :func:`guard` is an *app-level* dependency, so it runs for every route
the app has or will have. It authenticates the Airflow user, lets readers read, and requires
an acting role (plus a CSRF token when the cookie authenticated the request) for anything that
is not GET/HEAD/OPTIONS. The one exception is a route marked machine-to-machine (the webhook
receiver, :mod:`d365sync.ui.events`): the guard authenticates it by its own key instead, and
nothing else. There is no ``StaticFiles`` mount and no OpenAPI/docs route, because
mounts and FastAPI's built-in routes would bypass app-level dependencies.
"""

from __future__ import annotations

import functools
import html
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from d365sync.ui import present
from d365sync.ui.airflow_api import AirflowApi
from d365sync.ui.auth import (
    SAFE_METHODS,
    AirflowAuthenticator,
    Authenticator,
    Csrf,
    CsrfCookieMiddleware,
    Forbidden,
    NotAuthenticated,
    Principal,
    machine_authenticator,
    submitted_csrf,
)
from d365sync.ui.events import Receiver
from d365sync.ui.hardening import SecurityHeadersMiddleware
from d365sync.ui.settings import UiSettings

HERE = Path(__file__).resolve().parent


@dataclass
class UiContext:
    """What every request shares: settings, the (lazily opened) store, auth, the API client and
    the webhook receiver."""

    settings: UiSettings
    authenticator: Authenticator
    csrf: Csrf
    airflow: AirflowApi
    templates: Jinja2Templates
    events: Receiver
    _store: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def store(self) -> Any:
        """The state store, opened (and upgraded) on first use."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    from d365sync.engine.state import StateStore

                    s = self.settings
                    self._store = StateStore.open(s.state_url, schema=s.state_schema)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def create_app(
    state_url: str | None = None,
    *,
    settings: UiSettings | None = None,
    authenticator: Authenticator | None = None,
    airflow_api: AirflowApi | None = None,
    receiver: Receiver | None = None,
) -> FastAPI:
    """Build the app; ``state_url`` overrides the configured state store."""
    settings = settings or UiSettings.from_env(state_url=state_url)
    if state_url is not None and settings.state_url != state_url:
        settings = UiSettings(**{**settings.__dict__, "state_url": state_url})
    app = FastAPI(
        title="d365sync operations",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(guard)],
    )
    app.state.ctx = UiContext(
        settings=settings,
        authenticator=authenticator or AirflowAuthenticator(settings.role_map, settings.replay_dag_id),
        csrf=Csrf(settings.secret),
        airflow=airflow_api or AirflowApi(settings.airflow_api_url),
        templates=_templates(settings),
        events=receiver or Receiver.from_settings(settings),
    )
    app.add_middleware(CsrfCookieMiddleware, cookie_path=lambda scope: scope.get("root_path") or "/")
    app.add_middleware(SecurityHeadersMiddleware)  # added last: outermost, so every answer gets it
    app.add_exception_handler(NotAuthenticated, _not_authenticated)
    app.add_exception_handler(Forbidden, _forbidden)
    from d365sync.ui import events, routes

    app.include_router(routes.router)
    app.include_router(events.router)
    return app


def _templates(settings: UiSettings) -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    personal = settings.personal_fields
    if personal is None:
        personal = present.personal_fields()
    show = functools.partial(present.show, personal=personal)
    diff = functools.partial(present.diff, personal=personal)
    templates.env.globals.update(show=show, diff=diff, text=present.text, key=present.key)
    return templates


def ctx_of(request: Request) -> UiContext:
    return request.app.state.ctx


async def guard(request: Request) -> Principal:
    """Authenticate every request; writes need an acting role and (cookie auth) a CSRF token.

    A machine-to-machine route is authenticated by its own authenticator only (no user token).
    """
    if (machine := machine_authenticator(request)) is not None:
        request.state.principal = await machine(request)
        return request.state.principal
    ctx = ctx_of(request)
    user = await ctx.authenticator(request)
    if not user.can_read:
        raise Forbidden(f"{user.name} ({user.role}) may not use the sync operations pages")
    if request.method not in SAFE_METHODS:
        if not user.can_act:
            raise Forbidden(f"{user.name} ({user.role}) may read but not act; ask an operator")
        nonce = getattr(request.state, "csrf_nonce", None)
        if user.via == "cookie" and not ctx.csrf.valid(nonce, user.name, await submitted_csrf(request)):
            raise Forbidden("missing or invalid CSRF token; reload the page and try again")
    request.state.principal = user
    return user


def wants_html(request: Request) -> bool:
    """Pages get redirects and HTML errors; ``/api/`` and non-GET clients get JSON."""
    return request.method == "GET" and not request.url.path.startswith(f"{root(request)}/api/")


def root(request: Request) -> str:
    """Where the app is mounted (``/d365sync``): every link on a page starts with it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


async def _not_authenticated(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NotAuthenticated)
    if wants_html(request) and exc.login_url:
        return RedirectResponse(exc.login_url, status_code=303)
    return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


async def _forbidden(request: Request, exc: Exception) -> Response:
    if request.method == "GET" and wants_html(request):
        body = f"<h1>Forbidden</h1><p>{html.escape(str(exc))}</p>"
        return HTMLResponse(body, status_code=403)
    return JSONResponse({"detail": str(exc)}, status_code=403)
