"""The requests backend's runner on its own: what no download can show from outside."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from typing import Any

import pytest

from fetchpool.steps import Sleep
from fetchpool.workers import Workers


@pytest.mark.timeout(30)
def test_a_cancel_just_before_a_wait_is_parked_ends_it() -> None:
    workers = Workers(2, transport=None)  # type: ignore[arg-type]
    other = threading.Event()
    sleeping = threading.Event()

    def long_sleeper() -> Generator[Any, Any, str]:
        sleeping.set()
        yield Sleep(30, other)  # keeps the timer thread alive
        return "other"

    cancel = threading.Event()
    checked = threading.Event()

    def racer() -> Generator[Any, Any, str]:
        assert not cancel.is_set()  # what the retry policy's stop() looks at
        checked.set()
        time.sleep(0.3)  # the cancel and the wake-up land here
        yield Sleep(20, cancel)
        return "racer"

    first = workers.submit(long_sleeper)
    assert sleeping.wait(10)
    racing = workers.submit(racer)
    assert checked.wait(10)
    cancel.set()
    workers.wake()
    assert racing.result(timeout=10) == "racer"
    other.set()
    workers.wake()
    assert first.result(timeout=10) == "other"
    workers.shutdown()


@pytest.mark.timeout(30)
def test_a_download_whose_steps_cannot_be_made_fails_alone() -> None:
    workers = Workers(1, transport=None)  # type: ignore[arg-type]

    def broken() -> Generator[Any, Any, str]:
        raise MemoryError("no room")

    def fine() -> Generator[Any, Any, str]:
        return "ok"
        yield  # pragma: no cover - makes it a generator

    failed = workers.submit(broken)
    after = workers.submit(fine)
    with pytest.raises(MemoryError):
        failed.result(timeout=10)
    assert after.result(timeout=10) == "ok"
    workers.shutdown(wait=True)
