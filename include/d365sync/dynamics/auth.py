"""Client-credentials tokens through MSAL, refreshed ahead of expiry.

MSAL keeps its own cache (and treats tokens with < 5 min left as expired); this wrapper adds
a configurable refresh skew, a way to drop a token the API rejected (401), a counter of real
acquisitions, and errors that name the tenant and client but never the secret.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msal
import requests

from d365sync.dynamics.config import DynamicsConfig, plain_http_allowed
from d365sync.dynamics.counters import Counters
from d365sync.dynamics.errors import DynamicsAuthError

log = logging.getLogger(__name__)
_TRACE = re.compile(r"\s+Trace ID:")  # Entra appends trace/correlation ids and a timestamp


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: float  # monotonic-ish wall time after which we fetch a new one


class TokenProvider:
    """Hands out a bearer token for the environment's ``/.default`` scope."""

    def __init__(
        self,
        config: DynamicsConfig,
        http_client: requests.Session,
        counters: Counters,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._http = http_client
        self._counters = counters
        self._clock = clock
        self._app: msal.ConfidentialClientApplication | PlainHttpTokenClient | None = None
        self._token: _Token | None = None
        self._lock = threading.Lock()

    def token(self) -> str:
        with self._lock:
            if self._token is None or self._clock() >= self._token.refresh_at:
                self._token = self._acquire()
            return self._token.value

    def invalidate(self, rejected: str | None = None) -> None:
        """Forget a token the API refused, in our cache and MSAL's, so the next call fetches anew."""
        with self._lock:
            if rejected is None or (self._token is not None and self._token.value == rejected):
                self._token = None
                self._drop_msal_tokens()

    def _acquire(self) -> _Token:
        self._drop_msal_tokens()  # we decided it is time; MSAL's own 5-minute rule may disagree
        result = self._application().acquire_token_for_client(scopes=[self._config.scope])
        if "access_token" not in result:
            raise self._auth_error(result)
        self._counters.add(token_acquisitions=1)
        lifetime = float(result.get("expires_in") or 3600)
        skew = min(self._config.token_refresh_skew, lifetime / 2)
        log.info("Acquired a Dataverse token for client %s (valid %.0fs)", self._config.client_id, lifetime)
        return _Token(result["access_token"], self._clock() + lifetime - skew)

    def _application(self) -> msal.ConfidentialClientApplication | PlainHttpTokenClient:
        if self._app is None:
            if self._config.authority.startswith("http://"):
                self._app = PlainHttpTokenClient(self._config, self._http)
            else:
                self._app = self._build_application()
        return self._app

    def _build_application(self) -> msal.ConfidentialClientApplication:
        try:
            return msal.ConfidentialClientApplication(
                self._config.client_id,
                client_credential=self._config.client_secret,
                authority=self._config.authority,
                http_client=self._http,
                instance_discovery=None if self._config.is_microsoft_authority else False,
                timeout=self._config.connect_timeout + self._config.read_timeout,
            )
        except (ValueError, requests.RequestException) as exc:
            raise DynamicsAuthError(
                f"{self._who()}: authority is unusable: {_scrub(str(exc), self)}"
            ) from None

    def _drop_msal_tokens(self) -> None:
        if not isinstance(self._app, msal.ConfidentialClientApplication):
            return
        cache = self._app.token_cache
        for entry in list(cache.search(cache.CredentialType.ACCESS_TOKEN)):
            cache.remove_at(entry)

    def _auth_error(self, result: dict[str, object]) -> DynamicsAuthError:
        error = result.get("error", "unknown_error")
        description = str(result.get("error_description") or "")
        detail = _scrub(_TRACE.split(description, maxsplit=1)[0].strip(), self)
        return DynamicsAuthError(f"{self._who()}: token request failed: {error}: {detail}".rstrip(": "))

    def _who(self) -> str:
        return (
            f"Dataverse authentication for client id {self._config.client_id} "
            f"in tenant {self._config.tenant_id} at {self._config.authority_host}"
        )


def _scrub(text: str, provider: TokenProvider) -> str:
    """Belt and braces: never let the secret through, even if a server echoes it."""
    secret = provider._config.client_secret
    return text.replace(secret, "***") if secret else text


class PlainHttpTokenClient:
    """The client-credentials grant over plain ``http://`` (local sandboxes only).

    MSAL refuses non-HTTPS authorities, and a real Entra authority is always HTTPS, so this is
    never used against Microsoft. It posts the same form MSAL would and returns MSAL's result
    shape, so :class:`TokenProvider` treats both alike.
    """

    def __init__(self, config: DynamicsConfig, session: requests.Session) -> None:
        if not plain_http_allowed(config.authority, config.plain_http_hosts):
            # DynamicsConfig already refuses this; checked again where the secret is posted.
            raise DynamicsAuthError(
                "authority_host must be an https:// URL: plain http:// is accepted only for a "
                "loopback host or a host listed in plain_http_hosts"
            )
        self._config = config
        self._session = session

    def acquire_token_for_client(self, scopes: list[str]) -> dict[str, Any]:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._config.client_id,
            "client_secret": self._config.client_secret,
            "scope": " ".join(scopes),
        }
        url = f"{self._config.authority}/oauth2/v2.0/token"
        try:
            with self._session.post(url, data=form, timeout=self._config.timeout) as response:
                payload = response.json()
        except (requests.RequestException, ValueError) as exc:
            return {"error": "token_endpoint_unreachable", "error_description": type(exc).__name__}
        return payload if isinstance(payload, dict) else {"error": "invalid_token_response"}
