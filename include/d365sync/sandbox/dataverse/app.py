"""The FastAPI application: identity endpoints, the Web API route and the admin endpoints.

The Web API route is thin on purpose: it authenticates, applies service-protection limits and
test knobs, then hands an :class:`ApiRequest` to :class:`~.service.Dataverse` in a worker
thread.  See the package docstring for the admin endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from d365sync.sandbox.dataverse import delivery, errors
from d365sync.sandbox.dataverse.config import SandboxConfig
from d365sync.sandbox.dataverse.errors import DataverseError
from d365sync.sandbox.dataverse.identity import AuthError, TokenRequestError, TokenService
from d365sync.sandbox.dataverse.limits import Counters, Knobs, ServiceProtection
from d365sync.sandbox.dataverse.protocol import (
    API_VERSIONS,
    MAX_URL_LENGTH,
    ApiRequest,
    ApiResponse,
    parse_query,
)
from d365sync.sandbox.dataverse.service import Dataverse, route_name
from d365sync.sandbox.dataverse.store import Store
from d365sync.sandbox.dataverse.webhooks import Webhooks, ensure_catalog

log = logging.getLogger(__name__)
API_METHODS = ["GET", "POST", "PATCH", "PUT", "DELETE"]
ADMIN_HEADER = "x-sandbox-admin-secret"
"""Admin writes (``POST /_sandbox/…``) need this header holding an app's client secret, or a
bearer token the sandbox issued, plus ``Content-Type: application/json``: a web page the
developer visits can send neither (a cross-site form or ``text/plain`` fetch carries no custom
header and no JSON content type without a CORS preflight, which the sandbox never grants)."""


@dataclass
class Sandbox:
    """Everything a running sandbox holds; exposed as ``app.state.sandbox``."""

    config: SandboxConfig
    store: Store
    tokens: TokenService
    counters: Counters
    limiter: ServiceProtection
    knobs: Knobs
    service: Dataverse
    webhooks: delivery.Dispatcher

    @classmethod
    def open(cls, config: SandboxConfig) -> Sandbox:
        """Open the store and wire the parts; the webhook senders start with the server."""
        store = Store(config.data_dir)
        counters = Counters()
        limiter = ServiceProtection(config.limits)
        knobs = Knobs()
        knobs.update(config.knobs)
        ensure_catalog(store, config.users[0].systemuserid)
        listener = Webhooks(store, knobs)
        dispatcher = delivery.Dispatcher(store, config, counters, knobs)
        listener.on_queued(dispatcher.wake)
        return cls(
            config,
            store,
            TokenService(config),
            counters,
            limiter,
            knobs,
            Dataverse(config, store, counters, limiter, knobs, listener),
            dispatcher,
        )

    def apply_admin(self, values: dict[str, Any]) -> None:
        """``POST /_sandbox/knobs``: knobs, limits, retention, token lifetime, token expiry."""
        self.knobs.update(values)
        if values.get("expire_tokens_now"):
            self.tokens.expire_all()
        for name, value in (values.get("limits") or {}).items():
            if name in ("requests", "concurrency", "execution_time_ms"):
                setattr(self.limiter.limits, name, int(value))
            elif name in ("window_seconds", "execution_window_seconds"):
                setattr(self.limiter.limits, name, float(value))
        if values.get("reset_limits"):
            self.limiter.reset()
        if "retention_seconds" in values:
            self.service.reader.retention_seconds = float(values["retention_seconds"])
        if "token_lifetime" in values:
            self.config.token_lifetime = int(values["token_lifetime"])

    def admin_state(self) -> dict[str, Any]:
        limits = self.limiter.limits
        return {
            **self.knobs.snapshot(),
            "limits": {
                "requests": limits.requests,
                "window_seconds": limits.window_seconds,
                "concurrency": limits.concurrency,
                "execution_time_ms": limits.execution_time_ms,
                "execution_window_seconds": limits.execution_window_seconds,
            },
            "retention_seconds": self.service.reader.retention_seconds,
            "token_lifetime": self.config.token_lifetime,
        }


def _dataverse_error(error: DataverseError, extra: dict[str, str] | None = None) -> Response:
    return JSONResponse(error.body(), error.status, headers={**error.headers, **(extra or {})})


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def create_app(config: SandboxConfig) -> FastAPI:
    """Build the app; the store opens now and closes on shutdown."""
    sandbox = Sandbox.open(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Requests run in worker threads; allow as many as the concurrency limit admits (anyio's
        # default of 40 would queue requests the limit lets in).
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, config.limits.concurrency + 8)
        sandbox.webhooks.start()
        try:
            yield
        finally:
            sandbox.webhooks.stop()
            sandbox.store.close()

    app = FastAPI(
        title="Dataverse Web API sandbox", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.sandbox = sandbox

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return _dataverse_error(DataverseError(500, errors.UNEXPECTED, f"Unexpected sandbox error: {exc!r}"))

    _identity_routes(app, sandbox)
    _admin_routes(app, sandbox)
    _api_routes(app, sandbox)
    return app


def _identity_routes(app: FastAPI, sandbox: Sandbox) -> None:
    tokens = sandbox.tokens

    def discovery(request: Request, tenant: str) -> Response:
        if not tokens.tenant_known(tenant):
            return JSONResponse(
                {
                    "error": "invalid_tenant",
                    "error_description": f"AADSTS90002: Tenant '{tenant}' not found.",
                },
                400,
            )
        return JSONResponse(tokens.openid_configuration(_base_url(request), tenant))

    app.add_api_route("/{tenant}/v2.0/.well-known/openid-configuration", discovery, methods=["GET"])
    app.add_api_route("/{tenant}/.well-known/openid-configuration", discovery, methods=["GET"])

    @app.get("/{tenant}/discovery/v2.0/keys")
    async def jwks(tenant: str) -> Response:
        return JSONResponse(tokens.jwks())

    @app.get("/common/discovery/instance")
    async def instance_discovery(request: Request) -> Response:
        base = _base_url(request)
        tenant = sandbox.config.tenant
        return JSONResponse(
            {
                "tenant_discovery_endpoint": f"{base}/{tenant}/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [
                    {
                        "preferred_network": request.url.netloc,
                        "preferred_cache": request.url.netloc,
                        "aliases": [request.url.netloc],
                    }
                ],
            }
        )

    @app.post("/{tenant}/oauth2/v2.0/token")
    async def token(request: Request, tenant: str) -> Response:
        raw = (await request.body()).decode("utf-8", "replace")
        form = dict(parse_qsl(raw, keep_blank_values=True))
        try:
            answer = tokens.issue(form, tenant, _base_url(request), _basic_auth(request))
        except TokenRequestError as exc:
            sandbox.counters.token(ok=False)
            return JSONResponse(exc.body(), exc.status)
        sandbox.counters.token(ok=True)
        return JSONResponse(answer, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def _basic_auth(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:]).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    return unquote(user), unquote(password)


def _admin_refusal(sandbox: Sandbox, request: Request) -> Response | None:
    """Why an admin write is refused (415/401), or None when it may go ahead."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        return _dataverse_error(
            DataverseError(
                415,
                errors.PAYLOAD_ERROR,
                "Sandbox admin requests must be sent with Content-Type: application/json.",
            )
        )
    secret = request.headers.get(ADMIN_HEADER, "").encode()
    if secret and any(hmac.compare_digest(secret, u.client_secret.encode()) for u in sandbox.config.users):
        return None
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        try:
            sandbox.tokens.verify(request.headers["authorization"], _base_url(request))
            return None
        except AuthError:
            pass
    message = f"Sandbox admin requests need a bearer token or the {ADMIN_HEADER} header."
    return _dataverse_error(DataverseError(401, errors.AUTH_FAILED, message))


def _admin_routes(app: FastAPI, sandbox: Sandbox) -> None:
    @app.get("/_sandbox/health")
    async def health() -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "version": sandbox.store.current_version,
                "env_url": sandbox.tokens.env_url,
                "tenant": sandbox.config.tenant,
            }
        )

    @app.get("/_sandbox/counters")
    async def counters() -> Response:
        snapshot = sandbox.counters.snapshot(sandbox.tokens.tokens_issued)
        snapshot["execution_time_window_ms"] = sandbox.limiter.execution_time_used()
        snapshot["webhook_pending"] = await run_in_threadpool(delivery.pending, sandbox.store)
        return JSONResponse(snapshot)

    @app.get("/_sandbox/webhooks")
    async def webhooks(request: Request) -> Response:
        status = request.query_params.get("status") or None
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            return _dataverse_error(errors.bad_request("limit must be an integer"))
        if status is not None and status not in delivery.STATUSES:
            return _dataverse_error(
                errors.bad_request(f"status must be one of {', '.join(delivery.STATUSES)}")
            )
        return JSONResponse(await run_in_threadpool(delivery.log_view, sandbox.store, status, limit))

    @app.post("/_sandbox/counters/reset")
    async def reset(request: Request) -> Response:
        if (refusal := _admin_refusal(sandbox, request)) is not None:
            return refusal
        sandbox.counters.reset()
        return JSONResponse({"status": "reset"})

    @app.get("/_sandbox/knobs")
    async def get_knobs() -> Response:
        return JSONResponse(sandbox.admin_state())

    @app.post("/_sandbox/knobs")
    async def set_knobs(request: Request) -> Response:
        if (refusal := _admin_refusal(sandbox, request)) is not None:
            return refusal
        try:
            values = json.loads(await request.body() or b"{}")
            if not isinstance(values, dict):
                raise ValueError("knobs must be a JSON object")
            sandbox.apply_admin(values)
        except (ValueError, TypeError) as exc:
            return _dataverse_error(errors.bad_request(f"Invalid knobs: {exc}"))
        return JSONResponse(sandbox.admin_state())


def _api_routes(app: FastAPI, sandbox: Sandbox) -> None:
    async def api(request: Request, version: str, path: str = "") -> Response:
        base = _base_url(request)
        route = route_name(request.method, path)
        response = await _serve(sandbox, request, version, path, base)
        response.headers["x-ms-service-request-id"] = str(uuid.uuid4())
        sandbox.counters.http(route, response.status_code)
        return response

    app.add_api_route("/api/data/{version}/{path:path}", api, methods=API_METHODS)
    app.add_api_route("/api/data/{version}", api, methods=API_METHODS)


async def _serve(sandbox: Sandbox, request: Request, version: str, path: str, base: str) -> Response:
    if version not in API_VERSIONS:
        return _dataverse_error(errors.segment_not_found(version))
    if len(request.url.path) + len(request.url.query) + 1 > MAX_URL_LENGTH:
        return _dataverse_error(errors.url_too_long(MAX_URL_LENGTH))
    try:
        caller = sandbox.tokens.verify(request.headers.get("authorization"), base)
    except AuthError as exc:
        challenge = (
            f"Bearer authorization_uri={base}/{sandbox.config.tenant}/oauth2/authorize, "
            f"resource_id={sandbox.tokens.env_url or base}/"
        )
        return _dataverse_error(
            DataverseError(401, errors.AUTH_FAILED, str(exc)), {"WWW-Authenticate": challenge}
        )
    user_id = caller.user.systemuserid
    is_batch = path.strip("/") == "$batch"
    try:
        forced = sandbox.knobs.take_forced_throttle()
        if forced is not None:
            raise forced
        with sandbox.limiter.concurrent(user_id):
            sandbox.limiter.check_execution_time(user_id)
            remaining = None if is_batch else sandbox.limiter.charge(user_id, 1)
            if sandbox.knobs.latency_ms > 0:
                await asyncio.sleep(sandbox.knobs.latency_ms / 1000)
            injected = sandbox.knobs.take_injected_error()
            if injected is not None:
                raise injected
            api_request = ApiRequest(
                method=request.method,
                path=path,
                query=parse_query(request.url.query),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=await request.body(),
                caller=caller,
                base_url=base,
                version=version,
            )
            result: ApiResponse = await run_in_threadpool(sandbox.service.handle, api_request)
    except DataverseError as exc:
        if exc.status == 429:
            sandbox.counters.refused(exc.code)
        return _dataverse_error(exc)
    response = Response(result.body, result.status, headers=result.headers)
    if remaining is not None:
        response.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] = str(remaining)
    return response
