"""One pooled HTTP session that adds auth and standard headers and applies the retry policy.

Every Web API call goes through :meth:`Transport.request`, so throttling, backoff, the single
401 token refresh, the concurrency limiter and the counters behave identically everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from d365sync.dynamics.auth import TokenProvider
from d365sync.dynamics.config import DynamicsConfig
from d365sync.dynamics.counters import Counters
from d365sync.dynamics.errors import (
    DynamicsApiError,
    DynamicsAuthError,
    DynamicsError,
    parse_error_body,
    redact_url,
)
from d365sync.dynamics.limiter import AdaptiveLimiter
from d365sync.dynamics.retry import RetryPolicy, Verdict, classify, retry_after_seconds

log = logging.getLogger(__name__)

BASE_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}


class PinnedVerifySession(requests.Session):
    """A session whose ``verify`` really applies to every request, MSAL's included.

    requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` override ``Session.verify`` (psf/requests
    #3829), so a configured CA bundle would silently lose to the system one. Passing it per
    request restores the expected precedence; ``verify=True`` still honours the environment.
    """

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("verify", self.verify)
        return super().request(method, url, *args, **kwargs)


def build_session(config: DynamicsConfig) -> requests.Session:
    """A session whose connection pool matches the configured concurrency."""
    session = PinnedVerifySession()
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=max(config.max_concurrency, 2), max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.verify = config.verify
    return session


class Transport:
    """Sends requests with retries; raises :class:`DynamicsApiError` for what cannot succeed."""

    def __init__(
        self,
        config: DynamicsConfig,
        session: requests.Session,
        tokens: TokenProvider,
        policy: RetryPolicy,
        limiter: AdaptiveLimiter,
        counters: Counters,
    ) -> None:
        self.config = config
        self.session = session
        self.tokens = tokens
        self.policy = policy
        self.limiter = limiter
        self.counters = counters

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: bytes | None = None,
        operations: int = 1,
    ) -> requests.Response:
        """Send until success, a fatal status, or the retry budget runs out."""
        url = url if url.startswith(("http://", "https://")) else f"{self.config.api_url}/{url}"
        started, attempt, refreshed = self.policy.clock(), 0, False
        while True:
            attempt += 1
            response, error = self._send_once(method, url, headers, json, data, operations)
            verdict = classify(response, error)
            if verdict is Verdict.OK:
                self.limiter.on_success()
                return response  # type: ignore[return-value]
            if verdict is Verdict.UNAUTHORIZED and not refreshed:
                refreshed = True
                self._refresh_after_401(response)
                continue
            self._wait_or_raise(verdict, attempt, started, method, url, response, error)

    def _send_once(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        json: Any,
        data: bytes | None,
        ops: int,
    ) -> tuple[requests.Response | None, Exception | None]:
        try:  # an unreachable authority is as transient as an unreachable API
            merged = {**BASE_HEADERS, "Authorization": f"Bearer {self.tokens.token()}", **(headers or {})}
        except requests.RequestException as exc:
            return None, exc
        if method == "GET":
            merged.setdefault("If-None-Match", "null")
        self.counters.add(requests=1, operations=ops)
        try:
            with self.limiter.slot():
                response = self.session.request(
                    method, url, headers=merged, json=json, data=data, timeout=self.config.timeout
                )
        except requests.RequestException as exc:
            return None, exc
        return response, None

    def _refresh_after_401(self, response: requests.Response | None) -> None:
        log.info("Dataverse rejected the token (401); acquiring a new one and retrying once")
        rejected = response.request.headers.get("Authorization", "") if response is not None else ""
        self.tokens.invalidate(rejected.removeprefix("Bearer ") or None)
        if response is not None:
            response.close()

    def _wait_or_raise(
        self,
        verdict: Verdict,
        attempt: int,
        started: float,
        method: str,
        url: str,
        response: requests.Response | None,
        error: Exception | None,
    ) -> None:
        if verdict in (Verdict.FATAL, Verdict.UNAUTHORIZED):
            raise self._failure(method, url, response, error)
        hint = retry_after_seconds(response.headers.get("Retry-After")) if response is not None else None
        wait = self.policy.wait_for(verdict, attempt, hint)
        if not self.policy.may_retry(attempt, started, wait):
            raise self._failure(method, url, response, error)
        log.warning(
            "%s %s: %s (attempt %d); retrying in %.1fs",
            method,
            redact_url(url),
            _describe(response, error),
            attempt,
            wait,
        )
        if response is not None:
            response.close()
        self.counters.add(retries=1, wait_seconds=wait)
        if verdict is Verdict.THROTTLED:
            self.counters.add(throttles=1)
            self.limiter.on_throttle(pause=wait)  # the next slot() waits, for every thread
        else:
            self.policy.sleep(wait)

    def _failure(
        self, method: str, url: str, response: requests.Response | None, error: Exception | None
    ) -> DynamicsError:
        if response is None:
            return DynamicsApiError(0, "", f"{type(error).__name__}: {error}", method, url)
        code, message = parse_error_body(_json_or_none(response))
        response.close()
        if response.status_code == 401:
            return DynamicsAuthError(
                f"{method} {redact_url(url)} -> 401 even with a fresh token for client id "
                f"{self.config.client_id}: {message or 'unauthorized'}"
            )
        return DynamicsApiError(response.status_code, code, message or response.reason, method, url)


def _describe(response: requests.Response | None, error: Exception | None) -> str:
    return f"HTTP {response.status_code}" if response is not None else type(error).__name__


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
