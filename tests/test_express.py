"""The curl backend's express lane: plain downloads without the pipeline's steps.

A plain URL (no file name, no expectations, default-like options) is downloaded by the
loop itself: one GET, its answer kept in memory and written at once. Whatever is not a
plain success is handed on to the steps, with the answer received replayed as their first
attempt's. These tests hold the hand-over to what matters: every answer ends as on the
requests backend, and no request is sent twice.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _support import listing, temp_files
from fetchpool import (
    Downloader,
    DownloadResult,
    HTTPStatusError,
    NotAnImageError,
    RetryPolicy,
    StorageError,
    TooLargeError,
    TransferError,
    download_all,
)
from fetchpool.backends import curl as curl_backend
from fetchpool.pipeline import Pipeline
from fetchpool.storage import LOCK_FILE_NAME, ORIGIN_XATTR
from fetchpool.testing import ImageServer
from test_curl_backend import PNG_SIGNATURE, RawServer

pytest.importorskip("pycurl")


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=8) as s:
        yield s


@pytest.fixture(autouse=True)
def fast_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where creating a file is slow (a busy disk), downloads take the steps, which create
    # it on another thread: here the express lane must be open whatever the disk.
    monkeypatch.setattr("fetchpool.pipeline.slow_to_create", lambda directory: False)


@pytest.fixture
def express_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs the express lane wrote itself (not handed on to the steps)."""
    written: list[str] = []
    finish = Pipeline.finish_express

    def spy(self: Pipeline, task: object, *args: object) -> object:
        result = finish(self, task, *args)  # type: ignore[arg-type]
        if result is not None:
            written.append(result.url)
        return result

    monkeypatch.setattr(Pipeline, "finish_express", spy)
    return written


def test_plain_urls_take_the_express_lane(
    server: ImageServer, dest: Path, express_calls: list[str]
) -> None:
    urls = server.urls[:8]
    results = download_all(urls, dest, workers=4, backend="curl")
    assert [r.status for r in results] == ["downloaded"] * 8
    assert sorted(express_calls) == sorted(urls)
    for r in results:
        assert r.path is not None
        assert r.attempts == 1
        assert r.path.read_bytes() == server.expected(r.url)
        assert r.content_type is not None
    assert temp_files(dest) == []


@pytest.mark.parametrize(
    ("path", "error", "hits"),
    [
        ("/status/404/a.png", HTTPStatusError, 1),
        ("/html/b.png", NotAnImageError, 1),
        ("/truncate/c.png", TransferError, 1),
        ("/loop/d.png", None, 1),  # a redirect loop (its second hop is another path)
    ],
)
def test_answers_handed_on_are_not_requested_again(
    server: ImageServer,
    dest: Path,
    express_calls: list[str],
    path: str,
    error: type[Exception] | None,
    hits: int,
) -> None:
    server.reset_hits()
    url = server.url(path)
    (result,) = download_all([url], dest, workers=2, backend="curl", retry=RetryPolicy(attempts=1))
    assert not result.ok
    if error is not None:
        assert isinstance(result.error, error)
    assert result.attempts == 1
    assert server.hits(path) == hits
    assert express_calls == []
    assert listing(dest) == []


def test_a_failure_that_heals_is_retried_once(
    server: ImageServer, dest: Path, express_calls: list[str]
) -> None:
    server.reset_hits()
    path = "/fail/1/503/e.png"
    (result,) = download_all([server.url(path)], dest, workers=2, backend="curl")
    assert result.status == "downloaded"
    assert result.attempts == 2
    assert server.hits(path) == 2  # the 503 once (replayed, not sent again), then the image
    assert express_calls == []


def test_a_redirect_is_followed_from_the_replayed_answer(
    server: ImageServer, dest: Path, express_calls: list[str]
) -> None:
    server.reset_hits()
    path = "/redirect/2/f.png"
    (result,) = download_all([server.url(path)], dest, workers=2, backend="curl")
    assert result.status == "downloaded"
    assert server.hits(path) == 1
    assert result.path is not None
    assert result.path.name == "f.png"


@pytest.mark.parametrize("size", [1024 * 1024 + 1, 3 * 1024 * 1024])
def test_a_body_past_the_cap_goes_on_live(
    server: ImageServer, dest: Path, express_calls: list[str], size: int
) -> None:
    server.reset_hits()
    path = f"/big/g{size}.png"
    (result,) = download_all([server.url(f"{path}?size={size}")], dest, workers=2, backend="curl")
    assert result.status == "downloaded", result.error
    body = server.expected(f"{path}?size={size}")
    assert result.bytes == len(body) > 1024 * 1024
    assert result.path is not None
    assert result.path.read_bytes() == body
    assert server.hits(path) == 1
    assert express_calls == []


def test_an_encoded_body_is_decoded_by_the_steps(
    server: ImageServer, dest: Path, express_calls: list[str]
) -> None:
    (result,) = download_all([server.url("/gzip/h.png")], dest, workers=2, backend="curl")
    assert result.status == "downloaded"
    assert result.path is not None
    assert result.path.read_bytes() == server.expected("/gzip/h.png")
    assert express_calls == []


def test_max_bytes_stops_an_express_body(server: ImageServer, dest: Path) -> None:
    path = "/big/i.png?size=200000"
    (result,) = download_all([server.url(path)], dest, workers=2, backend="curl", max_bytes=1000)
    assert isinstance(result.error, TooLargeError)
    assert listing(dest) == []


def test_a_header_drip_past_the_deadline_names_the_deadline(
    server: ImageServer, dest: Path
) -> None:
    url = server.url("/drip-headers/j.png?interval=0.05")
    (result,) = download_all(
        [url],
        dest,
        workers=2,
        backend="curl",
        deadline=0.4,
        retry=RetryPolicy(attempts=1),
    )
    assert isinstance(result.error, TransferError)
    assert "deadline of 0.4 s exceeded" in str(result.error)
    assert listing(dest) == []


def test_a_drip_within_the_read_timeout_is_not_idle(server: ImageServer, dest: Path) -> None:
    # The express lane collects header lines in C: the idle check must see them come.
    # A header line every 0.2 s or so, the whole head in about two seconds.
    url = server.url("/drip-headers/k.png?interval=0.01")
    (result,) = download_all(
        [url], dest, workers=2, backend="curl", timeout=(5, 0.5), retry=RetryPolicy(attempts=1)
    )
    assert result.status == "downloaded", result.error


def test_cancel_stops_express_transfers(server: ImageServer, dest: Path) -> None:
    urls = [server.url(f"/slow/l{i}.png?delay=30") for i in range(4)]
    dl = Downloader(dest, workers=4, backend="curl")
    futures = [dl.submit(u) for u in urls]
    deadline = time.monotonic() + 10
    while any(server.hits(u) == 0 for u in urls) and time.monotonic() < deadline:
        time.sleep(0.01)  # until every request is in flight
    dl.close(cancel=True)
    results = [f.result(timeout=10) for f in futures]
    assert all(not r.ok for r in results)
    for r in results:
        assert isinstance(r.error, TransferError)
        assert r.error.cancelled
    assert listing(dest) == []


def test_a_file_already_there_is_skipped_without_a_request(server: ImageServer, dest: Path) -> None:
    url = server.urls[0]
    download_all([url], dest, workers=2, backend="curl")
    server.reset_hits()
    (result,) = download_all([url], dest, workers=2, backend="curl")
    assert result.status == "skipped"
    assert server.hits(url) == 0


def test_a_free_name_is_looked_at_once(
    server: ImageServer, dest: Path, monkeypatch: pytest.MonkeyPatch, express_calls: list[str]
) -> None:
    url = server.urls[1]
    looks: list[str] = []
    lstat = os.lstat

    def counting(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(path).startswith(f"{dest}{os.sep}"):
            looks.append(os.path.basename(path))
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", counting)
    (result,) = download_all([url], dest, workers=2, backend="curl")
    assert result.status == "downloaded"
    assert express_calls == [url]
    assert looks == [result.path.name]  # under its lock, not also before


def test_a_name_found_taken_under_the_lock_is_claimed_again(
    server: ImageServer, dest: Path
) -> None:
    # Two URLs with one name; the file there is the second one's. The first takes its
    # derived name, and must not keep the plain one claimed: the second finds its own file.
    first = server.url("/any/shared.png")
    second = server.url("/any/shared.png?v=2")
    planted = dest / "shared.png"
    planted.write_bytes(b"the second URL's file")
    os.setxattr(planted, ORIGIN_XATTR, second.encode())
    one, two = download_all([first, second], dest, workers=1, backend="curl")
    assert one.status == "downloaded"
    assert one.path is not None
    assert one.path != planted
    assert one.path.name.startswith("shared-")
    assert two.status == "skipped"
    assert two.path == planted
    assert planted.read_bytes() == b"the second URL's file"
    assert two.attempts == 0


def test_the_express_lane_logs_each_request_once(
    server: ImageServer, dest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.url("/status/404/m.png")
    with caplog.at_level(logging.DEBUG, logger="fetchpool"):
        download_all([url], dest, workers=2, backend="curl", retry=RetryPolicy(attempts=1))
    gets = [r for r in caplog.records if r.getMessage().startswith("GET ")]
    assert len(gets) == 1


def test_express_is_off_where_an_option_changes_the_first_attempt(
    server: ImageServer, dest: Path, express_calls: list[str]
) -> None:
    urls = server.urls[:2]
    results = download_all(urls, dest, workers=2, backend="curl", fsync=True)
    assert all(r.status == "downloaded" for r in results)
    assert express_calls == []
    assert curl_backend.CurlTransport.takes_express.fget is not None


def test_a_download_cancelled_before_it_started_says_failed(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    events: list[tuple[str, str]] = []
    slow = server.url("/slow/n.png?delay=1")
    queued = server.url("/any/o.png")
    with Downloader(dest, workers=1, progress=lambda e: events.append((e.url, e.state))) as dl:
        first = dl.submit(slow)
        second = dl.submit(queued)
        assert second.cancel()
        assert first.result(timeout=10).ok
    assert second.cancelled()
    assert [state for url, state in events if url == queued] == ["started", "failed"]
    assert listing(dest) == ["n.png"]


# ----------------------------------------------------------- the same as the steps give


def _answer_ending_at_headers(status: bytes, extra: bytes = b"") -> Callable[[socket.socket], None]:
    """A route: ``status`` with headers announcing a body that never comes (until the
    client leaves)."""

    def route(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 100\r\n" + extra + b"\r\n")
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    return route


def _run(url: str, express: bool, dest: Path, **options: Any) -> tuple[DownloadResult, list[Any]]:
    events: list[tuple[str, int, int | None]] = []
    with Downloader(
        dest,
        workers=2,
        backend="curl",
        progress=lambda e: events.append((e.state, e.bytes, e.total)),
        **options,
    ) as dl:
        if not express:
            dl._express = None  # the steps alone
        result = dl.submit(url).result(timeout=30)
    return result, events


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EIO])
def test_a_file_that_cannot_be_stored_fails_as_on_the_steps(
    server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int
) -> None:
    # The link at the final name fails: the same error and the same events both ways
    # (the progress event of the body written comes before the failed commit).
    def refuse(fd: int, path: Any) -> bool:
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr("fetchpool.storage._link_unnamed", refuse)
    url = server.urls[2]
    got = []
    for express in (True, False):
        dest = tmp_path / str(express)
        dest.mkdir()
        result, events = _run(url, express, dest, retry=RetryPolicy(attempts=1))
        assert isinstance(result.error, StorageError)
        assert result.error.errno == errno_
        got.append((str(result.error).replace(str(dest), "D"), result.attempts, events))
        assert temp_files(dest) == []
        assert listing(dest) == []
    assert got[0] == got[1]
    assert [state for state, *_ in got[0][2]] == ["started", "progress", "failed"]


RAW_ANSWERS: dict[str, Any] = {
    # Headers all in, then the connection closes: a truncated body, not "no response".
    "/headers-then-close": (
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n"
    ),
    # A 503 whose body never comes: the status at once (libcurl's FAILONERROR).
    "/503-stalled": _answer_ending_at_headers(b"503 Service Unavailable", b"Retry-After: 7\r\n"),
    # Bare newlines, an informational answer first.
    "/lf-100": (
        b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nContent-Type: image/png\n"
        b"Content-Length: 16\n\n" + PNG_SIGNATURE + bytes(8)
    ),
    # An empty body (verify=None): no progress event with no bytes.
    "/empty": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("path", sorted(RAW_ANSWERS))
def test_the_express_lane_ends_as_the_steps_do(tmp_path: Path, path: str) -> None:
    with RawServer() as raw:
        raw.routes.update(RAW_ANSWERS)
        url = raw.url(path)
        options: dict[str, Any] = {"retry": RetryPolicy(attempts=1), "timeout": (5, 3)}
        if path == "/empty":
            options["verify"] = None
        start = time.monotonic()
        express, express_events = _run(url, True, tmp_path / "express", **options)
        took = time.monotonic() - start
        steps, steps_events = _run(url, False, tmp_path / "steps", **options)
    assert (express.status, express.attempts, express.bytes) == (
        steps.status,
        steps.attempts,
        steps.bytes,
    )
    assert type(express.error) is type(steps.error)
    assert str(express.error) == str(steps.error)
    assert express_events == steps_events
    assert listing(tmp_path / "express") == listing(tmp_path / "steps")
    assert took < 2.5, f"{path}: {took:.1f} s, the read timeout is 3 s"


def test_a_lock_that_cannot_be_taken_fails_the_url_not_the_loop(
    server: ImageServer, dest: Path
) -> None:
    (dest / LOCK_FILE_NAME).mkdir()  # no lock file can be made there
    url = server.urls[0]
    with Downloader(dest, workers=2, backend="curl") as dl:
        result = dl.submit(url).result(timeout=10)
        other = dl.submit(server.urls[1]).result(timeout=10)
    assert isinstance(result.error, StorageError)
    assert result.attempts == 0
    assert isinstance(other.error, StorageError)


def test_a_cancelled_express_download_counts_its_attempt(server: ImageServer, dest: Path) -> None:
    url = server.url("/slow/p.png?delay=30")
    dl = Downloader(dest, workers=2, backend="curl")
    future = dl.submit(url)
    deadline = time.monotonic() + 10
    while server.hits(url) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    dl.close(cancel=True)
    assert time.monotonic() - start < 0.5
    result = future.result(timeout=0)
    assert isinstance(result.error, TransferError)
    assert result.error.cancelled
    assert result.attempts == 1


def test_a_body_stalled_past_the_deadline_fails_as_the_steps_say(tmp_path: Path) -> None:
    # Headers all in, the body never comes: the loop ends the transfer at the deadline,
    # and the error says "while reading", as it does through the steps.
    with RawServer() as raw:
        raw.routes["/stalled"] = _answer_ending_at_headers(
            b"200 OK", b"Content-Type: image/png\r\n"
        )
        url = raw.url("/stalled")
        options: dict[str, Any] = {"retry": RetryPolicy(attempts=1), "deadline": 0.5}
        express, express_events = _run(url, True, tmp_path / "express", **options)
        steps, steps_events = _run(url, False, tmp_path / "steps", **options)
    assert isinstance(express.error, TransferError)
    assert str(express.error) == str(steps.error)
    assert "while reading" in str(express.error)
    assert (express.attempts, express_events) == (steps.attempts, steps_events)
