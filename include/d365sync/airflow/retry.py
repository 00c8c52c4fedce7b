"""What a task retry can fix, decided per exception (Airflow 3.3 ``retry_policy``).

Why not ``ExceptionRetryPolicy`` with dotted paths: it imports the exception classes, which
would drag the Dataverse client (msal) and GX into DAG parsing. Matching the names along the
exception's MRO needs no import and still catches subclasses.

* a bad spec, rejected credentials, a validation threshold exceeded, a user whose role may not
  run an operations DAG, Service Bus messages that are not Dataverse notifications → fail now;
* a Dataverse 429 that outlived the client's own Retry-After handling → retry after a long
  pause (the service-protection window), so a throttling storm cannot burn the retries in minutes;
* anything else → the task's exponential backoff.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import RetryAction, RetryDecision, RetryPolicy

NOT_RETRIABLE = frozenset(
    {
        "d365sync.spec.SpecError",
        "d365sync.dynamics.errors.DynamicsAuthError",
        "d365sync.engine.validation.ValidationFailed",
        "d365sync.engine.stages.prepare.RunValidationFailed",
        "d365sync.erp.errors.ErpSpecError",
        "d365sync.engine.connections.ConnectionConfigError",
        "d365sync.roles.AccessDenied",
        "d365sync.airflow.servicebus.RejectedMessages",
    }
)
THROTTLED_DELAY = timedelta(minutes=5)


def _names(exc: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__}


class SyncRetryPolicy(RetryPolicy):
    """Fail fast on errors a retry cannot fix; wait out throttling; back off on the rest."""

    def evaluate(
        self, exception: BaseException, try_number: int, max_tries: int, context: Any = None
    ) -> RetryDecision:
        if _names(exception) & NOT_RETRIABLE:
            return RetryDecision.fail(f"{type(exception).__name__}: a retry cannot fix this")
        if getattr(exception, "status", None) == 429:
            return RetryDecision.retry(THROTTLED_DELAY, "Dataverse throttling outlasted the client's retries")
        return RetryDecision(action=RetryAction.DEFAULT)

    def serialize(self) -> dict[str, Any]:
        return {"not_retriable": sorted(NOT_RETRIABLE), "throttled_delay": THROTTLED_DELAY.total_seconds()}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> SyncRetryPolicy:
        return cls()
