"""Waits that hold no worker: a retry's wait and a lock another writer holds.

A download waiting out its backoff or ``Retry-After``, or waiting for a lock held
elsewhere, gives its worker to the next download and is taken up again when its wait
ends, before any download not yet started.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import as_completed
from pathlib import Path

import pytest

from _support import listing, lock_held_elsewhere, temp_files
from fetchpool import Downloader, ProgressEvent, RetryPolicy, download_all
from fetchpool.testing import ImageServer

pytestmark = pytest.mark.usefixtures("each_backend")

_names = iter(range(1_000_000))


def uniq(stem: str) -> str:
    return f"{stem}{next(_names)}-{time.monotonic_ns()}.png"


@pytest.fixture
def server() -> ImageServer:
    with ImageServer(n_images=0) as s:
        yield s  # type: ignore[misc]


@pytest.mark.timeout(60)
def test_a_retry_wait_gives_its_worker_to_the_next_download(
    server: ImageServer, dest: Path
) -> None:
    # Two workers, both first taken by downloads that must wait a second before their
    # second attempt: the plain ones behind them run meanwhile.
    flaky = [server.url(f"/fail/1/503/{uniq('f')}?retry_after=1") for _ in range(2)]
    plain = [server.url(f"/any/{uniq('p')}") for _ in range(4)]
    order: list[str] = []
    with Downloader(dest, workers=2) as dl:
        futures = [dl.submit(u) for u in flaky + plain]
        for future in as_completed(futures):
            result = future.result()
            assert result.ok, result.error
            order.append(result.url)
    assert set(order[:4]) == set(plain)
    results = {f.result().url: f.result() for f in futures}
    assert [results[u].attempts for u in flaky] == [2, 2]


@pytest.mark.timeout(60)
def test_a_woken_retry_goes_before_downloads_not_started(server: ImageServer, dest: Path) -> None:
    # One worker: a short wait, then many slow downloads queued behind it. When its wait
    # ends, the retry is taken up next, not after every queued download.
    server.latency = 0.05
    flaky = server.url(f"/fail/1/503/{uniq('f')}")
    queued = [server.url(f"/any/{uniq('q')}") for _ in range(20)]
    order: list[str] = []
    with Downloader(dest, workers=1, retry=RetryPolicy(wait_initial=0.2, jitter=0)) as dl:
        futures = [dl.submit(u) for u in [flaky, *queued]]
        order.extend(future.result().url for future in as_completed(futures))
    assert all(f.result().ok for f in futures)
    # 0.2 s of waiting is 4 downloads of 50 ms: it must not come last (after 1 s).
    assert order.index(flaky) < 12, order.index(flaky)


@pytest.mark.timeout(60)
def test_repeats_of_a_retrying_url_do_not_wait_for_each_other_forever(
    server: ImageServer, dest: Path
) -> None:
    # The first holds the file's lock while it waits to retry; its repeats wait for that
    # lock. None of them may keep the first from being taken up again.
    url = server.url(f"/fail/1/503/{uniq('r')}")
    with Downloader(dest, workers=2, retry=RetryPolicy(wait_initial=0.3, jitter=0)) as dl:
        results = list(dl.map([url] * 8))
    assert [r.status for r in results] == ["downloaded"] + ["skipped"] * 7
    assert listing(dest) == [url.rsplit("/", 1)[1].split("?")[0]]


@pytest.mark.timeout(60)
def test_a_lock_held_elsewhere_holds_no_worker(server: ImageServer, dest: Path) -> None:
    locked = server.url(f"/any/{uniq('l')}")
    others = [server.url(f"/any/{uniq('o')}") for _ in range(4)]
    name = locked.rsplit("/", 1)[1]
    with lock_held_elsewhere(dest, name) as release, Downloader(dest, workers=1) as dl:
        first = dl.submit(locked)
        rest = [dl.submit(u) for u in others]
        # With one worker, these finish only if the lock wait does not hold it.
        assert all(f.result(timeout=20).ok for f in rest)
        assert not first.done()
        release()
        assert first.result(timeout=20).ok
    assert temp_files(dest) == []


@pytest.mark.timeout(60)
def test_parked_waits_keep_order_attempts_and_progress(server: ImageServer, dest: Path) -> None:
    urls = [server.url(f"/fail/{i % 3}/503/{uniq('m')}") for i in range(12)]
    events: list[ProgressEvent] = []
    lock = threading.Lock()

    def progress(event: ProgressEvent) -> None:
        with lock:
            events.append(event)

    policy = RetryPolicy(wait_initial=0.1, jitter=0.1)
    results = download_all(urls, dest, workers=3, progress=progress, retry=policy)
    assert [r.url for r in results] == urls
    assert [r.attempts for r in results] == [1 + i % 3 for i in range(12)]
    assert all(r.ok for r in results)
    for url in urls:
        states = [e.state for e in events if e.url == url]
        assert states[0] == "started"
        assert states[-1] == "done"
        assert states.count("retrying") == urls.index(url) % 3


@pytest.mark.timeout(30)
def test_the_budget_still_bounds_a_parked_download(server: ImageServer, dest: Path) -> None:
    url = server.url(f"/status/503/{uniq('b')}?retry_after=1")
    started = time.monotonic()
    results = download_all(
        [url], dest, workers=1, retry=RetryPolicy(attempts=10, budget=2.5, wait_max=1)
    )
    assert not results[0].ok
    assert 2 <= results[0].attempts <= 3
    assert time.monotonic() - started < 10
