"""Response headers for every answer of the app, and a 400 for NUL bytes in the URL.

Why these values:

* The pages have no script at all (the charts are inline SVG, the styles one static file), so
  the CSP allows nothing but this origin's stylesheet, images and form posts.
* The Airflow UI shows the pages in an iframe (``external_views`` with ``url_route``), served
  by the same API server, so framing is allowed for the same origin only
  (``frame-ancestors 'self'`` and ``X-Frame-Options: SAMEORIGIN``), never for other sites.
* ``Cache-Control: no-store``: pages show unmasked values to operators; no shared or disk cache
  may keep them. A route that sets its own ``Cache-Control`` (the stylesheet) keeps it.
* Data Docs are third-party HTML (Great Expectations renders inline scripts, CDN links and the
  quarantined values themselves), so they get a ``sandbox`` CSP without ``allow-scripts`` and
  ``script-src 'none'``: no script runs at all (the pages are static tables; only GX's table
  filters and charts need script), and the document lives in an opaque origin. That is what
  protects Airflow's ``_token`` cookie: Airflow's own login page (SimpleAuthManager) sets it
  from JavaScript, so it is script-readable until the API server re-issues it ``HttpOnly``, and
  the project cannot change that cookie. Its only cookie, ``d365sync_csrf``, is ``HttpOnly``,
  ``SameSite=Strict`` and ``Secure`` over https (:class:`~d365sync.ui.auth.CsrfCookieMiddleware`).
  The values are masked and HTML-escaped before GX renders them as well
  (:func:`d365sync.engine.validation._sanitize`).
* A NUL byte in the path or query is never meaningful and breaks file-system and database
  calls further down (``ValueError: embedded null byte``), so it is refused up front.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'self'; base-uri 'none'"
)
DOCS_CSP = (
    "sandbox allow-popups; default-src 'none'; script-src 'none'; object-src 'none'; "
    "style-src 'self' 'unsafe-inline' https:; font-src 'self' data: https:; img-src 'self' data: https:; "
    "form-action 'none'; frame-ancestors 'self'; base-uri 'none'"
)
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)


class SecurityHeadersMiddleware:
    """Pure ASGI (no body buffering): adds the headers, answers 400 to NUL bytes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _has_nul(scope):
            await _bad_request(send)
            return
        relative = str(scope.get("path", "")).removeprefix(str(scope.get("root_path", "")))
        csp = DOCS_CSP if relative.startswith("/data-docs/") else PAGE_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in HEADERS if k not in present]
                headers.append((b"content-security-policy", csp.encode()))
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _has_nul(scope: Scope) -> bool:
    raw = scope.get("raw_path") or b""
    query = scope.get("query_string") or b""
    return (
        "\x00" in str(scope.get("path", "")) or b"%00" in raw.lower() or b"%00" in query or b"\x00" in query
    )


async def _bad_request(send: Send) -> None:
    body = b"bad request: NUL byte in the URL"
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                (b"x-content-type-options", b"nosniff"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
