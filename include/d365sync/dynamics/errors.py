"""Exceptions raised by the Dataverse client.

Messages carry what an operator needs (status, Dataverse code, method and URL) and never
secrets, tokens or request bodies, so they are safe to land in Airflow task logs.
"""

from __future__ import annotations

import re
from typing import Any

# Dataverse's message when a delta token is older than the change-tracking retention.
EXPIRED_VERSION_STAMP = "Version stamp associated with the client has expired"

_QUERY = re.compile(r"\?.*$")


class DynamicsError(Exception):
    """Base class of everything the client raises on purpose."""


class DynamicsAuthError(DynamicsError):
    """A token could not be obtained (wrong secret, unknown tenant, unreachable authority)."""


class PagingLoopError(DynamicsError):
    """The server handed back a nextLink it had already sent: following it would never end."""


class DynamicsApiError(DynamicsError):
    """A Web API request failed with a non-retriable status or ran out of retries."""

    def __init__(self, status: int, code: str, message: str, method: str, url: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.method = method
        self.url = url
        super().__init__(f"{method} {redact_url(url)} -> {status} {code or '(no code)'}: {message}")

    @property
    def is_expired_delta_token(self) -> bool:
        return EXPIRED_VERSION_STAMP.lower() in self.message.lower()

    @property
    def is_precondition_failed(self) -> bool:
        return self.status == 412


def parse_error_body(payload: Any) -> tuple[str, str]:
    """Return (code, message) from a Dataverse ``{"error": {...}}`` body, tolerating junk."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return "", ""
    return str(error.get("code") or ""), str(error.get("message") or "")


def redact_url(url: str) -> str:
    """Drop the query string: filters and skip tokens can hold customer data."""
    return _QUERY.sub("?…", url) if "?" in url else url


class ConcurrencyConflict(DynamicsApiError):
    """412 Precondition Failed: the row changed since the ETag the caller holds was read."""

    @classmethod
    def from_error(cls, error: DynamicsApiError) -> ConcurrencyConflict:
        return cls(error.status, error.code, error.message, error.method, error.url)
