"""Security issue 11, finding 9: response headers, the banner, NUL bytes and huge numbers.

Driven like the other UI tests: the real app mounted under ``/d365sync``, real Airflow JWTs.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from tests.ui.conftest import PREFIX, Env
from tests.ui.test_access import READS, _url

HUGE = "99999999999999999999"


def _headers_ok(response: object, *, page: bool = True) -> None:
    headers = response.headers  # type: ignore[attr-defined]
    csp = headers.get("content-security-policy", "")
    assert "frame-ancestors 'self'" in csp, csp
    assert headers.get("x-frame-options") == "SAMEORIGIN"
    assert headers.get("x-content-type-options") == "nosniff"
    assert headers.get("referrer-policy") == "same-origin"
    if page:
        assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "script-src" not in csp
        assert headers.get("cache-control") == "no-store"


@pytest.mark.parametrize(("path", "method"), READS)
def test_every_page_sends_the_security_headers(ui: Env, path: str, method: str) -> None:
    response = ui.as_role("op").get(_url(path))
    assert response.status_code in (200, 303), response.text
    if path.startswith("/data-docs/"):  # third-party HTML: sandboxed, never cached
        _headers_ok(response, page=False)
        assert response.headers["content-security-policy"].startswith("sandbox ")
        assert response.headers["cache-control"] == "no-store"
    elif path.startswith("/static/"):  # the stylesheet keeps its own cache lifetime
        _headers_ok(response, page=False)
    else:
        _headers_ok(response)


def test_refusals_send_the_security_headers_too(ui: Env) -> None:
    _headers_ok(ui.as_role(None, via="header").get(f"{PREFIX}/api/health"))
    _headers_ok(ui.as_role("viewer").post(f"{PREFIX}/dead-letters/1/skip", data={"reason": "x"}))


@pytest.mark.parametrize("page", ["reviews", "dead-letters", "health", "audit", "entities/customers"])
def test_pages_need_no_inline_script_or_style(ui: Env, page: str) -> None:
    """The CSP allows no inline script or style: the pages must not rely on any."""
    body = ui.as_role("op").get(f"{PREFIX}/{page}").text
    assert "<script" not in body and "<style" not in body
    assert not re.search(r"\s(style|on[a-z]+)\s*=", body), re.search(r"\s(style|on[a-z]+)\s*=.{0,40}", body)
    assert "javascript:" not in body


def _banners(body: str) -> list[str]:
    return re.findall(r'<p class="flash [a-z]+" role="\w+">(.*?)</p>', body)


@pytest.mark.parametrize(
    "query",
    [
        "msg=Urgent%3A+call+%2B44+20+7946+0000+and+choose+ERP+for+all",
        "error=Your+session+expired%2C+log+in+at+evil.example",
        "msg=%3Cb%3Ebold%3C%2Fb%3E",
        "msg=decided&id=1+and+choose+ERP&choice=erp",
        "msg=decided&id=1&choice=whatever+you+like",
        "msg=not_open&id=1",  # an error code under the ok key
        "error=replay_refused&http=-1",
    ],
)
def test_banner_never_echoes_text_from_the_query(ui: Env, query: str) -> None:
    body = ui.as_role("viewer").get(f"{PREFIX}/reviews?{query}").text
    assert _banners(body) == []
    for word in ("Urgent", "evil.example", "bold", "choose ERP", "whatever"):
        assert word not in body


def test_banner_shows_fixed_texts_for_known_codes(ui: Env) -> None:
    client = ui.as_role("viewer")
    body = client.get(f"{PREFIX}/reviews?msg=decided&id=7&choice=erp&error=replay_refused&http=403").text
    assert _banners(body) == [
        "Review 7 decided (erp).",
        "Airflow refused to trigger the replay DAG (HTTP 403).",
    ]


@pytest.mark.parametrize(
    "url",
    [
        "/data-docs/customers%00/index.html",
        "/data-docs/customers/index.html%00",
        "/entities/cust%00omers",
        "/dag/sync_%00",
        "/reviews?entity=%00",
        "/audit?key=a%00b",
        "/static/style.css%00",
    ],
)
def test_nul_bytes_are_a_400_not_a_500(ui: Env, url: str) -> None:
    response = ui.as_role("op").get(f"{PREFIX}{url}")
    assert response.status_code == 400, (response.status_code, response.text)


@pytest.mark.parametrize("path", ["/reviews", "/dead-letters", "/audit"])
@pytest.mark.parametrize("page", [HUGE, "-1", "0", "1e9", "abc"])
def test_huge_or_invalid_page_numbers_are_4xx(ui: Env, path: str, page: str) -> None:
    response = ui.as_role("viewer").get(f"{PREFIX}{path}?page={page}")
    assert 400 <= response.status_code < 500, (response.status_code, response.text)


def test_a_large_valid_page_number_is_an_empty_page(ui: Env) -> None:
    response = ui.as_role("viewer").get(f"{PREFIX}/reviews?page=1000000")
    assert response.status_code == 200 and '<tr id="review-' not in response.text


@pytest.mark.parametrize(
    ("path", "form"),
    [
        (f"/reviews/{HUGE}/decide", {"choice": "erp"}),
        ("/reviews/1/decide", {"choice": "erp", "page": HUGE}),
        (f"/dead-letters/{HUGE}/replay", {}),
        (f"/dead-letters/{HUGE}/skip", {"reason": "gone"}),
    ],
)
def test_huge_ids_in_actions_are_4xx(ui: Env, path: str, form: dict[str, str]) -> None:
    client = ui.as_role("op")
    response = client.post(f"{PREFIX}{path}", data={**form, "csrf_token": ui.csrf()})
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert ui.store.decided_reviews("customers") == []


def test_huge_ids_in_a_bulk_selection_are_ignored(ui: Env) -> None:
    client = ui.as_role("op")
    form = {"choice": "erp", "scope": "selected", "ids": [HUGE], "csrf_token": ui.csrf()}
    response = client.post(f"{PREFIX}/reviews/bulk", data=form)
    assert response.status_code == 303 and "error=nothing_selected" in response.headers["location"]


def _directives(csp: str) -> dict[str, list[str]]:
    parts = [d.split() for d in csp.split(";") if d.strip()]
    return {p[0]: p[1:] for p in parts}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_data_docs_run_no_script_and_no_project_cookie_is_script_readable(ui: Env, scheme: str) -> None:
    """Issue 11, finding 3: Data Docs are GX's HTML with quarantined values in it.

    They are served without script: a ``sandbox`` that does not allow scripts (an opaque origin,
    no access to this origin's cookies, storage or DOM) plus ``script-src 'none'``, and nosniff.
    The ``_token`` cookie is Airflow's (its login page sets it from JavaScript; the project cannot
    change that): no script in a Data Docs page runs to read it. The one cookie the project sets,
    the CSRF nonce, is ``HttpOnly``, ``SameSite=Strict`` and ``Secure`` over https.
    """
    client = TestClient(ui.client.app, base_url=f"{scheme}://testserver", follow_redirects=False)
    client.cookies.set("_token", ui.tokens["viewer"])
    response = client.get(f"{PREFIX}/data-docs/customers/index.html")
    assert response.status_code == 200
    csp = _directives(response.headers["content-security-policy"])
    assert (
        "sandbox" in csp
        and "allow-scripts" not in csp["sandbox"]
        and "allow-same-origin" not in csp["sandbox"]
    )
    assert csp["script-src"] == ["'none'"] and csp["object-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'self'"]
    assert response.headers["x-content-type-options"] == "nosniff"
    (cookie,) = response.headers.get_list("set-cookie")
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert cookie.startswith("d365sync_csrf=") and {"httponly", "samesite"} <= attributes
    assert "samesite=strict" in cookie.lower()
    assert ("secure" in attributes) == (scheme == "https")
