"""The splice path: big plain-HTTP identity bodies moved socket -> pipe -> file.

Bodies of several MiB from a raw socket server whose framing and faults each test
chooses (and which counts connections). ``os.splice`` is wrapped to count the calls
that read the socket, so every test knows which path it took. Every guarantee of the
chunk path must hold: exact bytes, truncation and resets retried with nothing left on
disk, a full disk a StorageError, the deadline's and read timeout's errors word for
word, progress events, and the connection back in the pool after a whole body (and
closed after a failed one).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import itertools
import os
import random
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

import fetchpool.backends._splice
import fetchpool.storage
import fetchpool.transfer
from _support import listing
from fetchpool import (
    Downloader,
    ProgressEvent,
    RetryPolicy,
    StorageError,
    TransferError,
    download_all,
)
from fetchpool.backends import Request
from fetchpool.backends.requests import RequestsReply, default_session
from fetchpool.steps import run
from fetchpool.transfer import CHUNK_SIZE, Body

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "splice"), reason="os.splice is Linux-only"),
    # Big bodies on the curl backend go through its own sink mode: same faults, same rules.
    pytest.mark.usefixtures("each_backend"),
]

MiB = 1024 * 1024
SIZE = 5 * MiB + 12_345  # several pipe loads and a partial last one
B = "http://splice.test"

_counter = itertools.count()


def body_of(size: int, seed: int = 0) -> bytes:
    """A PNG-looking body (the image check passes) of ``size`` bytes."""
    return b"\x89PNG\r\n\x1a\n" + random.Random(seed).randbytes(size - 8)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def quick(attempts: int) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, wait_initial=0, wait_max=0, jitter=0)


# ----------------------------------------------------------------------- a raw server


class RawServer:
    """HTTP/1.1 with keep-alive; the path picks the framing and the fault.

    ``/full/N``       Content-Length N, N bytes, connection kept open
    ``/close/N``      no Content-Length, N bytes, then close (close-delimited)
    ``/gzip/N``       Content-Encoding gzip with its Content-Length, kept open
    ``/truncate/N``   Content-Length N, N // 2 bytes, then a clean close
    ``/reset/N``      Content-Length N, N // 2 bytes, 0.3 s later a TCP reset
    ``/long/N``       Content-Length N, N + 1000 bytes, connection kept open
    ``/drip/N``       Content-Length N, 2 MiB, then 64 KiB every 0.1 s
    ``/stall/N``      Content-Length N, 2 MiB, then nothing (connection kept open)
    ``/headstall/N``  Content-Length N, one read of the head (CHUNK_SIZE), then nothing
    ``/urgent/N``     Content-Length N, 2 MiB, a TCP urgent byte, then the rest
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError), sock:
            reader = sock.makefile("rb")
            while True:
                line = reader.readline()
                if not line:
                    return
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                with self._lock:
                    self.requests += 1
                _, target, _ = line.decode("latin-1").split(" ", 2)
                _, route, size_text = target.split("/")[:3]
                size = int(size_text)
                data = body_of(size)
                head = "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                if route == "close":
                    sock.sendall(f"{head}Connection: close\r\n\r\n".encode() + data)
                    return
                if route == "gzip":
                    packed = gzip.compress(data, compresslevel=1)
                    head += f"Content-Encoding: gzip\r\nContent-Length: {len(packed)}\r\n\r\n"
                    sock.sendall(head.encode() + packed)
                    continue
                head += f"Content-Length: {size}\r\n\r\n"
                if route == "full":
                    sock.sendall(head.encode() + data)
                elif route == "long":
                    sock.sendall(head.encode() + data + bytes(1000))
                elif route == "truncate":
                    sock.sendall(head.encode() + data[: size // 2])
                    sock.shutdown(socket.SHUT_WR)
                    return
                elif route == "reset":
                    sock.sendall(head.encode() + data[: size // 2])
                    # Let the client take what was sent (a reset drops what it has not
                    # read yet), so that the reset meets a splice, not the head's read.
                    self._stop.wait(0.3)
                    # SO_LINGER with a zero timeout: close() sends RST, not FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                elif route == "drip":
                    sock.sendall(head.encode() + data[: 2 * MiB])
                    for start in range(2 * MiB, size, 64 * 1024):
                        if self._stop.wait(0.1):
                            return
                        sock.sendall(data[start : start + 64 * 1024])
                elif route == "stall":
                    sock.sendall(head.encode() + data[: 2 * MiB])
                    self._stop.wait(30)
                    return
                elif route == "headstall":
                    sock.sendall(head.encode() + data[:CHUNK_SIZE])
                    self._stop.wait(30)
                    return
                elif route == "urgent":
                    sock.sendall(head.encode() + data[: 2 * MiB])
                    self._stop.wait(0.2)
                    # Out of band: not part of the body, and recv() steps over it.
                    sock.send(b"!", socket.MSG_OOB)
                    sock.sendall(data[2 * MiB :])

    def close(self) -> None:
        self._stop.set()
        # close() alone does not wake a thread blocked in accept(); shutdown() does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


@pytest.fixture(scope="module")
def raw_server() -> Iterator[RawServer]:
    server = RawServer()
    try:
        yield server
    finally:
        server.close()


def uniq(route: str, size: int = SIZE) -> str:
    """A fresh path (the name part is only for the file name)."""
    return f"/{route}/{size}/f{next(_counter)}.png"


class SpliceCalls:
    """Wraps ``os.splice``: counts the calls that read a socket, can inject faults."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
        #: Whether this test runs on the requests backend, the one that splices: on the
        #: curl backend the same faults go through its own sink mode, and only the
        #: outcome is checked, not the splice calls.
        self.requests = backend == "requests"
        self.real = os.splice
        self.socket_reads = 0
        self.file_writes = 0
        self.fault: Callable[[int, int], None] | None = None
        monkeypatch.setattr(os, "splice", self)
        #: On the curl backend: how many bodies went into sink mode (the loop writing
        #: the file from libcurl's write callback).
        self.sinks = 0
        if not self.requests:
            from fetchpool.backends.curl import _Transfer  # pycurl may be missing

            real_start = _Transfer.start_sink

            def start_sink(t: _Transfer, sink: Any) -> tuple[int, bool]:
                self.sinks += 1
                return real_start(t, sink)

            monkeypatch.setattr(_Transfer, "start_sink", start_sink)

    def __call__(self, src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        if stat.S_ISSOCK(os.fstat(src).st_mode):
            self.socket_reads += 1
        if stat.S_ISREG(os.fstat(dst).st_mode):
            self.file_writes += 1
        if self.fault is not None:
            self.fault(src, dst)
        result: int = self.real(src, dst, count, *args, **kwargs)
        return result


@pytest.fixture
def splices(monkeypatch: pytest.MonkeyPatch, each_backend: str) -> SpliceCalls:
    return SpliceCalls(monkeypatch, each_backend)


def progress_sizes(events: list[ProgressEvent]) -> list[int]:
    return [e.bytes for e in events if e.state == "progress"]


def no_splicing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every body too small to splice: today's chunk path, for comparison."""
    monkeypatch.setattr(fetchpool.transfer, "SPLICE_MIN", 1 << 62)


# ---------------------------------------------------------------------- integration


def test_big_body_is_spliced_byte_exact(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    events: list[ProgressEvent] = []
    (result,) = download_all([raw_server.url(uniq("full"))], dest, progress=events.append)
    assert result.ok, result.error
    assert result.path is not None
    assert result.bytes == SIZE
    assert sha(result.path.read_bytes()) == sha(body_of(SIZE))
    if splices.requests:
        assert splices.socket_reads > 0
        assert splices.file_writes > 0
    else:
        assert splices.sinks == 1
    sizes = progress_sizes(events)
    assert sizes == sorted(sizes)
    assert sizes[-1] == SIZE
    assert all(e.total == SIZE for e in events if e.state == "progress")
    # One event per MiB or so: not one per socket read, nor a few lumps on a fast link.
    assert len(sizes) >= SIZE // fetchpool.transfer.SPLICE_BLOCK, sizes
    assert len(sizes) <= 3 + SIZE // fetchpool.transfer.SPLICE_BLOCK, sizes
    assert listing(dest) == [result.path.name]


@pytest.mark.requests_only
def test_connection_goes_back_to_the_pool(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    before = raw_server.connections, raw_server.requests
    urls = [raw_server.url(uniq("full")) for _ in range(3)]
    with Downloader(dest, workers=1) as dl:
        results = [dl.submit(url).result() for url in urls]
    assert all(r.ok for r in results), [r.error for r in results]
    assert splices.socket_reads >= 3
    assert raw_server.connections - before[0] == 1
    assert raw_server.requests - before[1] == 3


class MemorySink:
    """A :class:`~fetchpool.transfer.SpliceSink` keeping the bytes in memory."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self.data += data

    def splice_from(self, pipe_fd: int, count: int) -> None:
        while count:
            got = os.read(pipe_fd, count)
            assert got
            self.data += got
            count -= len(got)


def body_of_response(resp: requests.Response) -> Body:
    """The pipeline's :class:`Body` over a response read with a bare session."""
    request = Request(resp.url, {}, None, (), (10, 10), resp.url)
    return Body(RequestsReply(resp, request, None), resp.url, None, None)


def receive(body: Body, sink: MemorySink) -> bool:
    """What the downloader does: the head, the splice, then the end of the body."""
    sink.write(run(body.read()))
    spliced = run(body.splice_into(sink, lambda: None))
    while chunk := run(body.read()):
        sink.write(chunk)
    return spliced


@pytest.mark.requests_only
def test_session_reuses_the_connection_after_a_spliced_body(splices: SpliceCalls) -> None:
    server = RawServer()
    try:
        session = default_session(1)
        for _ in range(2):
            resp = session.get(server.url(uniq("full", 3 * MiB)), stream=True, timeout=10)
            sink = MemorySink()
            assert receive(body_of_response(resp), sink)
            assert bytes(sink.data) == body_of(3 * MiB)
            # urllib3 released it at the end of the body, before any close().
            assert resp.raw._connection is None
            resp.close()
        assert server.connections == 1
        assert server.requests == 2
        session.close()
    finally:
        server.close()


@pytest.mark.requests_only
def test_failed_splice_closes_the_connection(raw_server: RawServer) -> None:
    session = default_session(1)
    resp = session.get(raw_server.url(uniq("full")), stream=True, timeout=10)
    connection = resp.raw._connection
    assert connection is not None
    assert connection.sock is not None

    class FullDisk(MemorySink):
        def splice_from(self, pipe_fd: int, count: int) -> None:
            raise StorageError("disk full", errno=errno.ENOSPC)

    with pytest.raises(StorageError):
        receive(body_of_response(resp), FullDisk())
    assert connection.sock is None
    resp.close()
    session.close()


def test_truncated_body_is_retried_and_leaves_nothing(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    before = raw_server.requests
    (result,) = download_all([raw_server.url(uniq("truncate"))], dest, retry=quick(2))
    assert isinstance(result.error, TransferError)
    assert result.error.retryable
    assert f"truncated body from {raw_server.url('')}" in str(result.error)
    assert f"{SIZE // 2} of {SIZE} bytes" in str(result.error)
    assert result.attempts == 2
    assert raw_server.requests - before == 2
    assert splices.socket_reads >= 2 or not splices.requests
    assert listing(dest) == []


def test_reset_mid_body_is_retried_and_leaves_nothing(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    (result,) = download_all([raw_server.url(uniq("reset"))], dest, retry=quick(2))
    assert isinstance(result.error, TransferError)
    assert result.error.retryable
    assert result.attempts == 2
    if splices.requests:
        assert splices.socket_reads >= 2
        assert "Connection broken: ConnectionResetError" in str(result.error)
    else:
        assert "Connection reset by peer" in str(result.error)
    assert listing(dest) == []


def test_body_past_content_length_never_reaches_the_file(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    # Only Content-Length bytes are spliced; urllib3 then sees unread bytes on the idle
    # connection and opens a new one for the next request.
    urls = [raw_server.url(uniq("long")), raw_server.url(uniq("full"))]
    with Downloader(dest, workers=1) as dl:
        results = [dl.submit(url).result() for url in urls]
    assert all(r.ok for r in results), [r.error for r in results]
    for r in results:
        assert r.path is not None
        assert r.path.read_bytes() == body_of(SIZE)
    assert splices.socket_reads >= 2 or not splices.requests


def test_full_disk_is_a_storage_error_not_retried(
    raw_server: RawServer, dest: Path, splices: SpliceCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(src: int, dst: int) -> None:
        if stat.S_ISREG(os.fstat(dst).st_mode):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    splices.fault = full
    if not splices.requests:
        # The curl backend allocates the body's space before libcurl writes it: the disk
        # fills there. (Where the file system cannot allocate ahead, its Python path
        # writes the body: see test_curl_direct_sink.py.)
        def no_room(fd: int, offset: int, length: int) -> None:
            splices.file_writes += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", no_room)
    before = raw_server.requests
    (result,) = download_all([raw_server.url(uniq("full"))], dest, retry=quick(3))
    assert isinstance(result.error, StorageError)
    assert result.error.errno == errno.ENOSPC
    assert result.attempts == 1
    assert raw_server.requests - before == 1
    assert splices.file_writes >= 1
    assert splices.requests or splices.sinks == 1
    assert listing(dest) == []


def test_max_bytes_refuses_before_the_body(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    (result,) = download_all([raw_server.url(uniq("full"))], dest, max_bytes=2 * MiB)
    assert result.error is not None
    assert type(result.error).__name__ == "TooLargeError"
    assert splices.socket_reads == 0
    assert listing(dest) == []


def _error_of(url: str, dest: Path, **options: Any) -> tuple[BaseException | None, float]:
    start = time.monotonic()
    (result,) = download_all([url], dest, retry=1, **options)
    return result.error, time.monotonic() - start


def test_deadline_mid_body_gives_the_chunk_paths_error(
    raw_server: RawServer, dest: Path, splices: SpliceCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = raw_server.url(uniq("drip"))
    spliced, elapsed = _error_of(url, dest, deadline=1.0)
    assert splices.socket_reads > 0 or not splices.requests
    assert elapsed < 5
    assert listing(dest) == []
    no_splicing(monkeypatch)
    reads = splices.socket_reads
    chunked, _ = _error_of(url, dest, deadline=1.0)
    assert splices.socket_reads == reads
    assert isinstance(spliced, TransferError)
    assert type(spliced) is type(chunked)
    assert str(spliced) == str(chunked)
    assert "deadline of 1 s exceeded while reading" in str(spliced)
    assert spliced.retryable
    assert listing(dest) == []


def test_read_timeout_mid_body_gives_the_chunk_paths_error(
    raw_server: RawServer, dest: Path, splices: SpliceCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = raw_server.url(uniq("stall"))
    spliced, elapsed = _error_of(url, dest, timeout=(5, 0.5))
    assert splices.socket_reads > 0 or not splices.requests
    assert 0.4 < elapsed < 5
    no_splicing(monkeypatch)
    chunked, _ = _error_of(url, dest, timeout=(5, 0.5))
    assert isinstance(spliced, TransferError)
    assert type(spliced) is type(chunked)
    assert str(spliced) == str(chunked)
    assert "timed out while reading" in str(spliced)
    assert listing(dest) == []


def test_read_timeout_before_any_splice_gives_the_chunk_paths_error(
    raw_server: RawServer, dest: Path, splices: SpliceCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The head is read, then nothing: the wait is in the look at http.client's buffer.
    url = raw_server.url(uniq("headstall"))
    spliced, _ = _error_of(url, dest, timeout=(5, 0.5))
    no_splicing(monkeypatch)
    chunked, _ = _error_of(url, dest, timeout=(5, 0.5))
    assert isinstance(spliced, TransferError)
    assert type(spliced) is type(chunked)
    assert str(spliced) == str(chunked)
    assert listing(dest) == []


@pytest.mark.requests_only
def test_a_read_timeout_beyond_what_poll_takes_still_splices(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    (result,) = download_all([raw_server.url(uniq("drip", 3 * MiB))], dest, timeout=(5, 3e6))
    assert result.ok, result.error
    assert result.path is not None
    assert sha(result.path.read_bytes()) == sha(body_of(3 * MiB))
    assert splices.socket_reads > 0


# ------------------------------------------------------------------- the fallbacks


@pytest.mark.requests_only
def test_urgent_data_hands_the_rest_to_the_chunk_path(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    # A socket splice stops for good in front of TCP urgent data, while poll() keeps
    # saying readable: without a way out, the worker would spin until the deadline.
    start = time.monotonic()
    (result,) = download_all([raw_server.url(uniq("urgent"))], dest, deadline=10)
    assert result.ok, result.error
    assert result.attempts == 1
    assert time.monotonic() - start < 5
    assert result.path is not None
    assert sha(result.path.read_bytes()) == sha(body_of(SIZE))
    assert 0 < splices.socket_reads < 1000


@pytest.mark.requests_only
def test_no_descriptor_left_for_a_pipe_takes_the_chunk_path(
    raw_server: RawServer, dest: Path, splices: SpliceCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fds(flags: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pipe2", no_fds)
    (result,) = download_all([raw_server.url(uniq("full"))], dest)
    assert result.ok, result.error
    assert result.attempts == 1
    assert result.path is not None
    assert sha(result.path.read_bytes()) == sha(body_of(SIZE))
    assert splices.socket_reads == 0


@pytest.mark.requests_only
@pytest.mark.parametrize("route", ["close", "gzip"])
def test_unspliceable_framing_takes_the_chunk_path(
    raw_server: RawServer, dest: Path, splices: SpliceCalls, route: str
) -> None:
    (result,) = download_all([raw_server.url(uniq(route))], dest)
    assert result.ok, result.error
    assert result.path is not None
    assert sha(result.path.read_bytes()) == sha(body_of(SIZE))
    assert splices.socket_reads == 0


@pytest.mark.requests_only
def test_small_body_takes_the_chunk_path(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    size = fetchpool.transfer.CHUNK_SIZE + fetchpool.transfer.SPLICE_MIN - 1
    (result,) = download_all([raw_server.url(uniq("full", size))], dest)
    assert result.ok, result.error
    assert result.path is not None
    assert result.path.read_bytes() == body_of(size)
    assert splices.socket_reads == 0


@pytest.mark.requests_only
def test_responses_mock_takes_the_chunk_path(
    rs: responses.RequestsMock, dest: Path, splices: SpliceCalls
) -> None:
    data = body_of(SIZE, 1)
    rs.get(f"{B}/a.png", body=data, headers={"Content-Length": str(SIZE)})
    (result,) = download_all([f"{B}/a.png"], dest)
    assert result.ok, result.error
    assert result.path is not None
    assert sha(result.path.read_bytes()) == sha(data)
    assert splices.socket_reads == 0
    resp = requests.get(f"{B}/a.png", stream=True, timeout=5)
    assert fetchpool.backends._splice.spliceable(resp) is None


@pytest.mark.requests_only
def test_socket_that_cannot_be_spliced_falls_back(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    def refuse(src: int, dst: int) -> None:
        if stat.S_ISSOCK(os.fstat(src).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    splices.fault = refuse
    events: list[ProgressEvent] = []
    (result,) = download_all([raw_server.url(uniq("full"))], dest, progress=events.append)
    assert result.ok, result.error
    assert result.path is not None
    assert sha(result.path.read_bytes()) == sha(body_of(SIZE))
    assert splices.socket_reads == 1
    sizes = progress_sizes(events)
    assert sizes == sorted(sizes)
    assert sizes[-1] == SIZE


@pytest.mark.requests_only
def test_file_that_cannot_take_a_splice_gets_the_bytes_written(
    raw_server: RawServer, dest: Path, splices: SpliceCalls
) -> None:
    def refuse(src: int, dst: int) -> None:
        if stat.S_ISREG(os.fstat(dst).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    splices.fault = refuse
    (result,) = download_all([raw_server.url(uniq("full"))], dest)
    assert result.ok, result.error
    assert result.path is not None
    assert sha(result.path.read_bytes()) == sha(body_of(SIZE))
    assert splices.socket_reads > 0
