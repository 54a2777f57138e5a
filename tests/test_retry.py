"""RetryPolicy, Retry-After parsing and which failures count as healable."""

from __future__ import annotations

import email.utils
import random
import threading

import pytest

from fetchpool import HTTPStatusError, NotAnImageError, RetryPolicy, TooLargeError, TransferError
from fetchpool.retry import (
    RETRY_STATUSES,
    call_with_retries,
    instant_retries,
    is_retryable,
    parse_retry_after,
)


def test_defaults_match_the_contract() -> None:
    p = RetryPolicy()
    assert (p.attempts, p.wait_initial, p.wait_max, p.jitter, p.retry_after_cap, p.budget) == (
        4,
        0.5,
        30.0,
        1.0,
        60.0,
        300.0,
    )


def test_policy_is_frozen_and_coerces_int() -> None:
    p = RetryPolicy()
    with pytest.raises(AttributeError):
        p.attempts = 9  # type: ignore[misc]
    assert RetryPolicy.coerce(2) == RetryPolicy(attempts=2)
    assert RetryPolicy.coerce(p) is p
    with pytest.raises(TypeError):
        RetryPolicy.coerce(True)
    with pytest.raises(TypeError):
        RetryPolicy.coerce("3")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"wait_initial": -1},
        {"budget": float("inf")},
        {"jitter": float("nan")},
        {"wait_max": 1e10},
    ],
)
def test_policy_rejects_bad_numbers(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_backoff_is_exponential_capped_and_jittered() -> None:
    p = RetryPolicy(wait_initial=0.5, wait_max=3.0, jitter=0.0)
    assert [p.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    j = RetryPolicy(wait_initial=1.0, wait_max=10.0, jitter=1.0)
    rng = random.Random(1)
    waits = [j.backoff(1, rng) for _ in range(200)]
    assert all(1.0 <= w <= 2.0 for w in waits)
    assert len(set(waits)) > 100
    assert RetryPolicy(wait_initial=1, wait_max=5, jitter=0).backoff(10_000) == 5


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 7 ", now) == 7.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now) == 0.0
    for junk in (None, "", "soon", "-5", "1.5", "Wed, 99 Foo 2020"):
        assert parse_retry_after(junk, now) is None


def test_what_is_retryable() -> None:
    for status in (408, 425, 429, 500, 502, 503, 504):
        assert status in RETRY_STATUSES
        assert is_retryable(HTTPStatusError("x", status_code=status))
    for status in (400, 401, 403, 404, 410, 451, 501):
        assert not is_retryable(HTTPStatusError("x", status_code=status))
    assert is_retryable(TransferError("reset"))
    assert not is_retryable(TransferError("malformed", retryable=False))
    assert not is_retryable(TooLargeError("big"))
    assert not is_retryable(NotAnImageError("html"))


def _failing(errors: list[BaseException]) -> tuple[list[int], object]:
    calls: list[int] = []

    def attempt(number: int, time_left: float) -> str:
        calls.append(number)
        if errors:
            raise errors.pop(0)
        return "ok"

    return calls, attempt


def test_retries_until_success_with_recorded_waits() -> None:
    calls, attempt = _failing([TransferError("a"), HTTPStatusError("b", status_code=503)])
    policy = RetryPolicy(attempts=4, wait_initial=1.0, wait_max=8.0, jitter=0.0)
    with instant_retries() as waits:
        assert call_with_retries(policy, attempt, cancel=threading.Event()) == "ok"  # type: ignore[arg-type]
    assert calls == [1, 2, 3]
    assert waits == [1.0, 2.0]


def test_stops_after_attempts_and_reraises_last_error() -> None:
    errors: list[BaseException] = [TransferError(str(i)) for i in range(10)]
    calls, attempt = _failing(errors)
    with instant_retries(), pytest.raises(TransferError, match="2"):
        call_with_retries(RetryPolicy(attempts=3), attempt, cancel=threading.Event())  # type: ignore[arg-type]
    assert calls == [1, 2, 3]


def test_non_retryable_is_not_retried() -> None:
    calls, attempt = _failing([HTTPStatusError("404", status_code=404)])
    with instant_retries() as waits, pytest.raises(HTTPStatusError):
        call_with_retries(RetryPolicy(), attempt, cancel=threading.Event())  # type: ignore[arg-type]
    assert calls == [1]
    assert waits == []


def test_retry_after_is_honoured_and_a_huge_one_stops_at_once() -> None:
    calls, attempt = _failing([HTTPStatusError("429", status_code=429, retry_after=12.0)])
    with instant_retries() as waits:
        call_with_retries(RetryPolicy(), attempt, cancel=threading.Event())  # type: ignore[arg-type]
    assert waits == [12.0]
    huge = HTTPStatusError("503", status_code=503, retry_after=86_400.0)
    calls, attempt = _failing([huge])
    with instant_retries() as waits, pytest.raises(HTTPStatusError):
        call_with_retries(RetryPolicy(), attempt, cancel=threading.Event())  # type: ignore[arg-type]
    assert calls == [1]
    assert waits == []


def test_budget_bounds_attempts_and_waits() -> None:
    errors: list[BaseException] = [TransferError("x") for _ in range(50)]
    calls, attempt = _failing(errors)
    policy = RetryPolicy(attempts=50, wait_initial=10.0, wait_max=10.0, jitter=0.0, budget=35.0)
    with instant_retries() as waits, pytest.raises(TransferError):
        call_with_retries(policy, attempt, cancel=threading.Event())  # type: ignore[arg-type]
    assert waits == [10.0, 10.0, 10.0]
    assert calls == [1, 2, 3, 4]


def test_cancel_stops_retrying() -> None:
    cancel = threading.Event()
    cancel.set()
    calls, attempt = _failing([TransferError("x"), TransferError("y")])
    with instant_retries(), pytest.raises(TransferError):
        call_with_retries(RetryPolicy(), attempt, cancel=cancel)  # type: ignore[arg-type]
    assert calls == [1]
