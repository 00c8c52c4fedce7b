"""Typed, validated configuration for the Dataverse client.

Everything is checked before any network I/O so a bad Airflow connection fails with a message
that names the field, instead of a confusing HTTP error minutes into a run.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
MAX_PAGE_SIZE = 5000  # Dataverse's hard maximum for odata.maxpagesize
MAX_BATCH_SIZE = 1000  # Dataverse's limit of requests per $batch


class DynamicsConfigError(ValueError):
    """A configuration value is missing or out of range (raised before any I/O)."""


@dataclass(frozen=True)
class RetrySettings:
    """How hard to try before giving up; shared by every request the client makes."""

    max_attempts: int = 8
    max_total_seconds: float = 900.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    retry_after_cap: float = 300.0
    jitter: float = 0.5  # fraction of each backoff wait that is randomised

    def __post_init__(self) -> None:
        _require(self.max_attempts >= 1, "retry.max_attempts must be >= 1")
        _require(self.max_total_seconds > 0, "retry.max_total_seconds must be > 0")
        _require(self.backoff_base >= 0, "retry.backoff_base must be >= 0")
        _require(self.backoff_cap >= self.backoff_base, "retry.backoff_cap must be >= backoff_base")
        _require(self.retry_after_cap >= 0, "retry.retry_after_cap must be >= 0")
        _require(0 <= self.jitter <= 1, "retry.jitter must be between 0 and 1")


@dataclass(frozen=True)
class DynamicsConfig:
    """Connection settings for one Dataverse environment, validated on construction."""

    environment_url: str
    tenant_id: str
    client_id: str
    client_secret: str = field(repr=False)
    authority_host: str = DEFAULT_AUTHORITY_HOST
    api_version: str = "v9.2"
    verify: bool | str = True  # True, False, or a CA bundle path
    page_size: int = MAX_PAGE_SIZE
    batch_size: int = MAX_BATCH_SIZE
    max_concurrency: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    token_refresh_skew: float = 300.0  # refresh when less than this many seconds are left
    adaptive_recovery: int = 20  # successes needed before the limiter grows by one slot
    retry: RetrySettings = field(default_factory=RetrySettings)
    # Host names besides loopback that may be reached over plain http:// (a sandbox on a private
    # container network, such as ``dataverse`` in docker-compose; "a, b" is accepted too).
    plain_http_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        raw = self.plain_http_hosts  # a connection extra may give "a, b"
        items = raw.split(",") if isinstance(raw, str) else raw
        hosts = tuple(h.strip().lower() for h in items if h.strip())
        object.__setattr__(self, "plain_http_hosts", hosts)
        for name in ("environment_url", "authority_host"):
            object.__setattr__(self, name, _normalise_url(getattr(self, name), name, hosts))
        for name in ("tenant_id", "client_id", "client_secret"):
            _require(bool(getattr(self, name)), f"{name} is required")
        _require(self.api_version.startswith("v"), "api_version must look like 'v9.2'")
        _require(1 <= self.page_size <= MAX_PAGE_SIZE, f"page_size must be 1..{MAX_PAGE_SIZE}")
        _require(1 <= self.batch_size <= MAX_BATCH_SIZE, f"batch_size must be 1..{MAX_BATCH_SIZE}")
        _require(1 <= self.max_concurrency <= 52, "max_concurrency must be 1..52 (Dataverse limit)")
        _require(self.connect_timeout > 0 and self.read_timeout > 0, "timeouts must be > 0")
        _require(self.token_refresh_skew >= 0, "token_refresh_skew must be >= 0")
        _require(self.adaptive_recovery >= 1, "adaptive_recovery must be >= 1")

    @property
    def api_url(self) -> str:
        return f"{self.environment_url}/api/data/{self.api_version}"

    @property
    def authority(self) -> str:
        return f"{self.authority_host}/{self.tenant_id}"

    @property
    def scope(self) -> str:
        return f"{self.environment_url}/.default"

    @property
    def is_microsoft_authority(self) -> bool:
        return urlsplit(self.authority_host).hostname == urlsplit(DEFAULT_AUTHORITY_HOST).hostname

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)


def _normalise_url(value: str, name: str, plain_http_hosts: tuple[str, ...] = ()) -> str:
    parts = urlsplit(value or "")
    _require(parts.scheme in {"http", "https"} and bool(parts.netloc), f"{name} must be an http(s) URL")
    _require(
        parts.scheme == "https" or plain_http_allowed(value, plain_http_hosts),
        f"{name} must be an https:// URL: plain http:// would send the client secret and tokens "
        "in clear; it is accepted only for a loopback host (127.0.0.1, ::1, localhost) or a host "
        "listed in plain_http_hosts",
    )
    return value.rstrip("/")


def plain_http_allowed(url: str, plain_http_hosts: tuple[str, ...] = ()) -> bool:
    """Whether ``url`` may be used without TLS: loopback, or a host the deployment listed."""
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return False
    if host == "localhost" or host in plain_http_hosts:
        return bool(host)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DynamicsConfigError(message)
