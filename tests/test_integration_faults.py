"""Integration tests against a real :class:`fetchpool.testing.ImageServer` on 127.0.0.1.

Each test drives fetchpool at one fault route of the loopback server and checks the
outcome against DESIGN.md: the result's status, error type and attempts, the exact
bytes on disk, and that ``dest`` holds nothing but the expected final files (no
``.fetchpool-*`` lock or temporary file, nothing partial at a final name).

The ``/fail/``, ``*-once`` routes are stateful per path and ``server.hits`` counts by
path, while the server is shared by the module: every test uses fresh names.
"""

from __future__ import annotations

import copyreg
import email.utils
import errno
import itertools
import logging
import os
import pickle
import re
import socket
import stat
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

import fetchpool.pipeline
import fetchpool.storage
import fetchpool.transfer
from _support import listing
from fetchpool import (
    Downloader,
    DownloadResult,
    FetchError,
    HTTPStatusError,
    InvalidURL,
    Item,
    NotAnImageError,
    ProgressEvent,
    RedirectError,
    Results,
    RetryPolicy,
    StorageError,
    TooLargeError,
    TransferError,
    UnsafeFilenameError,
    download_all,
)
from fetchpool.steps import Steps
from fetchpool.storage import LOCK_FILE_NAME, ORIGIN_XATTR, lock_key
from fetchpool.testing import ImageServer

MiB = 1024 * 1024
#: Slack added to every wall-clock upper bound: CI machines stall.
SLACK = 5.0

_counter = itertools.count()

pytestmark = pytest.mark.usefixtures("each_backend")


def uniq(stem: str = "x", ext: str = ".png") -> str:
    """A name no other test of this module uses (the server's state is per path)."""
    return f"{stem}{next(_counter)}{ext}"


def quick(attempts: int) -> RetryPolicy:
    """A retry policy with no backoff, so retries cost no wall-clock time."""
    return RetryPolicy(attempts=attempts, wait_initial=0, wait_max=0, jitter=0)


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=20) as srv:
        yield srv
    assert srv.errors == []


def only(results: Results) -> DownloadResult:
    (result,) = results
    return result


def assert_failed(result: DownloadResult, kind: type[FetchError], attempts: int) -> FetchError:
    assert result.status == "failed", result
    assert not result.ok
    assert result.path is None
    assert isinstance(result.error, kind), result.error
    assert result.attempts == attempts, result
    return result.error


def assert_downloaded(result: DownloadResult, server: ImageServer, url: str) -> Path:
    assert result.status == "downloaded", result
    assert result.error is None
    assert result.path is not None
    data = result.path.read_bytes()
    assert data == server.expected(url)
    assert result.bytes == len(data)
    return result.path


def assert_safe_name(path: Path, dest: Path) -> None:
    name = path.name
    assert path.parent == dest
    assert "/" not in name
    assert "\\" not in name
    assert ".." not in name
    assert "\0" not in name
    assert name not in ("", ".", "..")
    assert not name.startswith(".fetchpool-")
    assert len(os.fsencode(name)) <= 255


# ------------------------------------------------------------------ resets, truncation


def test_reset_mid_body_is_retried_then_fails(server: ImageServer, dest: Path) -> None:
    name = uniq("reset")
    url = server.url(f"/reset/{name}")
    result = only(download_all([url], dest, retry=quick(3)))
    err = assert_failed(result, TransferError, 3)
    assert isinstance(err, TransferError)
    assert err.retryable
    assert err.url == url
    assert server.hits(f"/reset/{name}") == 3
    assert listing(dest) == []


def test_reset_once_succeeds_on_second_attempt(server: ImageServer, dest: Path) -> None:
    name = uniq("reset-once")
    url = server.url(f"/reset-once/{name}")
    result = only(download_all([url], dest, retry=quick(3)))
    path = assert_downloaded(result, server, url)
    assert result.attempts == 2
    assert path == dest / name
    assert server.hits(f"/reset-once/{name}") == 2
    assert listing(dest) == [name]


def test_truncated_body_is_never_a_short_file(server: ImageServer, dest: Path) -> None:
    name = uniq("trunc")
    url = server.url(f"/truncate/{name}")
    result = only(download_all([url], dest, retry=quick(2)))
    err = assert_failed(result, TransferError, 2)
    assert isinstance(err, TransferError)
    assert err.retryable
    assert server.hits(f"/truncate/{name}") == 2
    assert listing(dest) == []


def test_truncate_once_succeeds_on_retry(server: ImageServer, dest: Path) -> None:
    name = uniq("trunc-once")
    url = server.url(f"/truncate-once/{name}")
    result = only(download_all([url], dest, retry=quick(3)))
    assert_downloaded(result, server, url)
    assert result.attempts == 2
    assert listing(dest) == [name]


# --------------------------------------------------------------------------- deadlines


def test_body_drip_is_cut_by_the_deadline(server: ImageServer, dest: Path) -> None:
    name = uniq("drip")
    url = server.url(f"/drip/{name}?interval=0.2")
    deadline, attempts = 1.0, 2
    start = time.monotonic()
    result = only(download_all([url], dest, deadline=deadline, retry=quick(attempts)))
    elapsed = time.monotonic() - start
    err = assert_failed(result, TransferError, attempts)
    assert "deadline" in str(err)
    assert elapsed >= deadline * attempts * 0.9
    assert elapsed < deadline * attempts + SLACK
    assert listing(dest) == []


def test_header_drip_is_cut_by_the_deadline(server: ImageServer, dest: Path) -> None:
    # The read timeout (5 s) never fires: a byte arrives every 0.2 s. Only a deadline
    # enforced from outside the read (rule 8) can end this.
    name = uniq("drip-headers")
    url = server.url(f"/drip-headers/{name}?interval=0.2")
    start = time.monotonic()
    result = only(download_all([url], dest, deadline=1, timeout=(5, 5), retry=1))
    elapsed = time.monotonic() - start
    err = assert_failed(result, TransferError, 1)
    assert "deadline" in str(err)
    assert elapsed < 1 + SLACK
    assert listing(dest) == []


# ------------------------------------------------------------------ statuses and retries


def test_retry_after_seconds_is_honoured(
    server: ImageServer, dest: Path, waits: list[float]
) -> None:
    name = uniq("ra429")
    url = server.url(f"/fail/2/429/{name}?retry_after=3")
    result = only(download_all([url], dest))
    assert_downloaded(result, server, url)
    assert result.attempts == 3
    assert waits == [3.0, 3.0]
    assert server.hits(f"/fail/2/429/{name}") == 3
    assert listing(dest) == [name]


def test_retry_after_http_date_is_honoured(
    server: ImageServer, dest: Path, waits: list[float]
) -> None:
    name = uniq("ra503")
    date = email.utils.formatdate(time.time() + 20, usegmt=True)
    url = server.url(f"/fail/1/503/{name}?retry_after={quote(date)}")
    result = only(download_all([url], dest))
    assert_downloaded(result, server, url)
    assert result.attempts == 2
    assert len(waits) == 1
    assert 15.0 <= waits[0] <= 20.0
    assert listing(dest) == [name]


def test_absurd_retry_after_fails_at_once(
    server: ImageServer, dest: Path, waits: list[float]
) -> None:
    name = uniq("ra-absurd")
    url = server.url(f"/fail/1/503/{name}?retry_after=86400")
    start = time.monotonic()
    result = only(download_all([url], dest))
    err = assert_failed(result, HTTPStatusError, 1)
    assert isinstance(err, HTTPStatusError)
    assert err.status_code == 503
    assert err.retry_after == 86400.0
    assert waits == []
    assert time.monotonic() - start < SLACK
    assert server.hits(f"/fail/1/503/{name}") == 1
    assert listing(dest) == []


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 451])
def test_final_statuses_are_requested_once(
    server: ImageServer, dest: Path, waits: list[float], code: int
) -> None:
    path = f"/status/{code}/{uniq(f's{code}-')}"
    result = only(download_all([server.url(path)], dest))
    err = assert_failed(result, HTTPStatusError, 1)
    assert isinstance(err, HTTPStatusError)
    assert err.status_code == code
    assert server.hits(path) == 1
    assert waits == []
    assert listing(dest) == []


@pytest.mark.parametrize("code", [500, 502, 503, 504, 408, 429])
def test_healable_statuses_are_retried_exactly_attempts_times(
    server: ImageServer, dest: Path, waits: list[float], code: int
) -> None:
    path = f"/status/{code}/{uniq(f's{code}-')}"
    result = only(download_all([server.url(path)], dest, retry=3))
    err = assert_failed(result, HTTPStatusError, 3)
    assert isinstance(err, HTTPStatusError)
    assert err.status_code == code
    assert server.hits(path) == 3
    assert len(waits) == 2
    assert listing(dest) == []


# --------------------------------------------------------------------------- redirects


def test_redirect_chain_keeps_the_callers_name(server: ImageServer, dest: Path) -> None:
    name = uniq("chain")
    url = server.url(f"/redirect/3/{name}")
    result = only(download_all([url], dest))
    path = assert_downloaded(result, server, url)
    assert path == dest / name
    assert result.attempts == 1
    for hops in range(4):
        assert server.hits(f"/redirect/{hops}/{name}") == 1
    assert listing(dest) == [name]


def test_name_never_comes_from_location(server: ImageServer, dest: Path) -> None:
    target = uniq("target")
    url = server.url(f"/redirect-to?location={quote('/any/' + target, safe='')}")
    result = only(download_all([url], dest))
    assert result.status == "downloaded"
    assert result.path == dest / "redirect-to"
    assert result.path.read_bytes() == server.expected(f"/any/{target}")
    assert listing(dest) == ["redirect-to"]


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_codes(server: ImageServer, dest: Path, code: int) -> None:
    name = uniq(f"r{code}-")
    url = server.url(f"/redirect/2/{name}?code={code}")
    result = only(download_all([url], dest))
    assert_downloaded(result, server, url)
    assert result.path == dest / name
    assert listing(dest) == [name]


def test_exactly_ten_redirects_are_followed(server: ImageServer, dest: Path) -> None:
    name = uniq("ten")
    url = server.url(f"/redirect/10/{name}")
    result = only(download_all([url], dest))
    assert_downloaded(result, server, url)
    assert server.hits(f"/redirect/0/{name}") == 1
    assert listing(dest) == [name]


def test_eleven_redirects_are_refused(server: ImageServer, dest: Path, waits: list[float]) -> None:
    name = uniq("eleven")
    url = server.url(f"/redirect/11/{name}")
    result = only(download_all([url], dest))
    assert_failed(result, RedirectError, 1)
    assert server.hits(f"/redirect/11/{name}") == 1
    assert server.hits(f"/redirect/1/{name}") == 1
    assert server.hits(f"/redirect/0/{name}") == 0  # the 11th hop is never taken
    assert waits == []
    assert listing(dest) == []


@pytest.mark.parametrize(
    "location",
    [
        "ftp://files.example/x.png",
        "file:///etc/passwd",
        "gopher://127.0.0.1:1/x.png",
        "javascript:alert(1)",
    ],
)
def test_redirect_to_other_schemes_is_refused(
    server: ImageServer, dest: Path, waits: list[float], location: str
) -> None:
    url = server.url(f"/redirect-to?location={quote(location, safe='')}")
    result = only(download_all([url], dest))
    assert_failed(result, RedirectError, 1)
    assert waits == []
    assert listing(dest) == []


@pytest.mark.parametrize("route", ["loop", "self-loop"])
def test_redirect_loops(server: ImageServer, dest: Path, waits: list[float], route: str) -> None:
    name = uniq(route)
    result = only(download_all([server.url(f"/{route}/{name}")], dest))
    err = assert_failed(result, RedirectError, 1)
    assert "loop" in str(err)
    assert server.hits(f"/{route}/{name}") == 1
    assert waits == []
    assert listing(dest) == []


def test_redirect_body_is_never_read(server: ImageServer, dest: Path) -> None:
    name = uniq("bigbody")
    url = server.url(f"/redirect-big-body/{name}")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = time.monotonic()
        result = only(download_all([url], dest))
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_downloaded(result, server, url)
    assert result.path == dest / name
    assert elapsed < 3.0
    assert peak < 20 * MiB, f"peak {peak / MiB:.1f} MiB: the 50 MiB 3xx body was read"
    assert listing(dest) == [name]


# ---------------------------------------------------------------------- content checks


@pytest.mark.parametrize("route", ["html", "html-as-image"])
def test_html_is_not_an_image(
    server: ImageServer, dest: Path, waits: list[float], route: str
) -> None:
    name = uniq(route)
    url = server.url(f"/{route}/{name}")
    result = only(download_all([url], dest))
    assert_failed(result, NotAnImageError, 1)
    assert server.hits(f"/{route}/{name}") == 1
    assert waits == []
    assert listing(dest) == []
    saved = only(download_all([url], dest, verify=None))
    assert saved.status == "downloaded"
    assert saved.path == dest / name
    assert saved.path.read_bytes().startswith(b"<!DOCTYPE html>")
    assert listing(dest) == [name]


def test_wrong_content_type_image_is_accepted(server: ImageServer, dest: Path) -> None:
    name = uniq("wrongtype")
    url = server.url(f"/wrong-type/{name}")
    result = only(download_all([url], dest))
    assert_downloaded(result, server, url)
    assert result.content_type == "text/plain"
    assert listing(dest) == [name]


# ------------------------------------------------------------------------------- sizes


def test_huge_content_length_fails_before_the_body(server: ImageServer, dest: Path) -> None:
    name = uniq("huge")
    start = time.monotonic()
    result = only(download_all([server.url(f"/huge-length/{name}")], dest))
    assert_failed(result, TooLargeError, 1)
    assert time.monotonic() - start < SLACK
    assert listing(dest) == []


def test_huge_body_without_max_bytes_is_bounded_by_the_deadline(
    server: ImageServer, dest: Path
) -> None:
    # Throttle the consumer a little so one second of loopback does not write gigabytes
    # to the temporary file; the point is that the stream is cut, not how fast.
    def throttle(event: ProgressEvent) -> None:
        if event.state == "progress":
            time.sleep(0.002)

    name = uniq("huge-nolimit")
    start = time.monotonic()
    result = only(
        download_all(
            [server.url(f"/huge-length/{name}")],
            dest,
            max_bytes=None,
            deadline=1,
            retry=1,
            progress=throttle,
        )
    )
    elapsed = time.monotonic() - start
    err = assert_failed(result, TransferError, 1)
    assert "deadline" in str(err)
    assert elapsed < 1 + SLACK
    assert listing(dest) == []


def test_endless_chunked_body_hits_max_bytes(server: ImageServer, dest: Path) -> None:
    name = uniq("endless")
    start = time.monotonic()
    result = only(download_all([server.url(f"/endless/{name}")], dest, max_bytes=MiB))
    assert_failed(result, TooLargeError, 1)
    assert time.monotonic() - start < SLACK
    assert listing(dest) == []


def test_gzip_bomb_is_decoded_in_bounded_memory(server: ImageServer, dest: Path) -> None:
    url = server.url(f"/gzip-bomb/{uniq('bomb')}?size={256 * MiB}")
    # The first request makes the server compress the bomb (a second of CPU): untimed.
    warm = only(download_all([url], dest, max_bytes=8 * MiB))
    assert_failed(warm, TooLargeError, 1)
    start = time.monotonic()
    result = only(download_all([url], dest, max_bytes=8 * MiB))
    assert_failed(result, TooLargeError, 1)
    assert time.monotonic() - start < SLACK
    assert listing(dest) == []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        again = only(download_all([url], dest, max_bytes=8 * MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_failed(again, TooLargeError, 1)
    assert peak < 20 * MiB, f"peak {peak / MiB:.1f} MiB while decoding a bomb"
    assert listing(dest) == []


def test_gzip_body_is_decoded(server: ImageServer, dest: Path) -> None:
    name = uniq("gz")
    url = server.url(f"/gzip/{name}")
    result = only(download_all([url], dest))
    assert_downloaded(result, server, url)
    assert listing(dest) == [name]


@pytest.mark.parametrize("route", ["bad-length", "conflicting-length", "broken-chunk"])
def test_malformed_framing_is_a_transfer_error(
    server: ImageServer, dest: Path, waits: list[float], route: str
) -> None:
    name = uniq(route)
    result = only(download_all([server.url(f"/{route}/{name}")], dest, retry=quick(3)))
    assert result.status == "failed"
    assert result.path is None
    assert isinstance(result.error, TransferError), result.error
    assert 1 <= result.attempts <= 3
    assert server.hits(f"/{route}/{name}") == result.attempts
    assert listing(dest) == []


@pytest.mark.parametrize(
    "route",
    [
        "bad-length",
        "conflicting-length",
        "broken-chunk",
    ],
)
def test_malformed_framing_is_not_retried(
    server: ImageServer, dest: Path, waits: list[float], route: str
) -> None:
    # errors.TransferError: retryable is False for malformed framing; it will not heal.
    name = uniq(route)
    result = only(download_all([server.url(f"/{route}/{name}")], dest, retry=quick(3)))
    err = assert_failed(result, TransferError, 1)
    assert isinstance(err, TransferError)
    assert err.retryable is False
    assert server.hits(f"/{route}/{name}") == 1
    assert waits == []
    assert listing(dest) == []


# ------------------------------------------------------------------------------- names


HOSTILE = [
    "/any/%2e%2e%2f",
    "/any/..%2f..%2fetc%2fpasswd",
    "/any/%2e%2e",
    "/any/a%5cb.png",
    "/any/%00x.png",
    "/any/%0d%0aSet-Cookie.png",
    "/any/.fetchpool-abc.lock",
    "/any/" + "n" * 300 + ".png",
    "/any/" + "%C3%A9" * 150 + ".jpg",
    "/any/dir/",
    "/any/",
]


def test_hostile_names_stay_inside_dest(server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "deep" / "dest"
    urls = [server.url(p) for p in HOSTILE]
    results = download_all(urls, dest)
    for url, result in zip(urls, results, strict=True):
        path = assert_downloaded(result, server, url)
        assert_safe_name(path, dest)
    paths = [r.path for r in results]
    assert len(set(paths)) == len(paths)
    assert sorted(p.name for p in results.paths) == listing(dest)
    # Nothing escaped: only dest's own tree exists under tmp_path.
    assert listing(tmp_path) == sorted(
        ["deep", "deep/dest", *(f"deep/dest/{n}" for n in listing(dest))]
    )
    # A rerun gives the same paths and skips.
    again = download_all(urls, dest)
    assert [r.path for r in again] == paths
    assert all(r.status == "skipped" for r in again)


def test_names_that_sanitise_alike_get_distinct_paths(server: ImageServer, dest: Path) -> None:
    stem = uniq("same")
    urls = [server.url(f"/any/{stem}%5cb.png"), server.url(f"/any/{stem}_b.png")]
    results = download_all(urls, dest)
    for url, result in zip(urls, results, strict=True):
        assert_downloaded(result, server, url)
    first, second = results.paths
    assert first != second
    assert {first.name, second.name} >= {f"{stem}_b.png"}
    assert listing(dest) == sorted([first.name, second.name])
    # Stable across runs.
    assert download_all(urls, dest).paths == [first, second]


def test_content_disposition_ignored_by_default(server: ImageServer, dest: Path) -> None:
    name = uniq("cd")
    url = server.url(f"/cd/{name}?filename={quote('../../evil.png')}")
    result = only(download_all([url], dest))
    assert_downloaded(result, server, url)
    assert result.path == dest / name
    assert listing(dest) == [name]


@pytest.mark.parametrize(
    ("param", "value", "wanted"),
    [
        ("filename", "../../evil.png", "evil.png"),
        ("filename", "..\\..\\evil.png", "evil.png"),
        ("filename_star", "../../ünï.png", "ünï.png"),
        ("filename_star", "/etc/passwd", "passwd"),
    ],
)
def test_content_disposition_opt_in_is_sanitised(
    server: ImageServer, tmp_path: Path, param: str, value: str, wanted: str
) -> None:
    dest = tmp_path / "a" / "b" / "dest"
    url = server.url(f"/cd/{uniq('cd')}?{param}={quote(value, safe='')}")
    result = only(download_all([url], dest, content_disposition=True))
    path = assert_downloaded(result, server, url)
    assert path == dest / wanted
    assert_safe_name(path, dest)
    assert listing(dest) == [wanted]
    assert listing(tmp_path) == ["a", "a/b", "a/b/dest", f"a/b/dest/{wanted}"]


# ---------------------------------------------------------------------- local storage


def test_symlink_at_target_is_replaced_not_followed(server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    name = uniq("link")
    (dest / name).symlink_to(outside)
    dangling_name = uniq("dangling")
    dangling_target = tmp_path / "created-through-link.png"
    (dest / dangling_name).symlink_to(dangling_target)
    urls = [server.url(f"/any/{name}"), server.url(f"/any/{dangling_name}")]
    results = download_all(urls, dest)
    for url, result in zip(urls, results, strict=True):
        path = assert_downloaded(result, server, url)
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode)
    assert outside.read_bytes() == b"precious"
    assert not dangling_target.exists()
    assert listing(dest) == sorted([name, dangling_name])


def test_symlink_at_target_with_overwrite_error(server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    name = uniq("link-err")
    (dest / name).symlink_to(outside)
    result = only(download_all([server.url(f"/any/{name}")], dest, overwrite="error"))
    assert_failed(result, StorageError, 0)
    assert server.hits(f"/any/{name}") == 0
    assert outside.read_bytes() == b"precious"
    assert (dest / name).is_symlink()
    assert listing(dest) == [name]


def test_dest_that_is_a_file(server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "file"
    dest.write_bytes(b"not a dir")
    name = uniq("nodir")
    with pytest.raises(NotADirectoryError):
        download_all([server.url(f"/any/{name}")], dest)
    assert server.hits(f"/any/{name}") == 0
    assert dest.read_bytes() == b"not a dir"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555")
def test_read_only_dest_by_chmod(server: ImageServer, dest: Path) -> None:
    ro = dest / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        bad, good = server.url(f"/any/{uniq('ro')}"), server.url(f"/any/{uniq('rw')}")
        results = download_all({bad: "ro/x.png", good: "ok.png"}, dest)
    finally:
        ro.chmod(0o755)
    err = assert_failed(results[0], StorageError, 0)
    assert isinstance(err, StorageError)
    assert err.errno == errno.EACCES
    assert_downloaded(results[1], server, good)
    assert listing(dest) == ["ok.png", "ro"]


def _deny(monkeypatch: pytest.MonkeyPatch, match: Callable[[str], bool]) -> list[str]:
    """Make ``os.open`` creating a file fail with EACCES for paths ``match`` selects.

    An unnamed (``O_TMPFILE``) file is created by opening its directory.
    """
    real_open = os.open
    denied: list[str] = []

    def fake_open(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        text = os.fsdecode(path)
        creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
        if creates and match(text):
            denied.append(text)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), text)
        return real_open(path, flags, mode, *args, **kwargs)

    # fetchpool.storage calls os.open; the fake passes every other path through.
    monkeypatch.setattr(os, "open", fake_open)
    return denied


def test_read_only_directory_simulated(
    server: ImageServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ro = dest / "ro"
    ro.mkdir()
    denied = _deny(monkeypatch, lambda p: os.path.dirname(p) == str(ro))
    bad, good = server.url(f"/any/{uniq('ro')}"), server.url(f"/any/{uniq('rw')}")
    results = download_all({bad: "ro/x.png", good: "ok.png"}, dest)
    monkeypatch.undo()
    assert denied
    err = assert_failed(results[0], StorageError, 0)
    assert isinstance(err, StorageError)
    assert issubclass(type(err), OSError)
    assert err.errno == errno.EACCES
    assert_downloaded(results[1], server, good)
    assert listing(dest) == ["ok.png", "ro"]


def test_temp_file_permission_denied(
    server: ImageServer,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    waits: list[float],
    temp_mode: str,
) -> None:
    # The lock can be taken, only the temporary file cannot be created.
    sub = dest / "sub"
    sub.mkdir()
    named = str(sub / ".fetchpool-")
    denied = _deny(
        monkeypatch, lambda p: p == str(sub) or (p.startswith(named) and p.endswith(".part"))
    )
    bad_name, good_name = uniq("eacces"), uniq("fine")
    bad, good = server.url(f"/any/{bad_name}"), server.url(f"/any/{good_name}")
    results = download_all({bad: f"sub/{bad_name}", good: good_name}, dest)
    monkeypatch.undo()
    assert denied
    err = assert_failed(results[0], StorageError, 1)  # never retried
    assert isinstance(err, StorageError)
    assert err.errno == errno.EACCES
    assert waits == []
    assert server.hits(f"/any/{bad_name}") == 1
    assert_downloaded(results[1], server, good)
    assert listing(dest) == sorted([good_name, "sub"])


def test_disk_full(
    server: ImageServer,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    waits: list[float],
    temp_mode: str,
) -> None:
    full_name = uniq("enospc")
    others = [uniq("room") for _ in range(3)]
    doomed_key = lock_key(dest / full_name)
    doomed: set[int] = set()
    written: dict[int, int] = {}
    refused: list[int] = []
    real_init = fetchpool.storage.TempFile.__init__
    real_write = os.write
    real_open = os.open
    real_store = fetchpool.pipeline.store_whole
    storing: list[bool] = []  # the doomed file's store_whole runs (the express lane's)

    def init(self: fetchpool.storage.TempFile, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        if self.key == doomed_key and self._fd is not None:
            doomed.add(self._fd)

    def store(directory: Path, key: str, *args: Any) -> bool:
        storing.append(key == doomed_key)
        try:
            return real_store(directory, key, *args)
        finally:
            storing.pop()

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if storing and storing[-1]:
            doomed.add(fd)
        return fd

    def write(fd: int, data: Any) -> int:
        if fd in doomed:
            # Room for 1000 bytes, then the disk is full.
            room = 1000 - written.get(fd, 0)
            if room <= 0:
                # The writer gives up and closes this fd, whose number may be reused.
                doomed.discard(fd)
                refused.append(fd)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real_write(fd, memoryview(data)[:room])
            written[fd] = written.get(fd, 0) + n
            return n
        return real_write(fd, data)

    monkeypatch.setattr(fetchpool.storage.TempFile, "__init__", init)
    monkeypatch.setattr(fetchpool.pipeline, "store_whole", store)
    monkeypatch.setattr(os, "open", open_)
    # fetchpool.storage calls os.write(fd, view); other fds are passed through.
    monkeypatch.setattr(os, "write", write)
    urls = [server.url(f"/any/{n}") for n in [full_name, *others]]
    results = download_all(urls, dest, workers=4)
    monkeypatch.undo()
    assert len(refused) == 1
    assert sum(written.values()) == 1000
    err = assert_failed(results[0], StorageError, 1)
    assert isinstance(err, StorageError)
    assert issubclass(type(err), OSError)
    assert err.errno == errno.ENOSPC
    assert waits == []
    assert server.hits(f"/any/{full_name}") == 1
    for url, result in zip(urls[1:], results[1:], strict=True):
        assert_downloaded(result, server, url)
    assert listing(dest) == sorted(others)


# ----------------------------------------------------------------------------- xattrs


def test_origin_is_recorded_in_xattr(server: ImageServer, dest: Path) -> None:
    name = uniq("xattr")
    base = server.base_url
    url = base.replace("http://", "http://user:s3cret@") + f"/any/{name}?q=1#frag"
    result = only(download_all([url], dest))
    assert result.status == "downloaded"
    assert result.path == dest / name
    assert result.path.read_bytes() == server.expected(f"/any/{name}?q=1")
    recorded = os.getxattr(result.path, ORIGIN_XATTR).decode()
    assert recorded == f"{base}/any/{name}?q=1"
    assert "s3cret" not in recorded
    assert listing(dest) == [name]


def test_file_of_another_url_is_not_taken(server: ImageServer, dest: Path) -> None:
    stem = uniq("cat", "")
    planted = dest / f"{stem}.jpg"
    planted.write_bytes(b"another cat")
    os.setxattr(planted, ORIGIN_XATTR, b"http://elsewhere.example/cat.jpg")
    url = server.url(f"/any/{stem}.jpg")
    result = only(download_all([url], dest))
    path = assert_downloaded(result, server, url)
    assert re.fullmatch(rf"{stem}-[0-9a-f]{{6,}}\.jpg", path.name), path.name
    assert planted.read_bytes() == b"another cat"
    assert os.getxattr(path, ORIGIN_XATTR).decode() == url
    assert listing(dest) == sorted([planted.name, path.name])
    # Stable: a rerun lands on the same derived name and skips it.
    again = only(download_all([url], dest))
    assert again.status == "skipped"
    assert again.path == path
    assert server.hits(f"/any/{stem}.jpg") == 1


def test_mixed_input_is_submitted_in_its_order(server: ImageServer, dest: Path) -> None:
    # Plain URLs may be submitted in runs: names are still claimed in input order, and
    # repeats still share their first occurrence's result.
    name, other = uniq("order"), uniq("order")
    plain, third = server.url(f"/any/{name}"), server.url(f"/any/{other}")
    items: list[object] = [
        plain,
        Item(server.url(f"/any/elsewhere/{name}"), filename=name),  # the plain URL's name
        plain,
        Item(plain, filename="renamed.png"),  # a repeat that asks for another name
        42,
        third,
        plain,
    ]
    results = download_all(items, dest, workers=2)  # type: ignore[arg-type]
    assert assert_downloaded(results[0], server, plain) == dest / name
    assert_failed(results[1], UnsafeFilenameError, 0)
    assert results[2] == results[0]
    assert results[3].status == "failed"
    assert isinstance(results[3].error, FetchError)
    assert results[4].status == "failed"
    assert assert_downloaded(results[5], server, third) == dest / other
    assert results[6] == results[0]
    assert server.hits(plain) == 1
    assert listing(dest) == sorted([name, other])


def test_plain_urls_alone_keep_their_order_repeats_and_refusals(
    server: ImageServer, dest: Path
) -> None:
    # A list of plain URL strings alone is submitted at once: each URL once, in the order
    # of its first occurrence, a result per input in input order, a refused URL in place.
    first, second = uniq("plainonly"), uniq("plainonly")
    a, b = server.url(f"/any/{first}"), server.url(f"/any/{second}")
    events: list[tuple[str, str]] = []
    urls = [b, a, "ftp://example.com/x.png", b, a, b]
    results = download_all(
        urls, dest, workers=2, progress=lambda e: events.append((e.url, e.state))
    )
    assert [r.url for r in results] == urls
    assert assert_downloaded(results[0], server, b) == dest / second
    assert assert_downloaded(results[1], server, a) == dest / first
    assert_failed(results[2], InvalidURL, 0)
    assert results[3] == results[5] == results[0]
    assert results[4] == results[1]
    assert server.hits(a) == server.hits(b) == 1
    started = [url for url, state in events if state == "started"]
    assert started == [b, a, "ftp://example.com/x.png"]
    assert listing(dest) == sorted([first, second])


def test_file_without_record_is_taken_as_it_is(server: ImageServer, dest: Path) -> None:
    name = uniq("norecord")
    (dest / name).write_bytes(b"whatever was here")
    result = only(download_all([server.url(f"/any/{name}")], dest))
    assert result.status == "skipped"
    assert result.ok
    assert result.path == dest / name
    assert result.attempts == 0
    assert result.bytes == len(b"whatever was here")
    assert server.hits(f"/any/{name}") == 0
    assert listing(dest) == [name]


# ----------------------------------------------------------------------- files on disk


def test_files_get_umask_permissions(server: ImageServer, dest: Path) -> None:
    names = [uniq("perm"), uniq("perm")]
    old = os.umask(0o022)
    try:
        results = download_all([server.url(f"/any/{n}") for n in names], dest, fsync=True)
    finally:
        os.umask(old)
    for result in results:
        assert result.path is not None
        assert stat.S_IMODE(os.stat(result.path).st_mode) == 0o644


def test_fsync(server: ImageServer, dest: Path) -> None:
    urls = [server.url(f"/any/{uniq('fsync')}") for _ in range(3)]
    results = download_all(urls, dest, fsync=True)
    for url, result in zip(urls, results, strict=True):
        assert_downloaded(result, server, url)
    assert listing(dest) == sorted(p.name for p in results.paths)


def test_overwrite_modes(server: ImageServer, dest: Path) -> None:
    name = uniq("ow")
    path = f"/any/{name}"
    url = server.url(path)
    first = only(download_all([url], dest))
    assert_downloaded(first, server, url)
    assert server.hits(path) == 1

    skipped = only(download_all([url], dest))
    assert skipped.status == "skipped"
    assert skipped.attempts == 0
    assert skipped.bytes == len(server.expected(url))
    assert server.hits(path) == 1

    (dest / name).write_bytes(b"stale")
    replaced = only(download_all([url], dest, overwrite="replace"))
    assert_downloaded(replaced, server, url)
    assert replaced.attempts == 1
    assert server.hits(path) == 2

    refused = only(download_all([url], dest, overwrite="error"))
    assert_failed(refused, StorageError, 0)
    assert server.hits(path) == 2
    assert (dest / name).read_bytes() == server.expected(url)
    assert listing(dest) == [name]


# ------------------------------------------------------------------------ results API


def test_results_line_up_with_inputs(server: ImageServer, dest: Path, waits: list[float]) -> None:
    ok1, ok2, skip = uniq("ok"), uniq("ok"), uniq("skip")
    (dest / skip).write_bytes(b"already here")
    corpus = server.urls[0]
    urls = [
        server.url(f"/any/{ok1}"),
        server.url(f"/status/404/{uniq('nf')}"),
        corpus,
        server.url(f"/any/{skip}"),
        server.url(f"/html/{uniq('page')}"),
        server.url(f"/any/{ok2}"),
        server.url(f"/reset/{uniq('rst')}"),
        server.url(f"/any/{ok1}"),  # a repeat: same outcome, requested once
    ]
    results = download_all(urls, dest, workers=4, retry=2)
    assert [r.url for r in results] == urls
    kinds: list[type[FetchError] | str] = [
        "downloaded",
        HTTPStatusError,
        "downloaded",
        "skipped",
        NotAnImageError,
        "downloaded",
        TransferError,
        "downloaded",
    ]
    for url, result, kind in zip(urls, results, kinds, strict=True):
        assert result.url == url
        if isinstance(kind, str):
            assert result.status == kind, result
        else:
            assert isinstance(result.error, kind), result
    assert results[0] == results[7]
    assert server.hits(f"/any/{ok1}") == 1
    assert results[2].path is not None
    assert results[2].path.read_bytes() == server.expected(corpus)
    summary = results.summary()
    assert (summary.total, summary.downloaded, summary.skipped, summary.failed) == (8, 4, 1, 3)
    assert summary.bytes == sum(r.bytes for r in results.succeeded)
    assert [r.url for r in results.failed] == [urls[1], urls[4], urls[6]]
    assert results.paths == [r.path for r in results if r.ok]
    with pytest.raises(HTTPStatusError) as excinfo:
        results.raise_for_errors()
    assert excinfo.value is results[1].error
    assert sorted(set(listing(dest))) == sorted({p.name for p in results.paths})


def test_downloader_submit_against_faults(server: ImageServer, dest: Path) -> None:
    good, bad = uniq("sub"), uniq("sub404")
    with Downloader(dest, workers=2, retry=quick(2)) as dl:
        futures = [
            dl.submit(server.url(f"/any/{good}")),
            dl.submit(server.url(f"/status/404/{bad}")),
            dl.submit(server.url(f"/reset-once/{good}"), filename="named.png"),
        ]
        results = [f.result(timeout=30) for f in futures]
    assert results[0].status == "downloaded"
    assert isinstance(results[1].error, HTTPStatusError)
    assert results[2].status == "downloaded"
    assert results[2].attempts == 2
    assert results[2].path == dest / "named.png"
    assert listing(dest) == sorted([good, "named.png"])


def test_results_and_errors_pickle(server: ImageServer, dest: Path, waits: list[float]) -> None:
    urls = [
        server.url(f"/status/404/{uniq('p404')}"),
        server.url(f"/reset/{uniq('preset')}"),
        server.url(f"/loop/{uniq('ploop')}"),
        server.url(f"/endless/{uniq('pend')}"),
        server.url(f"/html/{uniq('phtml')}"),
        server.url(f"/any/{uniq('pok')}"),
    ]
    results = download_all(urls, dest, retry=2, max_bytes=MiB)
    copy = pickle.loads(pickle.dumps(results))
    assert len(copy) == len(results)
    for before, after in zip(results, copy, strict=True):
        assert after.url == before.url
        assert after.status == before.status
        assert after.path == before.path
        assert type(after.error) is type(before.error)
        assert str(after.error) == str(before.error)
    assert isinstance(copy[0].error, HTTPStatusError)
    assert copy[0].error.status_code == 404
    assert isinstance(copy[1].error, TransferError)
    assert copy[1].error.retryable
    # The cause does not survive pickling, so its text is in the message.
    cause = results[1].error.__cause__ if results[1].error is not None else None
    assert cause is not None
    if type(results[1].error) not in copyreg.dispatch_table:
        # Unless a library made every exception pickle its cause (distributed installs
        # tblib's pickling process-wide: tests/test_dask.py imports it).
        assert copy[1].error.__cause__ is None
    assert str(cause)[:60] in str(copy[1].error)
    assert copy.summary().failed == 5


# ------------------------------------------------------------- requests and credentials


def test_request_headers_and_credentials_across_redirects(server: ImageServer, dest: Path) -> None:
    port = server.base_url.rsplit(":", 1)[1]
    same, cross = uniq("same-origin"), uniq("cross-origin")
    creds = "http://alice:pa55word@127.0.0.1:" + port
    headers = {"Cookie": "sid=c00kie", "X-Keep": "yes"}
    other = f"http://localhost:{port}/any/{cross}"
    urls = [
        f"{creds}/redirect/1/{same}",
        f"{creds}/redirect-to?location={quote(other, safe='')}",
    ]
    results = download_all(urls, dest, headers=headers, workers=1)
    assert all(r.status == "downloaded" for r in results), results

    hop = server.last_headers(f"/redirect/0/{same}")
    assert hop is not None
    assert hop["Authorization"].startswith("Basic ")
    assert hop["Cookie"] == "sid=c00kie"
    assert hop["Accept-Encoding"] == "identity"
    assert hop["User-Agent"].startswith("fetchpool/")

    final = server.last_headers(f"/any/{cross}")
    assert final is not None
    lowered = {k.lower() for k in final}
    assert "authorization" not in lowered
    assert "cookie" not in lowered
    assert final["X-Keep"] == "yes"
    assert results[1].path == dest / "redirect-to"


def test_no_secrets_in_errors_or_logs(
    server: ImageServer, dest: Path, waits: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    port = server.base_url.rsplit(":", 1)[1]
    base = f"http://bob:hunter2-pw@127.0.0.1:{port}"
    headers = {"Authorization": "Bearer tok-SECRET-123", "X-Api-Key": "key-SECRET-456"}
    urls = [
        f"{base}/status/404/{uniq('sec')}",
        f"{base}/reset/{uniq('sec')}",
        f"{base}/loop/{uniq('sec')}",
        f"{base}/drip-headers/{uniq('sec')}?interval=0.2",
        f"{base}/html/{uniq('sec')}",
    ]
    with caplog.at_level(logging.DEBUG, logger="fetchpool"):
        results = download_all(urls, dest, headers=headers, retry=2, deadline=0.5)
    assert len(results.failed) == len(urls)
    texts = [caplog.text]
    for result in results:
        err = result.error
        assert err is not None
        texts += [str(err), repr(err), err.url, repr(pickle.loads(pickle.dumps(err)))]
        assert err.url.startswith("http://127.0.0.1:")
    blob = "\n".join(texts)
    for secret in ("hunter2-pw", "tok-SECRET-123", "key-SECRET-456"):
        assert secret not in blob
    assert listing(dest) == []


# ------------------------------------------------------------------ time and budgets


def test_retry_budget_bounds_retry_after_waits(
    server: ImageServer, dest: Path, waits: list[float]
) -> None:
    name = uniq("budget")
    url = server.url(f"/fail/9/503/{name}?retry_after=10")
    policy = RetryPolicy(attempts=9, retry_after_cap=60, budget=25)
    result = only(download_all([url], dest, retry=policy))
    err = assert_failed(result, HTTPStatusError, result.attempts)
    assert isinstance(err, HTTPStatusError)
    assert sum(waits) <= policy.budget
    assert waits == [10.0] * len(waits)
    assert result.attempts == len(waits) + 1
    assert 2 <= result.attempts <= 3
    assert server.hits(f"/fail/9/503/{name}") == result.attempts
    assert listing(dest) == []


def test_connection_refused_is_retried(dest: Path, waits: list[float]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/nobody.png"
    result = only(download_all([url], dest, retry=3, timeout=(2, 2)))
    err = assert_failed(result, TransferError, 3)
    assert isinstance(err, TransferError)
    assert err.retryable
    assert len(waits) == 2
    assert listing(dest) == []


def test_read_timeout_is_a_retried_transfer_error(server: ImageServer, dest: Path) -> None:
    name = uniq("slow")
    start = time.monotonic()
    result = only(
        download_all([server.url(f"/slow/{name}?delay=3")], dest, timeout=(5, 0.3), retry=quick(2))
    )
    err = assert_failed(result, TransferError, 2)
    assert "timed out" in str(err)
    assert time.monotonic() - start < 2 * 0.3 + SLACK
    assert server.hits(f"/slow/{name}") == 2
    assert listing(dest) == []


def test_slow_server_within_limits_succeeds(server: ImageServer, dest: Path) -> None:
    name = uniq("slow-ok")
    url = server.url(f"/slow/{name}?delay=0.3")
    result = only(download_all([url], dest, timeout=(5, 2), deadline=5))
    assert_downloaded(result, server, url)
    assert result.attempts == 1


def test_cancel_stops_an_inflight_transfer(server: ImageServer, dest: Path) -> None:
    flowing = threading.Event()

    def progress(event: ProgressEvent) -> None:
        if event.state == "progress":
            flowing.set()
            time.sleep(0.002)  # throttle: keep the temporary file small

    name = uniq("cancel")
    dl = Downloader(dest, workers=1, max_bytes=None, progress=progress)
    try:
        fut = dl.submit(server.url(f"/huge-length/{name}"))
        assert flowing.wait(10)
        assert any(n.startswith(".fetchpool-") for n in listing(dest))
        start = time.monotonic()
    finally:
        dl.close(cancel=True)
    assert time.monotonic() - start < SLACK
    result = fut.result(timeout=0)
    err = assert_failed(result, TransferError, 1)
    assert "cancel" in str(err)
    assert listing(dest) == []


def test_leftovers_of_dead_writers_are_swept(server: ImageServer, dest: Path) -> None:
    name = uniq("swept")
    key = lock_key(dest / name)
    other_key = lock_key(dest / "never-downloaded.png")
    stale = [
        f".fetchpool-{key}-0123456789ab.part",
        LOCK_FILE_NAME,  # a killed process's lock file
        f".fetchpool-{other_key}-ba9876543210.part",
    ]
    for n in stale:
        (dest / n).write_bytes(b"\x89PNG\r\n\x1a\n half a file")
    url = server.url(f"/any/{name}")
    result = only(download_all([url], dest))
    assert_downloaded(result, server, url)
    assert listing(dest) == [name]


def test_progress_events_against_faults(server: ImageServer, dest: Path) -> None:
    events: list[ProgressEvent] = []
    lock = threading.Lock()

    def record(event: ProgressEvent) -> None:
        with lock:
            events.append(event)

    ok = server.url(f"/reset-once/{uniq('ev')}")
    bad = server.url(f"/status/404/{uniq('ev')}")
    results = download_all([ok, bad], dest, retry=quick(3), progress=record)
    assert results[0].status == "downloaded"
    states = {url: [e.state for e in events if e.url == url] for url in (ok, bad)}
    assert states[ok][0] == "started"
    assert "retrying" in states[ok]
    assert "progress" in states[ok]
    assert states[ok][-1] == "done"
    assert states[bad] == ["started", "failed"]
    done = next(e for e in events if e.url == ok and e.state == "done")
    assert done.bytes == len(server.expected(ok))


def test_an_interrupt_in_submission_ends_every_download_it_announced(
    server: ImageServer, dest: Path
) -> None:
    # Ctrl-C in the progress callback while download_all submits: each URL whose
    # "started" went out still gets its end, whatever the backend (plain URLs may be
    # submitted in runs).
    urls = [server.url(f"/slow/{uniq('int')}?delay=2") for _ in range(6)]
    events: list[ProgressEvent] = []
    lock = threading.Lock()

    def record(event: ProgressEvent) -> None:
        with lock:
            events.append(event)
        if event.state == "started" and event.url == urls[2]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_all(urls, dest, workers=1, progress=record)
    states = {url: [e.state for e in events if e.url == url] for url in urls}
    assert states[urls[0]][0] == "started"
    assert states[urls[0]][-1] in ("failed", "done")
    assert states[urls[1]] == ["started", "failed"]
    assert states[urls[3]] == states[urls[4]] == states[urls[5]] == []


def test_deadline_spans_redirect_hops(server: ImageServer, dest: Path) -> None:
    # Two quick redirects, then a server that drips its headers: one deadline for all.
    name = uniq("hops-drip")
    inner = "/redirect-to?location=" + quote(f"/drip-headers/{name}?interval=0.2", safe="")
    url = server.url("/redirect-to?location=" + quote(inner, safe=""))
    start = time.monotonic()
    result = only(download_all([url], dest, deadline=1, timeout=(5, 5), retry=1))
    err = assert_failed(result, TransferError, 1)
    assert "deadline" in str(err)
    assert time.monotonic() - start < 1 + SLACK
    assert server.hits(f"/drip-headers/{name}") == 1
    assert listing(dest) == []


@pytest.mark.parametrize("route", ["drip", "drip-headers"])
def test_retry_budget_bounds_an_attempt(server: ImageServer, dest: Path, route: str) -> None:
    # deadline stays at its 300 s default: the budget alone must end the attempt.
    name = uniq(f"budget-{route}")
    policy = RetryPolicy(attempts=3, wait_initial=0, jitter=0, budget=1.5)
    start = time.monotonic()
    result = only(
        download_all(
            [server.url(f"/{route}/{name}?interval=0.2")], dest, timeout=(5, 5), retry=policy
        )
    )
    elapsed = time.monotonic() - start
    assert_failed(result, TransferError, result.attempts)
    assert elapsed < policy.budget + SLACK
    assert listing(dest) == []


# ------------------------------------------------------------ more names and storage


def test_content_disposition_collisions_get_distinct_paths(server: ImageServer, dest: Path) -> None:
    urls = [server.url(f"/cd/{uniq('cdc')}?filename=shared.png") for _ in range(3)]
    results = download_all(urls, dest, content_disposition=True)
    for url, result in zip(urls, results, strict=True):
        path = assert_downloaded(result, server, url)
        assert_safe_name(path, dest)
        assert os.getxattr(path, ORIGIN_XATTR).decode() == url
    paths = [r.path for r in results]
    assert len(set(paths)) == 3
    assert dest / "shared.png" in paths
    assert listing(dest) == sorted(p.name for p in results.paths)
    again = download_all(urls, dest, content_disposition=True)
    assert [r.status for r in again] == ["skipped"] * 3
    assert [r.path for r in again] == paths


def test_content_disposition_skip_reads_no_body(
    server: ImageServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.url(f"/cd/{uniq('cdskip')}?filename={uniq('kept')}")
    first = only(download_all([url], dest, content_disposition=True))
    assert first.status == "downloaded"
    consumed: list[int] = []
    real_read = fetchpool.transfer.Body.read

    def spy(self: fetchpool.transfer.Body) -> Steps[bytes]:
        chunk = yield from real_read(self)
        consumed.append(len(chunk))
        return chunk

    monkeypatch.setattr(fetchpool.transfer.Body, "read", spy)
    again = only(download_all([url], dest, content_disposition=True))
    assert again.status == "skipped"
    assert again.path == first.path
    # DESIGN rule 3: the skip happens when the headers arrive, before the body is read.
    assert consumed == []


def test_symlinked_subdirectory_is_not_followed(server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    name = uniq("viasub")
    result = only(download_all({server.url(f"/any/{name}"): f"sub/{name}"}, dest))
    assert_failed(result, UnsafeFilenameError, 0)
    assert server.hits(f"/any/{name}") == 0
    assert listing(outside) == []
    assert listing(dest) == ["sub"]


def test_directory_in_the_way(server: ImageServer, dest: Path) -> None:
    name = uniq("dir-in-way")
    (dest / name).mkdir()
    result = only(download_all([server.url(f"/any/{name}")], dest))
    assert_failed(result, StorageError, 0)
    assert server.hits(f"/any/{name}") == 0
    assert listing(dest) == [name]


@pytest.mark.parametrize("code", [200, 204])
def test_non_image_2xx_bodies(server: ImageServer, dest: Path, code: int) -> None:
    path = f"/status/{code}/{uniq(f'e{code}-')}"
    result = only(download_all([server.url(path)], dest, retry=quick(3)))
    assert_failed(result, NotAnImageError, 1)
    assert server.hits(path) == 1
    assert listing(dest) == []


@pytest.mark.timeout(30)
def test_close_cancel_ends_a_retry_after_wait_at_once(server: ImageServer, dest: Path) -> None:
    url = server.url(f"/status/503/{uniq('r')}?retry_after=40")
    retrying = threading.Event()

    def progress(event: ProgressEvent) -> None:
        if event.state == "retrying":
            retrying.set()

    dl = Downloader(dest, workers=1, progress=progress)
    future = dl.submit(url)
    assert retrying.wait(10), "no retry was scheduled"
    dl.close(cancel=True)  # the test's timeout (30 s) is shorter than the wait (40 s)
    result = future.result(timeout=0)
    assert result.status == "failed"
    assert isinstance(result.error, TransferError)
    assert result.error.cancelled
    assert listing(dest) == []
