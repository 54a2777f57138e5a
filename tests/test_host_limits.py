"""Per-host limits: ``per_host``, ``rate`` and the pause a ``Retry-After`` imposes."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import as_completed
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from _support import listing, lock_held_elsewhere, temp_files
from fetchpool import Downloader, download_all
from fetchpool.cli import main
from fetchpool.hosts import HostLimits, Ticket, host_key
from fetchpool.testing import ImageServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limits(
    per_host: int | None = None, rate: float | None = None, cap: float = 60.0
) -> tuple[HostLimits[str], FakeClock]:
    clock = FakeClock()
    return HostLimits(per_host, rate, cap, clock), clock


def _queue(limits: HostLimits[str], *urls: str) -> dict[str, Ticket]:
    tickets = {}
    for url in urls:
        ticket = limits.ticket(url)
        assert ticket is not None
        limits.push(url, ticket)
        tickets[url] = ticket
    return tickets


def _pop_all(limits: HostLimits[str]) -> list[str]:
    popped = []
    while (item := limits.pop()) is not None:
        popped.append(item)
    return popped


# -- the limits alone ------------------------------------------------------------------


def test_host_key_is_scheme_host_and_port() -> None:
    assert host_key("http://Example.COM/a.png") == "http://example.com:80"
    assert host_key("https://example.com/a.png") == "https://example.com:443"
    assert host_key("http://user:pw@example.com:8080/x") == "http://example.com:8080"
    assert host_key("http://[::1]:81/x") == "http://[::1]:81"
    assert host_key("ftp://example.com/x") is None
    assert host_key("http://example.com:99999/x") is None
    assert host_key("not a url") is None
    assert host_key("http://example.com:\uff18\uff10/x") is None  # digits, but not ASCII
    assert host_key("http://example.com:/x") == "http://example.com:80"


def test_queue_starts_in_submit_order_while_the_host_has_room() -> None:
    limits, _ = _limits(per_host=2)
    tickets = _queue(
        limits, "http://a/1", "http://a/2", "http://a/3", "http://b/1", "http://a/4", "http://b/2"
    )
    # a is full after two: b's downloads are next, a's wait.
    assert _pop_all(limits) == ["http://a/1", "http://a/2", "http://b/1", "http://b/2"]
    assert len(limits) == 2
    tickets["http://a/1"].finish()
    assert _pop_all(limits) == ["http://a/3"]
    tickets["http://b/1"].finish()
    assert _pop_all(limits) == []  # b has nothing queued; a is full again
    tickets["http://a/2"].finish()
    assert _pop_all(limits) == ["http://a/4"]
    assert len(limits) == 0


def test_a_redirect_moves_the_slot_to_the_host_connected_to() -> None:
    limits, _ = _limits(per_host=1)
    tickets = _queue(limits, "http://a/1", "http://b/1", "http://a/2", "http://b/2")
    assert _pop_all(limits) == ["http://a/1", "http://b/1"]
    a1 = tickets["http://a/1"]
    assert a1.admit("http://a:80") == 0.0  # its own host: it holds the slot already
    # Redirected to b, whose one slot is taken: a1 waits holding nothing (so a's next
    # starts), and first in line for b (so b's next does not).
    assert a1.admit("http://b:80") == math.inf
    assert _pop_all(limits) == ["http://a/2"]
    tickets["http://b/1"].finish()
    assert _pop_all(limits) == []
    assert a1.admit("http://b:80") == 0.0
    a1.finish()
    assert _pop_all(limits) == ["http://b/2"]
    tickets["http://a/2"].finish()
    tickets["http://b/2"].finish()
    assert limits._hosts == {}  # idle hosts are forgotten


def test_rate_spaces_the_requests_to_a_host() -> None:
    limits, clock = _limits(rate=4.0)
    tickets = _queue(limits, "http://a/1", "http://a/2", "http://b/1")
    # One download of a host waits for its first turn at a time; b is not held up.
    assert _pop_all(limits) == ["http://a/1", "http://b/1"]
    a1 = tickets["http://a/1"]
    assert a1.admit("http://a:80") == 0.0
    assert _pop_all(limits) == ["http://a/2"]
    a2 = tickets["http://a/2"]
    assert a2.admit("http://a:80") == pytest.approx(0.25)
    clock.now += 0.1
    assert a2.admit("http://a:80") == pytest.approx(0.15)
    clock.now += 0.15
    assert a2.admit("http://a:80") == 0.0
    # A retry of a1 takes a turn too.
    assert a1.admit("http://a:80") == pytest.approx(0.25)


def test_a_pause_holds_the_host_for_everyone_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits, clock = _limits(per_host=4, cap=10.0)
    tickets = _queue(limits, "http://a/1", "http://a/2")
    assert _pop_all(limits) == ["http://a/1", "http://a/2"]
    with caplog.at_level(logging.WARNING, logger="fetchpool"):
        tickets["http://a/1"].pause("http://a:80", 30.0, 429)  # capped at 10
        tickets["http://a/2"].pause("http://a:80", 5.0, 503)  # within the pause
    assert [r.getMessage() for r in caplog.records] == [
        "http://a:80 answered 429 with Retry-After: pausing new requests to it for 10.0 s"
    ]
    assert tickets["http://a/2"].admit("http://a:80") == pytest.approx(10.0)
    assert tickets["http://a/1"].admit("http://b:80") == 0.0  # other hosts go on
    _queue(limits, "http://a/3", "http://c/1")
    assert _pop_all(limits) == ["http://c/1"]
    assert limits.next_check() == pytest.approx(clock.now + 10.0)
    clock.now += 10.0
    assert limits.has_ready()
    assert _pop_all(limits) == ["http://a/3"]
    assert tickets["http://a/2"].admit("http://a:80") == 0.0


def test_drain_gives_back_the_queue_in_submit_order() -> None:
    limits, _ = _limits(per_host=1)
    _queue(limits, "http://a/1", "http://a/2", "http://b/1", "http://a/3")
    assert limits.pop() == "http://a/1"
    assert limits.drain() == ["http://a/2", "http://b/1", "http://a/3"]
    assert limits.pop() is None
    assert len(limits) == 0


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"per_host": 0}, ValueError),
        ({"per_host": "2"}, TypeError),
        ({"per_host": True}, TypeError),
        ({"rate": 0}, ValueError),
        ({"rate": -1.0}, ValueError),
        ({"rate": float("inf")}, ValueError),
        ({"rate": float("nan")}, ValueError),
        ({"rate": True}, TypeError),
        ({"rate": "2"}, TypeError),
    ],
)
def test_bad_limits_are_refused_at_construction(
    dest: Path, options: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Downloader(dest, **options)  # type: ignore[arg-type]


# -- against real servers, both backends -------------------------------------------------


def completion_order(dest: Path, urls: list[str], **options: Any) -> list[str]:
    """Download ``urls`` (each must succeed); return them in the order they completed."""
    order: list[str] = []
    with Downloader(dest, **options) as dl:
        for future in as_completed([dl.submit(u) for u in urls]):
            result = future.result()
            assert result.ok, result.error
            order.append(result.url)
    return order


@pytest.fixture
def servers() -> Iterator[list[ImageServer]]:
    with ExitStack() as stack:
        yield [stack.enter_context(ImageServer(n_images=0)) for _ in range(5)]


def test_per_host_bounds_the_transfers_to_a_host(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    server = servers[0]
    server.latency = 0.1
    urls = [server.url(f"/any/{i}.png") for i in range(12)]
    results = download_all(urls, dest / "free", workers=6)
    assert all(r.ok for r in results)
    assert server.peak_concurrency >= 3  # what the limit below prevents
    server.reset_hits()
    results = download_all(urls, dest / "limited", workers=6, per_host=2)
    assert all(r.ok for r in results), results.failed
    assert server.peak_concurrency <= 2
    assert server.total_requests == 12


def test_a_slow_host_does_not_hold_up_the_others(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    slow, fast = servers[0], servers[1]
    slow.latency = 0.4
    slow_urls = [slow.url(f"/any/s{i}.png") for i in range(8)]
    fast_urls = [fast.url(f"/any/f{i}.png") for i in range(6)]
    order = completion_order(dest, slow_urls + fast_urls, workers=4, per_host=2)
    # The slow host has at most two workers: the fast host's downloads, submitted
    # behind all of the slow host's, finish on the other two before any slow one.
    assert set(order[: len(fast_urls)]) == set(fast_urls)
    assert slow.peak_concurrency <= 2


def test_rate_spaces_the_requests_to_one_host(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    server, other = servers[0], servers[1]
    urls = [server.url(f"/any/{i}.png") for i in range(8)]
    others = [other.url(f"/any/{i}.png") for i in range(8)]
    results = download_all(urls + others, dest, workers=8, rate=20.0)
    assert all(r.ok for r in results), results.failed
    times = server.request_times
    assert len(times) == 8
    # 8 requests at 20 per second span at least 7 intervals of 50 ms (the server sees
    # them a little later each, never sooner).
    assert times[-1] - times[0] >= 7 * 0.05 * 0.9
    # The other host has its own bucket: its 8 requests are not spaced by this one's.
    assert len(other.request_times) == 8


def test_a_retry_after_pauses_the_host_for_every_worker(
    each_backend: str,
    dest: Path,
    servers: list[ImageServer],
    caplog: pytest.LogCaptureFixture,
    waits: list[float],
) -> None:
    busy, other = servers[0], servers[1]
    caplog.set_level(logging.WARNING, logger="fetchpool")
    with Downloader(dest, workers=4, per_host=4) as dl:
        first = dl.submit(busy.url("/fail/1/429/first.png?retry_after=1"))
        deadline = time.monotonic() + 10
        while "pausing" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        paused_at = time.monotonic()
        assert "pausing new requests" in caplog.text
        later = [dl.submit(busy.url(f"/any/{i}.png")) for i in range(3)]
        elsewhere = [dl.submit(other.url(f"/any/{i}.png")) for i in range(3)]
        assert all(f.result().ok for f in [first, *later, *elsewhere])
    busy_times = busy.request_times
    # The 429, then nothing to that host until the second is over: the retry (its own
    # wait is instant here) and the three submitted meanwhile all waited for the pause.
    assert len(busy_times) == 5
    assert min(busy_times[1:]) >= paused_at + 0.8
    # The other host was not paused.
    assert max(other.request_times) < paused_at + 0.8
    assert caplog.text.count("pausing new requests") == 1
    assert first.result().attempts == 2


def test_a_redirect_counts_on_the_host_it_leads_to(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    target, origins = servers[0], servers[1:]
    target.latency = 0.15
    urls = [
        origin.url(f"/redirect-to?location={target.url(f'/any/{i}-{n}.png')}&n={i}-{n}")
        for i, origin in enumerate(origins)
        for n in range(2)
    ]
    results = download_all(urls, dest, workers=8, per_host=1)
    assert all(r.ok for r in results), results.failed
    # Four origin hosts, one download each at a time; all of them go to one host,
    # which sees them one at a time.
    assert target.peak_concurrency == 1
    assert target.total_requests == len(urls)


def test_cancel_ends_downloads_waiting_for_their_host(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    server = servers[0]
    server.latency = 0.5
    started = time.monotonic()
    dl = Downloader(dest, workers=4, per_host=1)
    futures = [dl.submit(server.url(f"/any/{i}.png")) for i in range(6)]
    # Wait until the first is at the server, then cancel the rest.
    while server.total_requests == 0 and time.monotonic() - started < 10:
        time.sleep(0.01)
    dl.close(cancel=True)
    results = [f.result() if not f.cancelled() else None for f in futures]
    assert sum(r is not None and r.ok for r in results) <= 1
    assert server.total_requests <= 2
    assert temp_files(dest) == []
    assert all(name.endswith(".png") for name in listing(dest))


def test_map_with_limits_keeps_input_order(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    a, b = servers[0], servers[1]
    a.latency = 0.05
    urls = [s.url(f"/any/{i}.png") for i in range(10) for s in (a, b)]
    with Downloader(dest, workers=4, per_host=1, rate=200.0) as dl:
        results = list(dl.map(urls))
    assert [r.url for r in results] == urls
    assert all(r.ok for r in results)
    assert a.peak_concurrency == 1


def test_a_thread_blocked_on_a_host_does_not_outlive_close(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    server = servers[0]
    before = threading.active_count()
    with Downloader(dest, workers=3, per_host=1, rate=50.0) as dl:
        results = list(dl.map(server.url(f"/any/{i}.png") for i in range(6)))
    assert all(r.ok for r in results)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


def test_cli_takes_per_host_and_rate(
    dest: Path, servers: list[ImageServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = servers[0]
    server.latency = 0.05
    urls = [server.url(f"/any/{i}.png") for i in range(6)]
    code = main([*urls, "-d", str(dest), "-w", "6", "--per-host", "2", "--rate", "100", "-q"])
    assert code == 0
    assert len(listing(dest)) == 6
    assert server.peak_concurrency <= 2
    assert main([*urls, "-d", str(dest), "--per-host", "0"]) == 2
    assert "--per-host" in capsys.readouterr().err


def test_a_429_storm_on_one_host_leaves_another_at_full_speed(
    each_backend: str,
    dest: Path,
    servers: list[ImageServer],
    caplog: pytest.LogCaptureFixture,
    waits: list[float],
) -> None:
    stormy, calm = servers[0], servers[1]
    caplog.set_level(logging.WARNING, logger="fetchpool")
    # Every URL of the stormy host answers 429 (Retry-After: 1) before its image; they
    # come first in the list and would take every worker without the limits.
    storm = [stormy.url(f"/fail/1/429/s{i}.png?retry_after=1") for i in range(6)]
    plain = [calm.url(f"/any/c{i}.png") for i in range(12)]
    order = completion_order(dest, storm + plain, workers=4, per_host=2)
    assert set(order[: len(plain)]) == set(plain)
    times = sorted(stormy.request_times)
    assert max(calm.request_times) < times[0] + 1.0
    # Two at once on the stormy host, both answered 429: nothing more to it until the
    # pause is over.
    assert times[2] >= times[0] + 0.8
    # Logged once per pause (see the unit test above), never once per 429 and worker.
    assert 1 <= caplog.text.count("pausing new requests") <= stormy.total_requests - 6


@pytest.mark.timeout(60)
def test_downloads_redirected_to_each_others_host_do_not_deadlock(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    x, y = servers[0], servers[1]
    x.latency = y.latency = 0.2  # both reach their redirect at about the same time
    a = x.url("/redirect-to?location=" + y.url("/any/a.png") + "&n=a")
    b = y.url("/redirect-to?location=" + x.url("/any/b.png") + "&n=b")
    with Downloader(dest, workers=4, per_host=1) as dl:
        futures = [dl.submit(a), dl.submit(b)]
        # Each holds its own host and needs the other's: neither may wait holding it.
        results = [f.result(timeout=20) for f in futures]
    assert all(r.ok for r in results), [r.error for r in results]


@pytest.mark.timeout(60)
def test_a_download_waiting_at_a_hop_goes_before_queued_ones(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    x, y = servers[0], servers[1]
    x.latency = 0.05
    first = [x.url(f"/any/first{i}.png") for i in range(2)]
    hop = y.url("/redirect-to?location=" + x.url("/any/hop.png") + "&n=hop")
    later = [x.url(f"/any/later{i}.png") for i in range(20)]
    order: list[str] = []
    with Downloader(dest, workers=4, per_host=1) as dl:
        futures = [dl.submit(u) for u in [*first, hop, *later]]
        order.extend(f.result().url for f in as_completed(futures))
    # Under way already, it waits for x's one slot first in line, not behind 20 others.
    assert order.index(hop) < 6, order.index(hop)


@pytest.mark.timeout(60)
def test_a_short_pause_does_not_wait_out_a_longer_one_elsewhere(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    a, b = servers[0], servers[1]
    with Downloader(dest, workers=2, per_host=4, retry=1) as dl:
        assert not dl.submit(a.url("/status/503/a1.png?retry_after=5")).result().ok
        a2 = dl.submit(a.url("/any/a2.png"))
        assert not dl.submit(b.url("/status/503/b1.png?retry_after=1")).result().ok
        b2 = dl.submit(b.url("/any/b2.png"))
        done = next(as_completed([a2, b2]))
        assert done is b2
        assert b2.result().ok
        assert a2.result().ok


@pytest.mark.timeout(60)
def test_close_leaves_no_thread_behind_for_a_paused_host(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    server = servers[0]
    before = {t.ident for t in threading.enumerate()}
    started = time.monotonic()
    with Downloader(dest, workers=2, per_host=2, retry=1) as dl:
        assert not dl.submit(server.url("/status/503/a1.png?retry_after=20")).result().ok
        queued = dl.submit(server.url("/any/a2.png"))
        assert queued.cancel()
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not left:
            break
        time.sleep(0.02)
    assert not left, left


@pytest.mark.timeout(60)
def test_with_a_rate_a_lock_wait_does_not_hold_up_the_host(
    each_backend: str, dest: Path, servers: list[ImageServer]
) -> None:
    server = servers[0]
    url = server.url("/any/locked.png")
    others = [server.url(f"/any/o{i}.png") for i in range(3)]
    with (
        lock_held_elsewhere(dest, "locked.png") as release,
        Downloader(dest, workers=4, rate=20.0) as dl,
    ):
        waiting = dl.submit(url)
        # It waits for the lock before its first request; the host's others go on.
        assert all(f.result(timeout=20).ok for f in [dl.submit(u) for u in others])
        assert not waiting.done()
        release()
        assert waiting.result(timeout=20).ok
