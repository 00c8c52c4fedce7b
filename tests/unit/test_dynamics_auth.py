"""TokenProvider: refresh ahead of expiry, drop rejected tokens, secret-free errors.

MSAL's application class is replaced by a recorder; the real exchange is covered by the
integration tests against the sandbox's token endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from d365sync.dynamics import Counters, DynamicsAuthError, DynamicsConfig
from d365sync.dynamics import auth as auth_module
from d365sync.dynamics.auth import TokenProvider

SECRET = "super-secret-value"


class FakeApp:
    instances: list[FakeApp] = []
    result: dict[str, Any] = {}

    def __init__(self, client_id: str, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls = 0
        self.token_cache = FakeCache()
        FakeApp.instances.append(self)

    def acquire_token_for_client(self, scopes: list[str]) -> dict[str, Any]:
        self.calls += 1
        self.scopes = scopes
        return (
            {**FakeApp.result, "access_token": f"at{self.calls}"}
            if "error" not in FakeApp.result
            else FakeApp.result
        )


class FakeCache:
    class CredentialType:
        ACCESS_TOKEN = "AccessToken"

    def search(self, kind: str) -> list[dict[str, str]]:
        return []


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TokenProvider, list[float]]]:
    FakeApp.instances, FakeApp.result = [], {"expires_in": 3600}
    monkeypatch.setattr(auth_module.msal, "ConfidentialClientApplication", FakeApp)
    config = DynamicsConfig(
        environment_url="https://127.0.0.1:9/",
        tenant_id="tenant-1",
        client_id="client-1",
        client_secret=SECRET,
        authority_host="https://127.0.0.1:9",
        token_refresh_skew=300,
    )
    now = [1000.0]
    session = requests.Session()
    yield TokenProvider(config, session, Counters(), clock=lambda: now[0]), now
    session.close()


def test_token_is_cached_until_the_refresh_skew(provider: Any) -> None:
    tokens, now = provider
    assert tokens.token() == "at1"
    app = FakeApp.instances[0]
    assert app.kwargs["instance_discovery"] is False  # a non-Microsoft authority
    assert app.kwargs["authority"] == "https://127.0.0.1:9/tenant-1"
    assert app.scopes == ["https://127.0.0.1:9/.default"]
    now[0] += 3600 - 301
    assert tokens.token() == "at1"
    now[0] += 2
    assert tokens.token() == "at2"
    assert tokens._counters.token_acquisitions == 2


def test_short_lived_tokens_refresh_at_half_life(provider: Any) -> None:
    tokens, now = provider
    FakeApp.result = {"expires_in": 60}
    tokens.token()
    now[0] += 29
    assert tokens.token() == "at1"
    now[0] += 2
    assert tokens.token() == "at2"


def test_invalidate_only_drops_the_rejected_token(provider: Any) -> None:
    tokens, _ = provider
    tokens.token()
    tokens.invalidate("some-older-token")
    assert tokens.token() == "at1"
    tokens.invalidate("at1")
    assert tokens.token() == "at2"


def test_auth_error_names_tenant_client_and_aadsts_but_not_the_secret(provider: Any) -> None:
    tokens, _ = provider
    FakeApp.result = {
        "error": "invalid_client",
        "error_description": f"AADSTS7000215: Invalid client secret provided ({SECRET}).\nTrace ID: x",
    }
    with pytest.raises(DynamicsAuthError) as info:
        tokens.token()
    message = str(info.value)
    assert "tenant-1" in message and "client-1" in message and "AADSTS7000215" in message
    assert SECRET not in message and "Trace ID" not in message
