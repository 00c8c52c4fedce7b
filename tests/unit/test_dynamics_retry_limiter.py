"""The retry policy (what is retriable, how long to wait) and the AIMD limiter."""

from __future__ import annotations

import random

import pytest
import requests

from d365sync.dynamics import RetrySettings
from d365sync.dynamics.limiter import AdaptiveLimiter
from d365sync.dynamics.retry import RetryPolicy, Verdict, classify, retry_after_seconds


def _response(status: int, headers: dict[str, str] | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    return response


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.OK),
        (204, Verdict.OK),
        (429, Verdict.THROTTLED),
        (401, Verdict.UNAUTHORIZED),
        (500, Verdict.TRANSIENT),
        (502, Verdict.TRANSIENT),
        (503, Verdict.TRANSIENT),
        (504, Verdict.TRANSIENT),
        (400, Verdict.FATAL),
        (404, Verdict.FATAL),
        (412, Verdict.FATAL),
    ],
)
def test_classify_statuses(status: int, verdict: Verdict) -> None:
    assert classify(_response(status)) is verdict


def test_classify_connection_errors_as_transient() -> None:
    assert classify(None, requests.ConnectionError("reset")) is Verdict.TRANSIENT
    assert classify(None, requests.ReadTimeout("slow")) is Verdict.TRANSIENT
    assert classify(None, requests.exceptions.InvalidURL("bad")) is Verdict.FATAL


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_throttle_wait_honours_retry_after_but_caps_it() -> None:
    policy = RetryPolicy(RetrySettings(retry_after_cap=30))
    assert policy.wait_for(Verdict.THROTTLED, 1, 12.0) == 12.0
    assert policy.wait_for(Verdict.THROTTLED, 1, 3600.0) == 30.0


def test_backoff_is_exponential_capped_and_jittered() -> None:
    settings = RetrySettings(backoff_base=1, backoff_cap=8, jitter=0.5)
    policy = RetryPolicy(settings, rng=random.Random(1))
    waits = [policy.wait_for(Verdict.TRANSIENT, attempt) for attempt in range(1, 7)]
    ceilings = [1, 2, 4, 8, 8, 8]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert len(set(waits[3:])) == 3  # jitter: capped waits still differ


def test_budget_limits_attempts_and_total_time() -> None:
    now = [100.0]
    policy = RetryPolicy(RetrySettings(max_attempts=3, max_total_seconds=10), clock=lambda: now[0])
    assert policy.may_retry(1, 100.0, 5)
    assert not policy.may_retry(3, 100.0, 0)
    now[0] = 106.0
    assert not policy.may_retry(1, 100.0, 5)


def test_limiter_halves_on_throttle_and_recovers_slowly() -> None:
    limiter = AdaptiveLimiter(max_limit=8, recovery=3)
    limiter.on_throttle()
    limiter.on_throttle()
    assert limiter.limit == 2
    for _ in range(3):
        limiter.on_success()
    assert limiter.limit == 3
    for _ in range(100):
        limiter.on_success()
    assert limiter.limit == 8
    for _ in range(10):
        limiter.on_throttle()
    assert limiter.limit == 1


def test_limiter_slots_block_beyond_the_limit() -> None:
    limiter = AdaptiveLimiter(max_limit=1)
    with limiter.slot():
        assert limiter._in_flight == 1
    assert limiter._in_flight == 0


def test_a_throttle_pauses_every_new_request() -> None:
    now, slept = [50.0], []
    limiter = AdaptiveLimiter(max_limit=4, sleep=slept.append, clock=lambda: now[0])
    limiter.on_throttle(pause=5)
    now[0] += 2
    with limiter.slot():
        pass
    assert slept == [3.0]
    now[0] += 3
    with limiter.slot():
        pass
    assert slept == [3.0]
