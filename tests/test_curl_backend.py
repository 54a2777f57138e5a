"""The curl backend (``backend="curl"``) under the interleavings and answers it must survive.

Two kinds of test live here. Black-box ones drive :class:`fetchpool.Downloader` (or the
transport seam, :meth:`CurlTransport.send`) against a loopback server and check the
DESIGN.md contract, most of them on both backends so that the curl backend is held to
what the requests backend does. A few force one thread interleaving that is otherwise
rare (a close landing while the loop thread is inside libcurl, a worker descheduled
between two statements): they wrap one internal method of :mod:`fetchpool.backends.curl`
with ``monkeypatch`` to run the other thread's step at exactly that point, and say so.

Servers: :class:`fetchpool.testing.ImageServer` where its routes suffice, and
:class:`RawServer` below for answers no well-behaved server gives (malformed status
lines, informational responses, endless non-2xx bodies, a body larger than the curl
backend's 1 MiB buffer).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import itertools
import logging
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests.utils

from _support import held_locks, listing, temp_files
from fetchpool import (
    Downloader,
    DownloadResult,
    HTTPStatusError,
    NotAnImageError,
    ProgressEvent,
    RetryPolicy,
    StorageError,
    TransferError,
    download_all,
)
from fetchpool.backends import Reply, Request, Transport
from fetchpool.backends.requests import RequestsTransport
from fetchpool.deadline import Guard, Watchdog
from fetchpool.testing import ImageServer

pycurl = pytest.importorskip("pycurl")

from fetchpool.backends.curl import CurlTransport, _Slot  # noqa: E402

MiB = 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: A small body that sniffs as a PNG.
SMALL_PNG = PNG_SIGNATURE + bytes(range(256)) * 40
#: A body well beyond the curl backend's buffer (1 MiB), so the transfer pauses.
BIG_PNG = PNG_SIGNATURE + random.Random(7).randbytes(6 * MiB)
TESTS = Path(__file__).resolve().parent
PROC_SERVER = TESTS / "_proc_server.py"

_names = itertools.count()


def uniq(stem: str = "c", ext: str = ".png") -> str:
    """A name no other test of this module uses (ImageServer keeps state per path)."""
    return f"{stem}{next(_names)}{ext}"


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` (for states nothing signals) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        tick.wait(0.005)


def ok_response(body: bytes, content_type: str = "image/png", extra: bytes = b"") -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        content_type.encode(),
        len(body),
    )
    return head + extra + b"\r\n" + body


def request(url: str, read: float = 5.0) -> Request:
    """One GET for the transport seam, as :func:`fetchpool.transfer.open_response` makes it."""
    return Request(
        url=url,
        headers={"Accept-Encoding": "identity"},
        auth=None,
        drop=(),
        timeout=(5.0, read),
        shown=url,
    )


def read_all(reply: Reply) -> bytes:
    try:
        return b"".join(reply.chunks(256 * 1024))
    finally:
        reply.close()


def drain(reply: Reply, most: int) -> int:
    """Read and drop the body; fail if it goes on past ``most`` bytes."""
    received = 0
    for chunk in reply.chunks(256 * 1024):
        received += len(chunk)
        assert received < most, f"the body went on past {most} bytes"
    return received


def fetchpool_threads() -> set[threading.Thread]:
    """The threads fetchpool runs (workers, watchdog, curl loop), not the test servers'."""
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith("fetchpool") and not t.name.startswith("fetchpool-testing")
    }


def new_threads(before: set[threading.Thread]) -> list[str]:
    """The names of fetchpool threads running now that did not run before."""
    return sorted(t.name for t in fetchpool_threads() - before)


# --------------------------------------------------------------------------- servers

Route = bytes | Callable[[socket.socket], None]


class RawServer:
    """A loopback server that answers each connection with canned bytes, then closes it.

    The answer is picked by the request path (``routes``); an unknown path gets a 404.
    After answering, the server half-closes and waits for the client to hang up, so the
    client sees a clean end of stream and never a reset. A route may be a callable that
    writes to the socket itself (an endless body: it returns when the client leaves).
    """

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._accepting = threading.Thread(target=self._accept, name="raw-accept", daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> RawServer:
        self._accepting.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # shutdown() wakes a thread blocked in accept(); close() alone does not.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accepting.join(5)
        with self._lock:
            clients = list(self._clients)
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="raw-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            parts = head.split(b" ", 2)
            target = parts[1].decode("latin-1") if len(parts) > 1 else "/"
            route = self.routes.get(target, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            if callable(route):
                route(conn)
            else:
                conn.sendall(route)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        except OSError:
            pass
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()


def endless_body(status: bytes, extra: bytes = b"") -> Callable[[socket.socket], None]:
    """A route: ``status`` with a chunked body that never ends (until the client leaves)."""

    def route(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n" + extra + b"\r\n"
        )
        chunk = b"%x\r\n" % (64 * 1024) + bytes(64 * 1024) + b"\r\n"
        while True:
            conn.sendall(chunk)

    return route


def paced_body(length: int, block: int = 64 * 1024, every: float = 0.002) -> Route:
    """A route: a 200 of ``length`` bytes, ``block`` bytes every ``every`` seconds."""

    def route(conn: socket.socket) -> None:
        conn.sendall(
            ok_response(b"")[: -len(b"\r\n")].replace(b"Length: 0", b"Length: %d" % length)
        )
        conn.sendall(b"\r\n" + PNG_SIGNATURE + bytes(block - len(PNG_SIGNATURE)))
        pace = threading.Event()
        for _ in range(length // block - 1):
            pace.wait(every)
            conn.sendall(bytes(block))

    return route


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def proxy() -> Iterator[ImageServer]:
    """A second ImageServer: it answers absolute-form requests too, so it works as a proxy."""
    with ImageServer(n_images=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def raw() -> Iterator[RawServer]:
    with RawServer() as srv:
        srv.routes.update(
            {
                "/small.png": ok_response(SMALL_PNG),
                "/big.png": ok_response(BIG_PNG),
                "/garbage.png": b"garbage\r\n\r\n",
                "/two-digit-status.png": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
                "/empty.png": b"",
                "/header-named-http.png": ok_response(SMALL_PNG, extra=b"HTTP/x: y\r\n"),
                "/continue.png": b"HTTP/1.1 100 Continue\r\n\r\n" + ok_response(SMALL_PNG),
                "/early-hints.png": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload"
                b"\r\n\r\n" + ok_response(SMALL_PNG),
                "/no-content.png": b"HTTP/1.1 204 No Content\r\n\r\n",
                "/not-modified.png": b"HTTP/1.1 304 Not Modified\r\n\r\n",
                "/chunked-cut.png": b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(SMALL_PNG) + SMALL_PNG + b"\r\n",
                "/302-endless.png": endless_body(b"302 Found", b"Location: /small.png\r\n"),
                "/404-endless.png": endless_body(b"404 Not Found"),
                "/paced.png": paced_body(32 * MiB),
            }
        )
        yield srv


@pytest.fixture
def watchdog() -> Iterator[Watchdog]:
    wd = Watchdog()
    yield wd
    wd.stop()


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> dict[str, threading.Event]:
    """``pauses[url]`` is set when libcurl is first told to pause that URL's transfer.

    Wraps ``_Slot.on_write`` (internal): set up before the transport makes its handles.
    """
    events: dict[str, threading.Event] = {}
    original = _Slot.on_write

    def on_write(self: _Slot, data: bytes) -> int | None:
        result = original(self, data)
        t = self.transfer
        if t is not None and result == pycurl.WRITEFUNC_PAUSE:
            events.setdefault(t.request.url, threading.Event()).set()
        return result

    monkeypatch.setattr(_Slot, "on_write", on_write)
    return events


def paused(pauses: dict[str, threading.Event], url: str, timeout: float = 5.0) -> None:
    wait_for(lambda: url in pauses, timeout, f"a pause of {url}")
    assert pauses[url].wait(timeout)


# ============================================================================ bugs
# Each of these fails today on the curl backend.


@pytest.mark.parametrize("backend", ["requests", "curl"])
def test_a_guard_fired_before_send_ends_the_attempt_at_once(
    server: ImageServer, watchdog: Watchdog, backend: str
) -> None:
    """Transport.send must end the attempt when its guard fires, also if it already has.

    A guard is already fired when a redirect hop starts after the deadline passed (or
    the cancel came) during the previous hop. The curl transport registers the abort
    first (``on_fire`` runs it at once), then posts "add": the loop drops the abort (not
    running yet) and runs the transfer as if no guard existed, until the server answers.
    """
    transport: Transport = RequestsTransport(1) if backend == "requests" else CurlTransport(1)
    url = server.url(f"/slow/{uniq()}?delay=2")
    try:
        with watchdog.guard(30) as guard:
            watchdog.cancel_all()
            start = time.monotonic()
            with pytest.raises(TransferError) as info:
                transport.send(request(url), guard).close()
            took = time.monotonic() - start
    finally:
        transport.close()
    assert info.value.cancelled, info.value
    assert took < 1.0, f"send() ran {took:.1f} s under a guard that had fired"


def test_cancel_between_redirect_hops_stops_the_next_hop(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    """close(cancel=True) landing between two hops must stop the second hop at once.

    The interleaving is made certain through the public log: at the "redirect" record
    (on the worker thread, between the hops) another thread cancels, and the worker
    goes on only once its attempt's guard has fired.
    """
    name = uniq("hop")
    url = server.url("/redirect-to?location=" + quote(f"/slow/{name}?delay=2", safe=""))
    dl = Downloader(dest, workers=1, retry=1)
    guards: list[Guard] = []
    make_guard = dl._watchdog.guard

    def guard_noted(seconds: float, limit: str = "deadline", began: float | None = None) -> Guard:
        guards.append(make_guard(seconds, limit, began))
        return guards[-1]

    dl._watchdog.guard = guard_noted  # type: ignore[method-assign]
    closers: list[threading.Thread] = []
    took: list[float] = []

    def cancel() -> None:
        start = time.monotonic()
        dl.close(cancel=True)
        took.append(time.monotonic() - start)

    class CancelAtRedirect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if closers or not record.getMessage().startswith("redirect"):
                return
            guard = guards[-1]
            closers.append(threading.Thread(target=cancel))
            closers[0].start()
            wait_for(lambda: guard.cancelled, 5, "the cancel to fire the attempt's guard")

    logger = logging.getLogger("fetchpool")
    handler, level = CancelAtRedirect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        result = dl.submit(url).result(timeout=10)
        assert closers, "no redirect was logged"
        closers[0].join(10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        dl.close(cancel=True)
    assert result.status == "failed"
    assert isinstance(result.error, TransferError)
    assert result.error.cancelled
    assert took[0] < 1.0, f"close(cancel=True) waited {took[0]:.1f} s for the second hop"
    assert listing(dest) == []


def test_a_close_landing_while_a_resume_delivers_leaves_the_loop_alive(
    server: ImageServer, watchdog: Watchdog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker closing its reply while the loop unpauses it must not kill the loop.

    The loop checks ``t.closed``, then calls ``easy.pause(PAUSE_CONT)``; libcurl hands
    the held bytes to the write callback from inside that call. If the worker's close()
    lands in between (it runs on another thread, unsynchronised), the callback refuses
    the bytes, pause() raises ``pycurl.error`` out of ``_do_commands`` and the loop
    thread dies: every later download of that Downloader fails ("the curl loop failed").
    Forced here: the close is run, on its own thread, at the first delivery after a pause.
    """
    url = server.url(f"/huge-length/{uniq()}")
    replies: list[Reply] = []
    was_paused = threading.Event()
    closed_inside = threading.Event()
    original = _Slot.on_write

    def on_write(self: _Slot, data: bytes) -> int | None:
        t = self.transfer
        # The pause may come before send() has returned the reply (the buffer fills in
        # milliseconds): it is noted whatever; the close needs the reply, so it waits
        # for the first delivery after the resume, which the test's reading causes.
        mine = t is not None and t.request.url == url
        if mine and replies and was_paused.is_set() and not closed_inside.is_set():
            closed_inside.set()
            closer = threading.Thread(target=replies[0].close)
            closer.start()
            closer.join()
        result = original(self, data)
        if mine and result == pycurl.WRITEFUNC_PAUSE:
            was_paused.set()
        return result

    monkeypatch.setattr(_Slot, "on_write", on_write)
    transport = CurlTransport(1)
    try:
        with watchdog.guard(20) as guard:
            reply = transport.send(request(url), guard)
            replies.append(reply)
            assert was_paused.wait(5), "the transfer never paused"
            with pytest.raises(TransferError):  # closed under the reader's feet
                drain(reply, 64 * MiB)
            assert closed_inside.is_set()
        with watchdog.guard(10) as guard:
            body = read_all(transport.send(request(server.urls[0]), guard))
    finally:
        transport.close()
    assert body == server.expected(server.urls[0])


def test_a_late_resume_is_not_taken_for_a_read_timeout(
    raw: RawServer, watchdog: Watchdog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused transfer is not idle: resuming it late must not time it out.

    The worker clears ``t.paused`` under the lock, releases it, then posts "resume". If
    the loop runs ``_check_idle`` in between, it sees an unpaused transfer whose last
    byte is older than the read timeout (the consumer was busy meanwhile) and ends it
    with "no data for 0.3 s", though the server was never asked for more. Forced here:
    the worker loses the CPU in that gap until the loop has looked for idle transfers.
    """
    checked = threading.Event()
    check_idle, post = CurlTransport._check_idle, CurlTransport.post

    def checking(self: CurlTransport, now: float) -> float:
        try:
            return check_idle(self, now)
        finally:
            checked.set()

    delayed: list[bool] = []

    def descheduled_post(self: CurlTransport, what: str, *args: object) -> None:
        if what == "resume" and not delayed:
            delayed.append(True)
            checked.clear()
            checked.wait(5)
        post(self, what, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(CurlTransport, "_check_idle", checking)
    monkeypatch.setattr(CurlTransport, "post", descheduled_post)
    transport = CurlTransport(1)
    try:
        with watchdog.guard(20) as guard:
            reply = transport.send(request(raw.url("/big.png"), read=0.3), guard)
            # The consumer is busy for longer than the read timeout, while libcurl holds
            # the rest of the body back (the buffer filled and paused in milliseconds):
            # time has to pass here, there is nothing to wait for.
            threading.Event().wait(0.6)
            body = read_all(reply)
    finally:
        transport.close()
    assert delayed, "the transfer was never paused and resumed"
    assert body == BIG_PNG


class RecordingSink:
    """A splice sink that notes any write arriving after its worker left ``splice()``."""

    def __init__(self) -> None:
        self.size = 0
        self.left = threading.Event()
        self.late = threading.Event()

    def write(self, data: bytes | memoryview) -> None:
        if self.left.is_set():
            self.late.set()
        self.size += len(data)

    def splice_from(self, pipe_fd: int, count: int) -> None:
        raise AssertionError("the curl backend never splices from a pipe")


def splice_then_close(reply: Reply, sink: RecordingSink) -> None:
    """As the pipeline does: splice; on failure discard the file, and only then close."""
    try:
        reply.splice(sink, 32 * MiB, lambda n: None)
    finally:
        sink.left.set()  # TempFile.discard() here: the fd is closed, its number free
        # The worker loses the CPU before it gets to reply.close() (at most 0.5 s).
        sink.late.wait(0.5)
        reply.close()


def test_no_sink_write_after_splice_has_raised(
    raw: RawServer, watchdog: Watchdog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once ``splice()`` raised, the loop thread must not write to the sink any more.

    ``Guard.fired`` is true by the clock alone, so the worker in ``splice()`` raises as
    soon as it wakes past the deadline, whether or not the watchdog thread has posted
    its "abort" yet. The pipeline then discards the temporary file (closing its fd) and
    only after that closes the reply (``t.closed``, which on_write checks). In between
    the loop goes on writing the body into the abandoned file: into nothing (an
    AssertionError kept as ``sink_error``) or, if the loop had read the fd number and
    another download's temporary file got that number meanwhile, into that other file,
    silently. Forced here: the watchdog thread and the worker are descheduled at those
    two points until the loop has written once more (or 0.5 s passed).
    """
    sink = RecordingSink()
    post = CurlTransport.post

    def late_watchdog(self: CurlTransport, what: str, *args: object) -> None:
        if what == "abort" and threading.current_thread().name == "fetchpool-watchdog":
            sink.left.wait(2)
            sink.late.wait(0.5)
        post(self, what, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(CurlTransport, "post", late_watchdog)
    transport = CurlTransport(1)
    try:
        with watchdog.guard(0.3) as guard:
            reply = transport.send(request(raw.url("/paced.png")), guard)
            with pytest.raises(TransferError, match="deadline"):
                splice_then_close(reply, sink)
    finally:
        transport.close()
    assert not sink.late.is_set(), "the loop wrote to the sink after splice() had raised"


class StallingSink(RecordingSink):
    """A sink on a disk that stalls once (NFS, a busy device) for ``stall`` seconds."""

    def __init__(self, stall: float) -> None:
        super().__init__()
        self.stall = stall
        self.writes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.writes += 1
        if self.writes == 3:
            threading.Event().wait(self.stall)
        super().write(data)


def test_a_stalled_file_write_does_not_time_out_other_transfers(
    server: ImageServer, raw: RawServer, watchdog: Watchdog
) -> None:
    """One slow disk write must not fail transfers whose server kept sending.

    In sink mode the loop thread itself writes the file, so while one write stalls no
    socket is read. ``_check_idle`` runs before the next select(): every other transfer
    then looks idle since the stall began and is ended with "no data for 0.3 s", though
    its bytes were waiting in the socket. (On requests each worker reads its own socket.)
    """
    transport = CurlTransport(2)
    dripping = server.url(f"/drip/{uniq()}?interval=0.02")
    outcome: list[object] = []
    spliced = threading.Event()

    def read_drip() -> None:
        with watchdog.guard(10) as guard:
            reply = transport.send(request(dripping, read=0.3), guard)
            try:
                for _ in reply.chunks(1):
                    if spliced.is_set():
                        break
                outcome.append("ok")
            except TransferError as exc:
                outcome.append(exc)
            finally:
                reply.close()

    reader = threading.Thread(target=read_drip)
    try:
        reader.start()
        wait_for(lambda: server.hits(dripping) == 1, 5, "the dripping request")
        with watchdog.guard(10) as guard:
            reply = transport.send(request(raw.url("/paced.png")), guard)
            try:
                assert reply.splice(StallingSink(0.8), 32 * MiB, lambda n: None)
            finally:
                spliced.set()
                reply.close()
        reader.join(5)
    finally:
        transport.close()
    assert outcome == ["ok"]


class FullDisk(RecordingSink):
    def write(self, data: bytes | memoryview) -> None:
        if self.size > 2 * MiB:
            raise StorageError("cannot write to /dest: No space left on device", errno=28)
        super().write(data)


def test_a_sink_that_fails_fails_the_splice_with_its_error(
    raw: RawServer, watchdog: Watchdog, server: ImageServer
) -> None:
    """A StorageError raised on the loop thread reaches the worker; the loop lives on."""
    transport = CurlTransport(1)
    try:
        with watchdog.guard(10) as guard:
            reply = transport.send(request(raw.url("/paced.png")), guard)
            try:
                with pytest.raises(StorageError, match="No space left"):
                    reply.splice(FullDisk(), 32 * MiB, lambda n: None)
            finally:
                reply.close()
        with watchdog.guard(10) as guard:
            body = read_all(transport.send(request(server.urls[0]), guard))
    finally:
        transport.close()
    assert body == server.expected(server.urls[0])


@pytest.mark.parametrize("path", ["/garbage.png", "/two-digit-status.png", "/empty.png"])
def test_a_broken_answer_fails_with_the_type_requests_gives(
    raw: RawServer, dest: Path, each_backend: str, path: str
) -> None:
    """A malformed status line is the server's fault: a TransferError, as on requests.

    libcurl reports "Received HTTP/0.9 when not allowed" and "Unsupported HTTP/1
    subversion" as CURLE_UNSUPPORTED_PROTOCOL, which the curl backend takes for an
    unsupported URL scheme: the result says ``InvalidURL``.
    """
    (result,) = download_all([raw.url(path)], dest, retry=1, timeout=5)
    assert result.status == "failed"
    assert isinstance(result.error, TransferError), repr(result.error)
    assert listing(dest) == []


def test_a_header_named_like_a_status_line_is_a_header(
    raw: RawServer, dest: Path, each_backend: str
) -> None:
    """Only the first line of a header block is a status line.

    The header callback takes any line starting with ``HTTP/`` for a new response: a
    (malformed) header ``HTTP/x: y`` in a 200 answer resets the status to 0, and the
    download fails with "HTTP 0". requests downloads it.
    """
    (result,) = download_all([raw.url("/header-named-http.png")], dest, retry=1)
    assert result.ok, result.error
    assert (dest / "header-named-http.png").read_bytes() == SMALL_PNG


@pytest.mark.parametrize(
    ("host", "no_proxy"),
    [
        ("localhost.", "localhost"),  # bug: libcurl reads no_proxy itself, and strips dots
        ("localhost", "localhost."),  # bug: same
        ("127.0.0.1", "127.0.0.1"),  # holds: bypassed on both
        ("127.0.0.1", ""),  # holds: proxied on both
    ],
)
def test_the_proxy_is_chosen_as_requests_chooses_it(
    server: ImageServer,
    proxy: ImageServer,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    each_backend: str,
    host: str,
    no_proxy: str,
) -> None:
    """Proxy or not is decided once, by requests' rules, on both backends.

    The curl backend picks the proxy with requests' helpers and sets CURLOPT_PROXY, but
    libcurl still reads ``no_proxy`` from the environment (unless CURLOPT_NOPROXY is
    set) and applies its own matching on top: where the two disagree (a trailing dot,
    for one), the curl backend goes direct although requests would use the proxy.
    """
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy.base_url)
    monkeypatch.setenv("no_proxy", no_proxy)
    path = f"/any/{uniq('proxied')}"
    url = f"http://{host}:{server.base_url.rsplit(':', 1)[1].rstrip('/')}{path}"
    bypass = requests.utils.should_bypass_proxies(url, no_proxy=None)
    proxy.reset_hits()
    server.reset_hits()

    (result,) = download_all([url], dest, retry=1, timeout=5)

    assert result.ok, result.error
    went = {"proxy": proxy.hits(path), "direct": server.hits(path)}
    assert went == ({"proxy": 0, "direct": 1} if bypass else {"proxy": 1, "direct": 0})


def test_send_after_the_transport_closed_fails_at_once(
    server: ImageServer, watchdog: Watchdog
) -> None:
    """A send() racing (or following) CurlTransport.close() must not wait forever.

    After close() no loop thread runs and none is started again: the "add" (and the
    guard's "abort") sit in the queue for good, and wait_headers() only gives up when
    the loop *failed*; the post also writes its wake-up byte to a closed (reusable) fd.
    """
    transport = CurlTransport(1)
    with watchdog.guard(10) as guard:
        read_all(transport.send(request(server.urls[0]), guard))
    transport.close()
    outcome: list[object] = []

    def attempt() -> None:
        with watchdog.guard(0.5) as guard:
            try:
                read_all(transport.send(request(server.urls[1]), guard))
                outcome.append("sent")
            except Exception as exc:
                outcome.append(exc)

    thread = threading.Thread(target=attempt, name="send-after-close", daemon=True)
    thread.start()
    thread.join(2)
    assert not thread.is_alive(), "send() after close() hangs, past its deadline too"
    assert outcome


def test_an_informational_103_before_the_200_is_skipped(
    raw: RawServer, dest: Path, each_backend: str
) -> None:
    """Any 1xx before the final answer is skipped (RFC 9110 15.2), not only 100.

    Holds on curl. Fails on the *requests* backend: http.client skips 100 Continue
    only, so a 103 Early Hints is taken for the final answer (``HTTP 103``).
    """
    if each_backend == "requests":
        pytest.skip("known limit of the requests backend: http.client skips 100 only")
    (result,) = download_all([raw.url("/early-hints.png")], dest, retry=1)
    assert result.ok, result.error
    assert (dest / "early-hints.png").read_bytes() == SMALL_PNG


def test_a_cut_chunked_body_says_what_it_got(raw: RawServer, dest: Path, each_backend: str) -> None:
    """A chunked body cut short is a retryable TransferError with a sensible message.

    On curl it reaches Body as BodyEnded and is worded "... 10248 of None bytes".
    """
    (result,) = download_all([raw.url("/chunked-cut.png")], dest, retry=1)
    assert isinstance(result.error, TransferError)
    assert result.error.retryable
    assert "None" not in str(result.error), str(result.error)
    assert listing(dest) == []


# ============================================================== holds, keep it so


def test_every_byte_survives_many_pauses(raw: RawServer, dest: Path, each_backend: str) -> None:
    """A consumer slower than the wire: the curl transfer pauses and resumes many times."""
    stall = threading.Event()

    def slow(event: ProgressEvent) -> None:
        if event.state == "progress":
            stall.wait(0.001)

    (result,) = download_all([raw.url("/big.png")], dest, progress=slow)
    assert result.ok, result.error
    data = (dest / "big.png").read_bytes()
    assert hashlib.sha256(data).digest() == hashlib.sha256(BIG_PNG).digest()


def test_a_consumer_stalled_past_the_read_timeout_is_not_timed_out(
    raw: RawServer, dest: Path, each_backend: str
) -> None:
    """The read timeout is about the server; a busy consumer (paused transfer) is not idle."""
    stalled: list[bool] = []

    def stall_once(event: ProgressEvent) -> None:
        if event.state == "progress" and not stalled:
            stalled.append(True)
            threading.Event().wait(0.5)  # longer than the read timeout: time must pass

    (result,) = download_all([raw.url("/big.png")], dest, timeout=(5, 0.2), progress=stall_once)
    assert stalled
    assert result.ok, result.error
    assert (dest / "big.png").read_bytes() == BIG_PNG


def test_a_handle_closed_while_paused_serves_the_next_transfers(
    raw: RawServer, pauses: dict[str, threading.Event], watchdog: Watchdog
) -> None:
    """Closing a paused transfer leaves neither its handle paused nor its connection reused."""
    transport = CurlTransport(1)
    try:
        for round_ in range(3):
            big = raw.url(f"/big.png?round={round_}")
            raw.routes[f"/big.png?round={round_}"] = ok_response(BIG_PNG)
            with watchdog.guard(10) as guard:
                reply = transport.send(request(big), guard)
                paused(pauses, big)
                reply.close()
            with watchdog.guard(10) as guard:
                start = time.monotonic()
                body = read_all(transport.send(request(raw.url("/small.png")), guard))
                assert time.monotonic() - start < 2
            assert body == SMALL_PNG
    finally:
        transport.close()


def test_a_stale_abort_for_a_reused_handle_is_dropped(server: ImageServer) -> None:
    """A guard of a finished transfer firing late must not abort the handle's next one.

    Uses ``CurlTransport._free`` (internal) to know that the handle has been given back.
    """
    first_dog, second_dog = Watchdog(), Watchdog()
    transport = CurlTransport(1)
    try:
        with first_dog.guard(30) as stale:
            read_all(transport.send(request(server.urls[0]), stale))
            wait_for(lambda: transport._free, 5, "the handle to be given back")
            with second_dog.guard(30) as guard:
                url = server.url(f"/slow/{uniq()}?delay=0.3")
                results: list[bytes] = []
                reader = threading.Thread(
                    target=lambda: results.append(read_all(transport.send(request(url), guard)))
                )
                reader.start()
                wait_for(lambda: server.hits(url) == 1, 5, "the second request")
                first_dog.cancel_all()  # posts "abort" for the first transfer, late
                reader.join(10)
            assert results == [server.expected(url)]
    finally:
        transport.close()
        first_dog.stop()
        second_dog.stop()


def test_closing_the_transport_fails_waiting_workers_at_once(
    server: ImageServer, watchdog: Watchdog
) -> None:
    """close() ends a worker waiting for headers and one waiting for body bytes, at once."""
    threads_before = fetchpool_threads()
    transport = CurlTransport(2)
    errors: dict[str, BaseException] = {}
    sent = threading.Event()

    def for_headers() -> None:
        with watchdog.guard(30) as guard:
            try:
                transport.send(request(server.url(f"/slow/{uniq()}?delay=10")), guard)
            except TransferError as exc:
                errors["headers"] = exc

    def for_body() -> None:
        with watchdog.guard(30) as guard:
            reply = transport.send(request(server.url(f"/drip/{uniq()}?interval=1")), guard)
            sent.set()
            try:
                read_all(reply)
            except TransferError as exc:
                errors["body"] = exc

    threads = [threading.Thread(target=for_headers), threading.Thread(target=for_body)]
    for t in threads:
        t.start()
    assert sent.wait(5)
    wait_for(lambda: server.total_requests >= 2, 5, "both requests")
    start = time.monotonic()
    transport.close()
    for t in threads:
        t.join(5)
    assert time.monotonic() - start < 2
    assert sorted(errors) == ["body", "headers"]
    assert "fetchpool-curl" not in new_threads(threads_before), "the loop outlived close()"


@pytest.mark.parametrize(
    ("path", "status"), [("/302-endless.png", "downloaded"), ("/404-endless.png", "failed")]
)
def test_a_non_2xx_body_is_never_read(
    raw: RawServer, dest: Path, each_backend: str, path: str, status: str
) -> None:
    """DESIGN 6-7: a 3xx or 4xx answer with an endless body ends at its headers."""
    start = time.monotonic()
    (result,) = download_all([raw.url(path)], dest, retry=1, deadline=10)
    assert time.monotonic() - start < 3
    assert result.status == status, result.error
    if status == "failed":
        assert isinstance(result.error, HTTPStatusError)
        assert result.error.status_code == 404
    else:
        assert (dest / path.lstrip("/")).read_bytes() == SMALL_PNG


@pytest.mark.parametrize("answer", ["silent", "refused"])
def test_socket_failures_map_as_on_requests(dest: Path, each_backend: str, answer: str) -> None:
    """A server that never answers is a read timeout; a closed port a connection failure."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if answer == "refused":
        listener.close()
    try:
        (result,) = download_all(
            [f"http://127.0.0.1:{port}/x.png"], dest, retry=1, timeout=(2, 0.3)
        )
    finally:
        listener.close()
    assert isinstance(result.error, TransferError)
    assert result.error.retryable
    expected = "timed out requesting" if answer == "silent" else "connection failed requesting"
    assert str(result.error).startswith(expected), str(result.error)


def test_100_continue_then_200(raw: RawServer, dest: Path, each_backend: str) -> None:
    (result,) = download_all([raw.url("/continue.png")], dest, retry=1)
    assert result.ok, result.error
    assert (dest / "continue.png").read_bytes() == SMALL_PNG


def test_204_and_304_write_nothing(raw: RawServer, dest: Path, each_backend: str) -> None:
    no_content, not_modified = download_all(
        [raw.url("/no-content.png"), raw.url("/not-modified.png")], dest, retry=1
    )
    assert isinstance(no_content.error, NotAnImageError)  # an empty 2xx body
    assert isinstance(not_modified.error, HTTPStatusError)
    assert not_modified.error.status_code == 304
    assert listing(dest) == []


def test_an_exception_in_the_body_callback_fails_that_transfer_only(
    server: ImageServer, watchdog: Watchdog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pycurl swallows it (prints it, fails the transfer with curl error 23): no loop death."""
    original = _Slot.on_write
    raised: list[bool] = []

    def broken(self: _Slot, data: bytes) -> int | None:
        if not raised:
            raised.append(True)
            raise RuntimeError("a bug in the write callback")
        return original(self, data)

    monkeypatch.setattr(_Slot, "on_write", broken)
    transport = CurlTransport(1)
    try:
        with watchdog.guard(10) as guard, pytest.raises(TransferError):
            read_all(transport.send(request(server.urls[0]), guard))
        with watchdog.guard(10) as guard:
            body = read_all(transport.send(request(server.urls[1]), guard))
    finally:
        transport.close()
    assert raised
    assert body == server.expected(server.urls[1])


@pytest.fixture(scope="module")
def far_server() -> Iterator[str]:
    """An ImageServer in a process of its own, so this process's fds are all fetchpool's."""
    proc = subprocess.Popen(
        [sys.executable, str(PROC_SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        readable, _, _ = select.select([proc.stdout], [], [], 20)
        assert readable, "the server process did not start"
        yield proc.stdout.readline().strip()
    finally:
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()


def _fds() -> Counter[str]:
    """What this process has open, by target (``socket:[inode]``, ``pipe:[inode]``...)."""
    found: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used
            found[os.readlink(f"/proc/self/fd/{fd}")] += 1
    return found


def _new_fds(before: Counter[str]) -> Counter[str]:
    """What is open now and was not before (what the test servers close meanwhile is ok)."""
    return _fds() - before


def test_no_fd_or_thread_left_after_many_downloaders(far_server: str, tmp_path: Path) -> None:
    """Downloaders made and closed in a row, some cancelled mid-transfer, leave nothing open."""
    warm = tmp_path / "warm"
    download_all([f"{far_server}/any/warm.png"], warm, backend="curl")  # imports, caches
    fds_before, threads_before = _fds(), fetchpool_threads()

    for i in range(15):
        urls = [f"{far_server}/any/r{i}/x{j}.png" for j in range(6)]
        results = download_all(urls, tmp_path / f"d{i}", workers=3, backend="curl")
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for i in range(4):
        dest = tmp_path / f"c{i}"
        dl = Downloader(dest, workers=4, backend="curl")
        futures = [
            dl.submit(f"{far_server}/slow/s{i}.png?delay=10"),
            dl.submit(f"{far_server}/drip-headers/h{i}.png?interval=1"),
            dl.submit(f"{far_server}/drip/b{i}.png?interval=1"),
            dl.submit(f"{far_server}/slow/t{i}.png?delay=20"),
        ]
        in_flight = functools.partial(held_locks, dest)
        wait_for(lambda: in_flight() == 4, 5, "four transfers in flight")  # noqa: B023
        dl.close(cancel=True)
        assert [f.result(timeout=5).status for f in futures] == ["failed"] * 4
        assert listing(dest) == []

    assert new_threads(threads_before) == []
    assert not _new_fds(fds_before)


def test_a_downloader_dropped_without_close_leaves_nothing_open(
    far_server: str, tmp_path: Path, each_backend: str
) -> None:
    """A Downloader dropped unclosed gives back its sockets, fds and loop thread.

    DESIGN has it release its lock files then (a finalizer); the requests backend's
    sessions and sockets go with it. The curl loop thread holds the transport (its
    bound ``_run``), so the transport is never collected: one thread, the wake-up pipe,
    the epoll fd and every pooled connection stay, per Downloader, for good.
    (The watchdog thread is left behind on both backends: not looked at here.)
    """
    download_all([f"{far_server}/any/warm.png"], tmp_path / "warm")  # imports, caches
    gc.collect()
    fds_before, threads_before = _fds(), fetchpool_threads()

    def use_and_drop(i: int) -> None:
        dl = Downloader(tmp_path / f"d{i}", workers=2)
        assert dl.submit(f"{far_server}/any/drop{i}.png").result(timeout=10).ok

    for i in range(3):
        use_and_drop(i)
    gc.collect()
    wait_for(
        lambda: not _new_fds(fds_before) and "fetchpool-curl" not in new_threads(threads_before),
        3,
        "the dropped Downloaders' fds and curl loop threads to go",
    )


def test_keyboard_interrupt_cancels_curl_transfers_at_once(
    server: ImageServer, raw: RawServer, dest: Path
) -> None:
    """DESIGN: on KeyboardInterrupt in-flight transfers stop, temp files go, it goes on.

    In flight: one waiting for headers, one for its first body byte, one dripping, one
    big body being written by the loop thread (sink mode).
    """
    futures: list[Future[DownloadResult]] = []
    start = 0.0
    threads_before = fetchpool_threads()

    def interrupted() -> None:
        nonlocal start
        with Downloader(dest, workers=4, backend="curl") as dl:
            futures.extend(
                [
                    dl.submit(server.url(f"/slow/{uniq()}?delay=10")),
                    dl.submit(server.url(f"/drip-headers/{uniq()}?interval=1")),
                    dl.submit(server.url(f"/drip/{uniq()}?interval=1")),
                    dl.submit(raw.url("/paced.png")),
                ]
            )
            wait_for(
                lambda: held_locks(dest) == 4 and temp_files(dest), 5, "four transfers in flight"
            )
            start = time.monotonic()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted()
    assert time.monotonic() - start < 2
    for future in futures:
        result = future.result(timeout=0)
        assert isinstance(result.error, TransferError)
        assert result.error.cancelled
    assert listing(dest) == []
    assert new_threads(threads_before) == []


def test_a_new_socket_under_a_let_go_number_is_watched() -> None:
    """libcurl closes a socket it let go of and opens another under the same number.

    The loop keeps a let-go socket watched (a kept-alive connection is wanted again by
    the next transfer), but the kernel stops watching a closed one: a new socket under
    that number, asking for the same events, must be registered anew, or its transfer
    hears nothing until it times out (seen as "Connection timed out after 10001 ms" on
    retries of answers that closed their connection).
    """
    transport = CurlTransport(1)
    old, old_peer = socket.socketpair()
    try:
        fd = old.fileno()
        transport._on_socket(pycurl.POLL_IN, fd, None, None)
        transport._on_socket(pycurl.POLL_REMOVE, fd, None, None)
        old.close()
        new, new_peer = socket.socketpair()
        try:
            if new.fileno() != fd:
                pytest.skip("the kernel gave the new socket another number")
            transport._on_socket(pycurl.POLL_IN, fd, None, None)
            new_peer.send(b"x")
            assert (fd, select.POLLIN) in transport._poller.poll(1.0)
        finally:
            new.close()
            new_peer.close()
    finally:
        old_peer.close()
        transport.close()


# ---------------------------------------------------------------------- the loop's futures


def test_a_blocking_done_callback_holds_no_other_download(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    """A caller's done-callback may block (process the file, wait for another download).

    The curl loop completes every future: it runs callers' callbacks on threads of
    their own, so one that blocks holds neither the other downloads nor a cancel.
    """
    release = threading.Event()
    with Downloader(dest, workers=4, backend=each_backend) as dl:
        first = dl.submit(server.url(f"/any/{uniq()}"))
        first.add_done_callback(lambda _: release.wait(10))
        later = dl.submit(server.url(f"/slow/{uniq()}?delay=0.3"))
        waiting = dl.submit(server.url(f"/slow/{uniq()}?delay=30"))
        closing = threading.Thread(target=dl.close, kwargs={"cancel": True})
        try:
            assert later.result(timeout=5).ok
            assert first.result(timeout=0).ok
            # close() waits for the callback, as a thread pool's shutdown does; the
            # download in flight is cancelled meanwhile all the same.
            closing.start()
            error = waiting.result(timeout=2).error
            assert isinstance(error, TransferError)
            assert error.cancelled
        finally:
            release.set()
            if closing.is_alive():
                closing.join(5)


def test_a_done_callback_raising_system_exit_stops_no_other_download(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    with Downloader(dest, workers=2, backend=each_backend) as dl:
        first = dl.submit(server.url(f"/any/{uniq()}"))
        first.add_done_callback(lambda _: sys.exit("stop"))
        others = [dl.submit(server.url(f"/slow/{uniq()}?delay=0.2")) for _ in range(3)]
        assert all(f.result(timeout=10).ok for f in others)
        transport = dl._transport
        if isinstance(transport, CurlTransport):
            assert transport._failed is None  # the loop lives on
    if isinstance(transport, CurlTransport):
        assert not transport._unfinished


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_download_waiting_to_retry_when_the_loop_fails_gets_a_transfer_error(
    server: ImageServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It finishes on a thread of its own, its retry state intact (tenacity's is per thread)."""
    real = CurlTransport._wake_sleepers

    def broken(self: CurlTransport, now: float) -> None:
        if self._sleepers:
            raise RuntimeError("the loop broke while a download slept")
        real(self, now)

    monkeypatch.setattr(CurlTransport, "_wake_sleepers", broken)
    policy = RetryPolicy(attempts=4, wait_initial=0.2, jitter=0)
    with Downloader(dest, workers=2, backend="curl", retry=policy) as dl:
        result = dl.submit(server.url(f"/fail/1/503/{uniq()}")).result(timeout=30)
    assert isinstance(result.error, TransferError), result.error
    assert "the curl loop failed" in str(result.error)
    assert listing(dest) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failed_loop_finishes_its_queue_on_a_few_threads(
    server: ImageServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every future completes, on at most ``workers`` fall-back threads, not one each."""
    turns = itertools.count()
    real = CurlTransport._wake_sleepers

    def broken(self: CurlTransport, now: float) -> None:
        if next(turns) == 5:
            raise RuntimeError("the loop broke")
        real(self, now)

    monkeypatch.setattr(CurlTransport, "_wake_sleepers", broken)
    peak = 0
    with Downloader(dest, workers=2, backend="curl") as dl:
        futures = [dl.submit(server.url(f"/slow/{uniq()}?delay=0.05")) for _ in range(300)]
        for future in futures:
            while not future.done():
                fallbacks = [t for t in threading.enumerate() if "fallback" in t.name]
                peak = max(peak, len(fallbacks))
                time.sleep(0.001)
    assert all(f.done() for f in futures)
    assert 1 <= peak <= 2


def test_slow_file_creation_is_moved_off_the_loop(
    server: ImageServer, dest: Path, monkeypatch: pytest.MonkeyPatch, each_backend: str
) -> None:
    """Where creating a file is slow (ext4 can take half a millisecond), the curl loop
    has a helper thread create it and goes on meanwhile; the requests worker does it."""
    from fetchpool import storage

    monkeypatch.setattr(storage, "SLOW_CREATION", 0.0)  # every directory is slow
    creators: list[str] = []
    real_init = storage.TempFile.__init__

    def init(tmp: storage.TempFile, *args: object, **kwargs: object) -> None:
        creators.append(threading.current_thread().name)
        real_init(tmp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(storage.TempFile, "__init__", init)
    urls = [server.url(f"/any/{uniq()}") for _ in range(6)]
    results = download_all(urls, dest, workers=3, backend=each_backend)
    assert all(r.ok for r in results), [r.error for r in results]
    creators.remove("MainThread")  # the Downloader's probe of xattr support
    assert len(creators) == 6
    expected = "fetchpool-wait_" if each_backend == "curl" else "fetchpool_"
    assert all(name.startswith(expected) for name in creators), creators
    assert sorted(listing(dest)) == sorted(Path(r.path or "").name for r in results)


def test_done_callbacks_of_one_future_run_in_the_order_added(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    order: list[str] = []
    both = threading.Event()
    first_may_end = threading.Event()

    def first(_: object) -> None:
        # Ends once the second ran, if that one runs beside it; in order, after 0.2 s.
        first_may_end.wait(0.2)
        order.append("first")

    def second(_: object) -> None:
        order.append("second")
        first_may_end.set()
        both.set()

    with Downloader(dest, workers=2, backend=each_backend) as dl:
        future = dl.submit(server.url(f"/slow/{uniq()}?delay=0.3"))
        future.add_done_callback(first)
        future.add_done_callback(second)
        assert both.wait(5)
    assert order == ["first", "second"]


def test_callbacks_of_downloads_cancelled_by_close_run_off_the_loop(
    server: ImageServer, dest: Path
) -> None:
    """close(cancel=True) ends the transfers before it waits: their futures' callbacks
    must still run on the callback threads, not on the loop one after another."""
    names: list[str] = []
    dl = Downloader(dest, workers=4, backend="curl")
    with dl:
        warm = dl.submit(server.url(f"/any/{uniq()}"))
        warm.add_done_callback(lambda _: None)  # the callback threads exist from here
        assert warm.result(timeout=5).ok
        futures = [dl.submit(server.url(f"/drip/{uniq()}?interval=0.05")) for _ in range(3)]
        for future in futures:
            future.add_done_callback(lambda _: names.append(threading.current_thread().name))
        wait_for(lambda: held_locks(dest) == 3, 5, "three transfers in flight")
        dl.close(cancel=True)
    assert len(names) == 3
    assert all(name.startswith("fetchpool-callback") for name in names), names


@pytest.mark.timeout(30)
def test_successors_are_sent_before_the_ended_transfers_write_their_files(
    server: ImageServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A latency-bound batch: transfers end together, and writing each file before the
    # next request goes out would delay the last successor by the whole batch's writes.
    from fetchpool.storage import TempFile

    events: list[tuple[str, str]] = []
    add, commit = CurlTransport._add, TempFile.commit

    def spy_add(self: CurlTransport, slot: _Slot, t: Any) -> None:
        events.append(("add", t.request.url))
        add(self, slot, t)

    def spy_commit(self: TempFile, final: Path, *args: Any) -> bool:
        events.append(("commit", final.name))
        return commit(self, final, *args)

    monkeypatch.setattr(CurlTransport, "_add", spy_add)
    monkeypatch.setattr(TempFile, "commit", spy_commit)
    urls = [server.url(f"/slow/{uniq('w')}.png?delay=0.3") for _ in range(8)]
    results = download_all(urls, dest, workers=4, backend="curl")
    assert all(r.status == "downloaded" for r in results)
    successors = set(urls[4:])
    commits = 0
    sent = 0
    for kind, what in events:
        if kind == "add" and what in successors:
            sent += 1
        elif kind == "commit":
            commits += 1
            if commits > 4:
                break
            # Every download of the first wave that writes has had its successor sent.
            assert sent >= commits, events


@pytest.mark.timeout(30)
def test_a_finalizer_run_inside_the_transports_lock_does_not_wait_for_itself(
    server: ImageServer, tmp_path: Path
) -> None:
    # A dropped Downloader's finalizer runs on whatever thread drops the last reference,
    # which may be the loop thread inside its own lock: closing there must not wait for
    # that lock (it would wait for ever).
    from fetchpool.downloader import _release

    dl = Downloader(tmp_path, workers=1, backend="curl")
    assert dl.submit(server.url(f"/any/{uniq()}")).result(timeout=10).ok
    transport = dl._transport
    assert isinstance(transport, CurlTransport)
    returned = threading.Event()

    def finalize_inside_the_lock() -> None:
        with transport._lock:
            _release(dl._pipeline.pins, transport, dl._watchdog)
        returned.set()

    threading.Thread(target=finalize_inside_the_lock, daemon=True).start()
    assert returned.wait(10), "the finalizer waited for a lock its own thread held"
    wait_for(
        lambda: (
            transport._closed and transport._thread is not None and not transport._thread.is_alive()
        ),
        10,
        "the loop to stop",
    )
    dl.close()
