"""The curl backend's direct sink: libcurl writes a big body into its file by itself.

In event mode a big identity body of known length is written by ``os.write`` bound to
a descriptor of the temporary file (:meth:`fetchpool.storage.TempFile.direct`), with no
Python code per 16 KiB block; the loop counts what was written from the file offset.
Each test checks, through a spy on ``TempFile.direct`` and a count of the Python write
callback's calls, that this path is the one taken (or, where the sink gives no
descriptor, that the Python path is), and then the contract: exact bytes, progress
about once a MiB, a full disk a ``StorageError`` with nothing printed, truncations and
resets retried with nothing left behind, cancellation, and no descriptor leaked.

Servers: the raw HTTP/1.1 server of ``test_splice_body`` (its routes pick the framing
and the fault by path).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

import fetchpool.storage
import fetchpool.transfer
from _support import listing, temp_files
from fetchpool import (
    Downloader,
    ProgressEvent,
    RetryPolicy,
    StorageError,
    TransferError,
    download_all,
)
from test_splice_body import RawServer, body_of, sha, uniq

pycurl = pytest.importorskip("pycurl")

from fetchpool.backends.curl import CurlTransport, _Slot  # noqa: E402
from fetchpool.steps import Splice  # noqa: E402

MiB = 1024 * 1024
SIZE = 16 * MiB + 12_345
#: What libcurl hands a write callback at most.
BLOCK = 16 * 1024


def quick(attempts: int) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, wait_initial=0, wait_max=0, jitter=0)


@pytest.fixture(scope="module")
def raw_server() -> Iterator[RawServer]:
    server = RawServer()
    try:
        yield server
    finally:
        server.close()


class Spy:
    """Records what ``TempFile.direct`` gave, and counts the Python write callback's calls.

    Set up before the Downloader makes its handles (they bind ``on_write`` then).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        #: One entry per call of ``TempFile.direct``: whether it gave a descriptor.
        self.direct: list[bool] = []
        self.fds: list[int] = []
        self.writes = 0
        real_direct = fetchpool.storage.TempFile.direct
        real_on_write = _Slot.on_write

        def direct(tmp: fetchpool.storage.TempFile, length: int) -> int | None:
            fd = real_direct(tmp, length)
            self.direct.append(fd is not None)
            if fd is not None:
                self.fds.append(fd)
            return fd

        def on_write(slot: _Slot, data: bytes) -> int | None:
            self.writes += 1
            return real_on_write(slot, data)

        monkeypatch.setattr(fetchpool.storage.TempFile, "direct", direct)
        monkeypatch.setattr(_Slot, "on_write", on_write)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    return Spy(monkeypatch)


def fallocate_fails(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Make ``os.posix_fallocate`` fail with ``code`` (as glibc reports it: an OSError)."""

    def fail(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", fail)


def progress_sizes(events: list[ProgressEvent]) -> list[int]:
    return [e.bytes for e in events if e.state == "progress"]


def test_a_big_body_is_written_by_libcurl_itself(
    raw_server: RawServer, dest: Path, spy: Spy
) -> None:
    events: list[ProgressEvent] = []
    url = raw_server.url(uniq("full", SIZE))
    (result,) = download_all([url], dest, backend="curl", progress=events.append)
    assert result.ok, result.error
    assert result.path is not None
    assert result.bytes == SIZE
    assert sha(result.path.read_bytes()) == sha(body_of(SIZE))
    assert spy.direct == [True]
    # The Python callback saw the head and what was buffered (a MiB or two), not the
    # body: that would be a call per 16 KiB.
    assert spy.writes < (3 * MiB) // BLOCK, spy.writes
    sizes = progress_sizes(events)
    assert sizes == sorted(sizes)
    assert sizes[-1] == SIZE
    # About one event per MiB, though libcurl writes several MiB per turn of the loop
    # (give or take the MiB or two the callback wrote before the swap, as the turns fall).
    assert len(sizes) >= SIZE // fetchpool.transfer.SPLICE_BLOCK - 2, sizes
    assert len(sizes) <= 3 + SIZE // fetchpool.transfer.SPLICE_BLOCK, sizes
    assert listing(dest) == [result.path.name]


def test_a_full_disk_at_allocation_is_a_storage_error_and_prints_nothing(
    raw_server: RawServer,
    dest: Path,
    spy: Spy,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    fallocate_fails(monkeypatch, errno.ENOSPC)
    before = raw_server.requests
    (result,) = download_all(
        [raw_server.url(uniq("full", SIZE))], dest, backend="curl", retry=quick(3)
    )
    assert isinstance(result.error, StorageError), result.error
    assert result.error.errno == errno.ENOSPC
    assert "No space left on device" in str(result.error)
    assert result.attempts == 1  # never retried
    assert raw_server.requests - before == 1
    assert spy.direct == []  # raised: no descriptor given
    assert listing(dest) == []
    assert temp_files(dest) == []
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out == ""


def test_a_file_system_without_allocation_ahead_gets_the_python_path(
    raw_server: RawServer, dest: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fallocate_fails(monkeypatch, errno.EOPNOTSUPP)
    events: list[ProgressEvent] = []
    url = raw_server.url(uniq("full", SIZE))
    (result,) = download_all([url], dest, backend="curl", progress=events.append)
    assert result.ok, result.error
    assert result.path is not None
    assert sha(result.path.read_bytes()) == sha(body_of(SIZE))
    assert spy.direct == [False]
    assert spy.writes >= (SIZE - 3 * MiB) // BLOCK, spy.writes
    sizes = progress_sizes(events)
    assert sizes == sorted(sizes)
    assert sizes[-1] == SIZE
    assert listing(dest) == [result.path.name]


def test_a_full_disk_on_the_python_path_is_a_storage_error(
    raw_server: RawServer, dest: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the sink gives no descriptor, the write callback writes: its failure too."""
    fallocate_fails(monkeypatch, errno.EOPNOTSUPP)
    real_write_all = fetchpool.storage._write_all
    written = 0

    def write_all(fd: int, data: bytes | memoryview) -> None:
        nonlocal written
        written += len(data)
        if written > 4 * MiB:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_all(fd, data)

    monkeypatch.setattr(fetchpool.storage, "_write_all", write_all)
    (result,) = download_all(
        [raw_server.url(uniq("full", SIZE))], dest, backend="curl", retry=quick(3)
    )
    assert isinstance(result.error, StorageError), result.error
    assert result.error.errno == errno.ENOSPC
    assert result.attempts == 1
    assert spy.direct == [False]
    assert listing(dest) == []
    assert temp_files(dest) == []


@pytest.mark.parametrize(
    ("route", "says"),
    [
        ("truncate", f"truncated body from {{url}}: {SIZE // 2} of {SIZE} bytes"),
        ("reset", "Connection reset by peer"),
    ],
)
def test_a_body_cut_short_is_retried_and_leaves_nothing(
    raw_server: RawServer, dest: Path, spy: Spy, route: str, says: str
) -> None:
    url = raw_server.url(uniq(route, SIZE))
    (result,) = download_all([url], dest, backend="curl", retry=quick(2))
    assert isinstance(result.error, TransferError), result.error
    assert result.error.retryable
    assert says.format(url=url) in str(result.error)
    assert result.attempts == 2
    assert spy.direct == [True, True]
    assert listing(dest) == []
    assert temp_files(dest) == []


@pytest.mark.parametrize("path", ["direct", "python"])
def test_more_body_than_owed_is_a_transfer_error(
    raw_server: RawServer, dest: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """What reaches the file past the bytes owed fails the download, as on the chunk path.

    libcurl passes no byte past Content-Length (HTTP/1.1) and nghttp2 refuses them
    (HTTP/2), so a body cannot really go on; here the splice is told it owes 1000 bytes
    less than the body has, and the count from the file offset must see the excess.
    """
    if path == "python":
        fallocate_fails(monkeypatch, errno.EOPNOTSUPP)
    real_sink = CurlTransport._sink

    def owe_less(transport: CurlTransport, effect: Splice) -> object:
        return real_sink(transport, effect._replace(length=effect.length - 1000))

    monkeypatch.setattr(CurlTransport, "_sink", owe_less)
    url = raw_server.url(uniq("full", SIZE))
    (result,) = download_all([url], dest, backend="curl", retry=quick(2))
    assert isinstance(result.error, TransferError), result.error
    assert str(result.error) == f"{url} sent more than its Content-Length"
    assert not result.error.retryable
    assert spy.direct == [path == "direct"]
    assert listing(dest) == []
    assert temp_files(dest) == []


def test_a_write_error_reported_at_close_fails_that_download_only(
    raw_server: RawServer, dest: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS may report a failed write when the descriptor is closed: the file is not whole."""
    real_end = CurlTransport._end_direct
    failing = [True]

    class FailingClose:
        """The direct sink's writer, whose close reports EIO (once the fd is closed)."""

        def __init__(self, writer: BinaryIO) -> None:
            self.writer = writer

        def flush(self) -> None:
            self.writer.flush()

        def tell(self) -> int:
            return self.writer.tell()

        def close(self) -> None:
            self.writer.close()
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def end_direct(transport: CurlTransport, t: Any) -> None:
        if t.direct is not None and failing:
            failing.clear()
            t.direct = FailingClose(t.direct)
        real_end(transport, t)

    monkeypatch.setattr(CurlTransport, "_end_direct", end_direct)
    urls = [raw_server.url(uniq("full", SIZE)) for _ in range(2)]
    with Downloader(dest, workers=1, backend="curl", retry=quick(3)) as dl:
        failed = dl.submit(urls[0]).result(timeout=30)
        whole = dl.submit(urls[1]).result(timeout=30)
    assert isinstance(failed.error, StorageError), failed.error
    assert failed.error.errno == errno.EIO
    assert failed.attempts == 1
    assert whole.ok, whole.error
    assert whole.path is not None
    assert sha(whole.path.read_bytes()) == sha(body_of(SIZE))
    assert spy.direct == [True, True]
    assert listing(dest) == [whole.path.name]


def test_a_steady_body_slower_than_the_read_timeout_in_total_is_not_timed_out(
    raw_server: RawServer, dest: Path, spy: Spy
) -> None:
    """Bytes written by libcurl itself count as activity for the read timeout.

    The Python write callback marked the transfer active with every block; with
    libcurl writing, the loop does once a turn, from the file offset. The drip route
    sends 64 KiB every 0.1 s for about 2 s: with a read timeout of 0.5 s, a transfer
    never seen active since the splice began would be ended as idle.
    """
    size = 3 * MiB + 12_345
    url = raw_server.url(uniq("drip", size))
    (result,) = download_all([url], dest, backend="curl", timeout=(5, 0.5), retry=1)
    assert result.ok, result.error
    assert result.path is not None
    assert sha(result.path.read_bytes()) == sha(body_of(size))
    assert spy.direct == [True]


def when(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait until ``predicate`` holds (polled: nothing signals these states)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        tick.wait(0.01)


def test_cancel_mid_body_stops_the_transfer_and_leaves_nothing(
    raw_server: RawServer, dest: Path, spy: Spy
) -> None:
    # 2 MiB at once, then 64 KiB every 0.1 s: about 100 s to the end of the body.
    url = raw_server.url(uniq("drip", 64 * MiB))
    events: list[ProgressEvent] = []
    dl = Downloader(dest, workers=2, backend="curl", progress=events.append)
    try:
        future = dl.submit(url)
        when(lambda: spy.direct and progress_sizes(events), "the body in the file")
    finally:
        dl.close(cancel=True)
    # A hang guard, not a measure: the body would take 100 s to end.
    result = future.result(timeout=10)
    assert isinstance(result.error, TransferError), result.error
    assert result.error.cancelled
    assert spy.direct == [True]
    assert listing(dest) == []
    assert temp_files(dest) == []


def _fds_into(directory: Path) -> list[str]:
    """The descriptors this process holds on files below ``directory`` (any name)."""
    inside = os.path.realpath(directory) + os.sep
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(inside):
                found.append(f"{fd} -> {target}")
    return found


def _regular_fds() -> int:
    """How many descriptors this process holds on anything but sockets, pipes, epoll."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("/"):
                count += 1
    return count


def test_no_descriptor_left_after_big_bodies_that_end_every_way(
    raw_server: RawServer, tmp_path: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _regular_fds()
    # Whole, cut short, reset, and longer than Content-Length: each ends its own way.
    routes = ["full", "truncate", "reset", "long", "full", "truncate"]
    with Downloader(tmp_path / "a", workers=4, backend="curl", retry=quick(2)) as dl:
        futures = [dl.submit(raw_server.url(uniq(route, 3 * MiB))) for route in routes]
        outcomes = [f.result(timeout=30) for f in futures]
    assert [r.ok for r in outcomes] == [True, False, False, True, True, False]
    # Cancelled mid-body, several at once.
    given = len(spy.fds)
    dl = Downloader(tmp_path / "b", workers=3, backend="curl")
    try:
        futures = [dl.submit(raw_server.url(uniq("drip", 64 * MiB))) for _ in range(3)]
        when(lambda: len(spy.fds) >= given + 3, "three bodies in their files")
    finally:
        dl.close(cancel=True)
    assert all(f.result(timeout=10).error is not None for f in futures)
    # No room at allocation.
    fallocate_fails(monkeypatch, errno.ENOSPC)
    results = download_all(
        [raw_server.url(uniq("full", 3 * MiB)) for _ in range(3)],
        tmp_path / "c",
        workers=3,
        backend="curl",
    )
    assert all(isinstance(r.error, StorageError) for r in results)
    assert given >= 2  # the two whole bodies at least
    assert _fds_into(tmp_path) == []
    assert _regular_fds() == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_loop_failing_mid_body_closes_the_descriptor(
    raw_server: RawServer, dest: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = CurlTransport._wake_sleepers

    def broken(self: CurlTransport, now: float) -> None:
        if self._direct:
            raise RuntimeError("the loop broke while libcurl wrote a body")
        real(self, now)

    monkeypatch.setattr(CurlTransport, "_wake_sleepers", broken)
    with Downloader(dest, workers=1, backend="curl") as dl:
        result = dl.submit(raw_server.url(uniq("drip", 64 * MiB))).result(timeout=30)
    assert isinstance(result.error, TransferError), result.error
    assert spy.direct == [True]
    assert _fds_into(dest) == []
    assert listing(dest) == []
