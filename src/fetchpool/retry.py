"""Retry policy: plain numbers in :class:`RetryPolicy`, executed by tenacity.

Only failures that can heal are retried (DESIGN rule 4): connection errors,
timeouts, truncated bodies and the statuses in :data:`RETRY_STATUSES`. A
``Retry-After`` is honoured up to the policy's cap; one beyond it ends the retries
at once. The whole download, attempts and waits together, stays within ``budget``.
"""

from __future__ import annotations

import math
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import tenacity

from .errors import ChecksumError, HTTPStatusError, TransferError
from .steps import Sleep, Steps, run

__all__ = [
    "MAX_SECONDS",
    "RETRY_STATUSES",
    "RetryPolicy",
    "call_with_retries",
    "is_retryable",
    "parse_retry_after",
    "retrying",
]

#: The longest time any option may name (about 31 years): beyond it, timers of the
#: platform overflow, and an attempt would fail with an internal error, not a clear one.
MAX_SECONDS = 1e9

T = TypeVar("T")

#: HTTP statuses that can heal on their own.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry one download.

    All values are seconds except ``attempts``. The wait before attempt ``n + 1`` is
    ``min(wait_max, wait_initial * 2 ** (n - 1))`` plus a random ``0..jitter``, or the
    server's ``Retry-After`` when it sends one.

    Args:
        attempts: total attempts, the first included (1 disables retries).
        wait_initial: the first backoff wait.
        wait_max: the longest backoff wait.
        jitter: the largest random extra added to a backoff wait.
        retry_after_cap: the longest ``Retry-After`` honoured; a longer one ends the
            retries with the ``HTTPStatusError``.
        budget: the total time for all attempts and waits of one download.

    Raises:
        ValueError: a negative or non-finite number, or ``attempts < 1``.
    """

    attempts: int = 4
    wait_initial: float = 0.5
    wait_max: float = 30.0
    jitter: float = 1.0
    retry_after_cap: float = 60.0
    budget: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"attempts must be an int, not {type(self.attempts).__name__}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        for name in ("wait_initial", "wait_max", "jitter", "retry_after_cap", "budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, not {type(value).__name__}")
            if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
                raise ValueError(
                    f"{name} must be >= 0 and at most {MAX_SECONDS:g} s, not {value!r}"
                )

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Return the backoff wait after failed attempt number ``attempt`` (1-based)."""
        base = min(float(self.wait_max), self.wait_initial * 2.0 ** min(attempt - 1, 62))
        extra = (rng or random).uniform(0, self.jitter) if self.jitter else 0.0
        return base + extra

    @classmethod
    def coerce(cls, value: RetryPolicy | int) -> RetryPolicy:
        """Return ``value`` as a policy: an ``int`` n means ``RetryPolicy(attempts=n)``.

        Raises:
            TypeError: neither a ``RetryPolicy`` nor an ``int``.
        """
        if isinstance(value, RetryPolicy):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(attempts=value)
        raise TypeError(f"retry must be a RetryPolicy or an int, not {type(value).__name__}")


def is_retryable(exc: BaseException) -> bool:
    """Return whether another attempt can cure ``exc`` (DESIGN rule 4)."""
    if isinstance(exc, TransferError | ChecksumError):
        return exc.retryable
    if isinstance(exc, HTTPStatusError):
        return exc.status_code in RETRY_STATUSES
    return False


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header (delay-seconds or HTTP-date) into seconds from now.

    Args:
        value: the header value, or ``None``.
        now: the current time as a POSIX timestamp (for tests); defaults to ``time.time()``.

    Returns:
        The delay in seconds (``0.0`` for a date in the past), or ``None`` when the
        header is absent or unparsable.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


class _Clock:
    """Where retries read the time and sleep; :func:`fetchpool.testing.instant_retries` swaps it."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.record: list[float] | None = None
        self.lock = threading.Lock()

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def sleep(self, seconds: float, cancel: threading.Event) -> None:
        record = self.record
        if record is None:
            cancel.wait(seconds)
            return
        with self.lock:
            record.append(seconds)
            self.offset += seconds


CLOCK = _Clock()


@contextmanager
def instant_retries() -> Iterator[list[float]]:
    """Make retry waits instant for the duration of the block (for tests).

    Waits are not slept but recorded, and the clock that the retry budget reads jumps
    ahead by each wait, so budget and ``Retry-After`` logic behave as in real time.

    Yields:
        The list of waits, in seconds, that would have been slept.
    """
    waits: list[float] = []
    previous = CLOCK.record
    CLOCK.record = waits
    try:
        yield waits
    finally:
        CLOCK.record = previous


def call_with_retries(
    policy: RetryPolicy,
    attempt: Callable[[int, float], T],
    *,
    cancel: threading.Event,
    before_retry: Callable[[BaseException, int, float], None] | None = None,
    start: float | None = None,
) -> T:
    """Run ``attempt(number, time_left)`` until it succeeds or retrying must stop.

    The blocking form of :func:`retrying`: waits are slept on this thread.
    """

    def step(number: int, time_left: float) -> Steps[T]:
        return attempt(number, time_left)
        yield  # type: ignore[unreachable]  # makes this a generator that waits on nothing

    return run(retrying(policy, step, cancel=cancel, before_retry=before_retry, start=start))


class _Retrying(tenacity.Retrying):
    """A ``Retrying`` whose state is its own, not its thread's.

    tenacity keeps ``statistics`` and ``iter_state`` in a ``threading.local``; the steps
    below may be resumed on another thread than the one that began them (the curl
    loop's downloads finish on fall-back threads when the loop stops), where tenacity
    would find them empty (``KeyError: 'idle_for'``).
    """

    @property
    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] | None = self.__dict__.get("_own_statistics")
        if stats is None:
            stats = self.__dict__["_own_statistics"] = {}
        return stats

    @property
    def iter_state(self) -> Any:
        state = self.__dict__.get("_own_iter_state")
        if state is None:
            state = self.__dict__["_own_iter_state"] = tenacity.IterState()
        return state


def retrying(
    policy: RetryPolicy,
    attempt: Callable[[int, float], Steps[T]],
    *,
    cancel: threading.Event,
    before_retry: Callable[[BaseException, int, float], None] | None = None,
    start: float | None = None,
    failed: Exception | None = None,
) -> Steps[T]:
    """Run the step ``attempt(number, time_left)`` until it succeeds or retrying must stop.

    ``time_left`` is what remains of the policy's budget, counted from ``start`` (a
    :data:`CLOCK` reading; default now); the attempt should not run longer. The last
    error is re-raised when retries stop. Waits are :class:`~fetchpool.steps.Sleep`
    steps: a driver with an event loop holds no thread while one passes.

    ``failed``: the retryable error of attempt 1, which the caller ran itself (its own
    fast path); the retries then go on from there, numbered and timed as they would.
    """
    if start is None:
        start = CLOCK.monotonic()

    def elapsed() -> float:
        return CLOCK.monotonic() - start

    # Most downloads succeed at once: run the first attempt directly, and involve tenacity
    # (whose bookkeeping costs a noticeable share of a small file's CPU time) only once
    # it failed. Tenacity's attempt 1 then replays that failure, so numbering, waits and
    # the budget are the same as if it had run the first attempt itself.
    if failed is None:
        try:
            return (yield from attempt(1, policy.budget - elapsed()))
        except Exception as exc:
            if policy.attempts <= 1 or not is_retryable(exc):
                raise
            failed = exc
    first = failed

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(retry_after)
        return policy.backoff(state.attempt_number)

    def stop(state: tenacity.RetryCallState) -> bool:
        if cancel.is_set() or state.attempt_number >= policy.attempts:
            return True
        return elapsed() + state.upcoming_sleep >= policy.budget

    def retry(state: tenacity.RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None or not is_retryable(exc):
            return False
        retry_after = getattr(exc, "retry_after", None)
        return retry_after is None or retry_after <= policy.retry_after_cap

    def notify(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if before_retry is not None and exc is not None:
            before_retry(exc, state.attempt_number, state.upcoming_sleep)

    retrying = _Retrying(stop=stop, wait=wait, retry=retry, before_sleep=notify, reraise=True)
    # Tenacity's own iteration sleeps inside it; driven by hand (as its __iter__ does),
    # the sleep is a step instead.
    retrying.begin()
    state = tenacity.RetryCallState(retrying, fn=None, args=(), kwargs={})
    while True:
        do = retrying.iter(retry_state=state)
        if isinstance(do, tenacity.DoAttempt):
            number = state.attempt_number
            try:
                if number == 1:
                    raise first
                result = yield from attempt(number, policy.budget - elapsed())
            except Exception:  # noqa: BLE001 - tenacity's retry decides
                state.set_exception(sys.exc_info())  # type: ignore[arg-type]
            else:
                state.set_result(result)
        elif isinstance(do, tenacity.DoSleep):
            state.prepare_for_next_attempt()
            yield Sleep(float(do), cancel)
        else:
            return do  # type: ignore[no-any-return]
