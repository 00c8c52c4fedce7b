"""Airflow-free Dataverse (Dynamics 365) Web API client built on requests and MSAL."""

from __future__ import annotations

from d365sync.dynamics.changes import Change, ChangeFeed
from d365sync.dynamics.client import DynamicsClient
from d365sync.dynamics.config import DynamicsConfig, DynamicsConfigError, RetrySettings
from d365sync.dynamics.counters import Counters
from d365sync.dynamics.errors import (
    ConcurrencyConflict,
    DynamicsApiError,
    DynamicsAuthError,
    DynamicsError,
    PagingLoopError,
)
from d365sync.dynamics.upsert import UpsertOutcome

__all__ = [
    "Change",
    "ChangeFeed",
    "ConcurrencyConflict",
    "Counters",
    "DynamicsApiError",
    "DynamicsAuthError",
    "DynamicsClient",
    "DynamicsConfig",
    "DynamicsConfigError",
    "DynamicsError",
    "PagingLoopError",
    "RetrySettings",
    "UpsertOutcome",
]
