"""Concurrency guarantees against real loopback servers: threads, processes, signals.

DESIGN rules 1 (nothing partial at a final name), 2 (one writer per file, no litter, a dead
writer's leftovers swept), 3 (distinct, stable names) and 5 (bounded resources), and the
``KeyboardInterrupt`` / ``close(cancel=True)`` paragraph.

fetchpool reads bodies 256 KiB at a time and creates the temporary file only after the first
read, so the ``ImageServer`` images (8-64 KiB, one read) never leave a temporary file on disk
mid-transfer, not even on ``/drip/``: there only the lock file shows. :class:`StallServer`
below serves larger images whose body stops after a first part until the test releases it,
which puts a real, partial temporary file on disk at a moment the test can wait for. An
unnamed (``O_TMPFILE``) one shows among its writer's open files, not in the directory.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import logging
import os
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from _support import held_locks, listing, temp_files, temp_sizes
from fetchpool import Downloader, DownloadResult, TransferError, download_all
from fetchpool.storage import LOCK_FILE_NAME, child_path
from fetchpool.testing import ImageServer, make_image

TESTS = Path(__file__).resolve().parent
PROC_FETCH = TESTS / "_proc_fetch.py"
PROC_SERVER = TESTS / "_proc_server.py"
RESERVED = ".fetchpool-"

pytestmark = pytest.mark.usefixtures("each_backend")


# --------------------------------------------------------------------------- helpers


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.01,
) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {text}")
        threading.Event().wait(interval)


def lock_files(directory: Path) -> list[str]:
    return sorted(
        n for n in os.listdir(directory) if n.startswith(RESERVED) and not n.endswith(".part")
    )


def final_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if not n.startswith(RESERVED))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shared_basename_urls(server: ImageServer, count: int, tag: str) -> list[str]:
    """Distinct URLs of which about ``count / 40`` share each basename."""
    return [server.url(f"/any/{tag}{i % 97}/img{i % 40}.jpg?i={i}") for i in range(count)]


class Child:
    """A ``_proc_fetch.py`` child process with its output in files, always cleaned up."""

    def __init__(self, workdir: Path, name: str, **config: Any) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.json"
        self.out = workdir / f"{name}.out.json"
        self.ready = workdir / f"{name}.ready"
        self.stdout = workdir / f"{name}.stdout"
        self.stderr = workdir / f"{name}.stderr"
        config = {"out": str(self.out), "ready": str(self.ready), **config}
        self.config_path.write_text(json.dumps(config), encoding="utf-8")
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(PROC_FETCH), str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        err = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return f"returncode={self.proc.poll()}; stderr:\n{err[-3000:]}"

    def results(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = json.loads(self.out.read_text(encoding="utf-8"))
        return data

    def span(self) -> tuple[float, float]:
        """When the child's batch started and ended (``time.time()``)."""
        start, end = json.loads(Path(f"{self.out}.span").read_text(encoding="utf-8"))
        return float(start), float(end)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"child still running after {timeout} s\n{self.output()}"
            ) from None

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def wait_in_child(child: Child, predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Like :func:`wait_for`, failing at once (with its stderr) if the child dies first."""

    def check() -> bool:
        if predicate():
            return True
        if not child.alive():
            raise AssertionError(f"child exited while waiting for {what}\n{child.output()}")
        return False

    wait_for(check, timeout, lambda: f"{what}\n{child.output()}")


# --------------------------------------------------------------------------- servers


# More than the 1 MiB a download may hold in memory before it has a file (the curl
# backend's express lane), and than one 256 KiB read of the steps: a temp file appears.
_FIRST_PART = 1200 * 1024
_BIG_SIZE = 1_500_000


class _StallHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # the default 5 could drop SYNs of a burst (1 s retry)

    def __init__(self, owner: StallServer) -> None:
        self.owner = owner
        self.connections: dict[socket.socket, threading.Thread] = {}
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _StallHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup that can stall.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self.connections_lock:
            self.connections[request] = thread
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients killed mid-body are expected here: stay quiet."""


class _StallHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StallHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Stay silent."""

    def do_GET(self) -> None:
        owner = self.server.owner
        route, _, name = self.path.lstrip("/").partition("/")
        if route not in ("big", "hold") or not name:
            self.send_error(404)
            return
        body = owner.expected_for(name)
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        try:
            if route == "hold" and not owner.pass_gate():
                self.close_connection = True
                return
            if route == "hold":
                self.wfile.write(head + body)
                return
            self.wfile.write(head + body[:_FIRST_PART])
            if not owner.pass_gate():
                self.close_connection = True
                return
            self.wfile.write(body[_FIRST_PART:])
        except OSError:
            self.close_connection = True


class StallServer:
    """Loopback server of large PNGs whose delivery stalls until :meth:`release`.

    ``/big/<name>``: headers and the first 1.2 MiB at once, the rest after release.
    ``/hold/<name>``: nothing until release, then the whole image.
    After :meth:`release` every request is answered at once.
    """

    def __init__(self) -> None:
        self._gate = threading.Event()
        self._stopping = False
        self._server = _StallHTTPServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def expected_for(self, name: str) -> bytes:
        return make_image("png", _BIG_SIZE, zlib.crc32(name.encode()))

    def expected(self, url: str) -> bytes:
        return self.expected_for(url.rsplit("/", 1)[-1])

    def pass_gate(self) -> bool:
        """Wait for release; False if the server is stopping instead."""
        self._gate.wait(120)
        return not self._stopping

    def release(self) -> None:
        self._gate.set()

    def stop(self) -> None:
        self._stopping = True
        self._gate.set()
        self._server.shutdown()
        self._server.server_close()
        with self._server.connections_lock:
            connections = list(self._server.connections.items())
        for sock, _ in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        deadline = time.monotonic() + 5
        for _, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=0) as srv:
        yield srv


@pytest.fixture
def stall() -> Iterator[StallServer]:
    srv = StallServer()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server_process() -> Iterator[str]:
    """The base URL of an ImageServer running in another process."""
    proc = subprocess.Popen(
        [sys.executable, str(PROC_SERVER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        readable, _, _ = select.select([proc.stdout], [], [], 20)
        assert readable, "the server process did not report its URL within 20 s"
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:"), base_url
        yield base_url
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


# --------------------------------------------------------------------------- 1


@pytest.mark.timeout(90)
def test_32_workers_1000_urls_sharing_basenames(
    server: ImageServer, dest: Path, tmp_path: Path
) -> None:
    urls = shared_basename_urls(server, 1000, "d")
    assert len({u.rsplit("/", 1)[-1].split("?")[0] for u in urls}) == 40

    results = download_all(urls, dest, workers=32)

    assert [r.url for r in results] == urls
    assert [(r.url, r.status, r.error) for r in results if r.status != "downloaded"] == []
    paths = [r.path for r in results]
    assert all(p is not None for p in paths)
    assert len(set(paths)) == len(urls), "two URLs share a final path"
    root = dest.resolve()
    for url, p in zip(urls, paths, strict=True):
        assert p is not None
        assert root in p.resolve().parents, f"{p} is outside {dest}"
        assert sha256_of(p) == server.expected_sha256(url), url
    relative = [str(p.relative_to(dest)) for p in paths if p is not None]
    assert listing(dest) == sorted(relative), "litter (temp or lock files) left in dest"
    assert sum(1 for name in relative if name.count("-") == 0) == 40  # plain names once each

    # A rerun into the same dest: nothing requested again, everything skipped, same paths.
    server.reset_hits()
    again = download_all(urls, dest, workers=32)
    assert [(r.url, r.status) for r in again] == [(u, "skipped") for u in urls]
    assert [r.path for r in again] == paths
    assert server.total_requests == 0
    assert listing(dest) == sorted(relative)

    # The same input into a fresh dest gives the same names.
    fresh = tmp_path / "fresh"
    third = download_all(urls, fresh, workers=32)
    assert all(r.status == "downloaded" for r in third)
    assert [str(r.path.relative_to(fresh)) for r in third if r.path is not None] == relative
    assert listing(fresh) == sorted(relative)


# --------------------------------------------------------------------------- 2


@pytest.mark.timeout(60)
def test_two_processes_same_batch_same_dest(
    server: ImageServer, dest: Path, tmp_path: Path, each_backend: str
) -> None:
    urls = shared_basename_urls(server, 200, "p")
    # So that the two processes' batches overlap even when one child starts late on a
    # loaded machine (at 0.02 s a batch took 0.5 s, and one child sometimes did all).
    server.latency = 0.05
    go = tmp_path / "go"
    children: list[Child] = []
    try:
        # extend() keeps the first child in the list if starting the second fails.
        children.extend(
            Child(
                tmp_path / "procs",
                name,
                urls=urls,
                dest=str(dest),
                workers=8,
                go=str(go),
                backend=each_backend,
            )
            for name in ("a", "b")
        )
        for child in children:
            wait_in_child(child, child.ready.exists, 30, "the child to import fetchpool")
        server.reset_hits()
        go.touch()
        for child in children:
            assert child.wait(45) == 0, child.output()
        first, second = (child.results() for child in children)
        spans = [child.span() for child in children]
    finally:
        for child in children:
            child.cleanup()

    assert [r["url"] for r in first] == urls
    assert [r["url"] for r in second] == urls
    for a, b in zip(first, second, strict=True):
        assert a["error"] is None, a
        assert b["error"] is None, b
        assert a["path"] == b["path"], f"the processes named {a['url']} differently"
        # Rule 2: one writer per file; the second finds the file and skips.
        assert sorted([a["status"], b["status"]]) == ["downloaded", "skipped"], (a, b)
    assert server.total_requests == len(urls), "some URL was downloaded twice"
    # The two batches really ran at the same time. (Which process writes which files is
    # theirs to race for: on the curl backend the first to start often takes them all,
    # the other's workers waiting on its locks, then skipping.)
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans
    assert any(r["status"] == "downloaded" for r in first + second)
    paths = [Path(r["path"]) for r in first]
    assert len(set(paths)) == len(urls)
    for url, p in zip(urls, paths, strict=True):
        assert sha256_of(p) == server.expected_sha256(url), url
    assert listing(dest) == sorted(str(p.relative_to(dest)) for p in paths)


# --------------------------------------------------------------------------- 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("named", [False, True], ids=["unnamed-temp", "named-temp"])
def test_sigkill_mid_download_then_rerun_sweeps_leftovers(
    server: ImageServer,
    stall: StallServer,
    dest: Path,
    tmp_path: Path,
    named: bool,
    each_backend: str,
) -> None:
    fast = [server.url(f"/any/k/fast{i}.png") for i in range(40)]
    big = [stall.url(f"/big/big{i}.png") for i in range(4)]
    held = [stall.url(f"/hold/held{i}.png") for i in range(4)]
    urls = fast + big + held  # 8 workers: the fast ones go first, then every worker stalls
    expected = {u.rsplit("/", 1)[-1]: server.expected(u) for u in fast}
    expected.update({u.rsplit("/", 1)[-1]: stall.expected(u) for u in big + held})

    child = Child(
        tmp_path / "procs",
        "killed",
        urls=urls,
        dest=str(dest),
        workers=8,
        named_temp_files=named,
        backend=each_backend,
    )
    try:
        wait_in_child(
            child,
            lambda: (
                len(sizes := temp_sizes(dest, child.proc.pid)) == len(big)
                and min(sizes) > 0
                and held_locks(dest) == len(big) + len(held)
                and len(final_files(dest)) == len(fast)
            ),
            30,
            "every worker mid-transfer (4 temp files with data, 8 locks held, 40 final files)",
        )
        child.proc.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.cleanup()

    leftovers = temp_files(dest)
    if named:
        # The dead writer's named temporary files are there, partial.
        assert len(leftovers) == len(big)
        assert all(0 < (dest / n).stat().st_size < _BIG_SIZE for n in leftovers)
    else:
        # Unnamed ones died with their writer.
        assert leftovers == []
    # Its lock file is left, but the kernel released every lock the dead process held.
    assert lock_files(dest) == [LOCK_FILE_NAME]
    assert held_locks(dest) == 0
    # Nothing partial has a final name.
    for name in final_files(dest):
        assert name in expected, f"unexpected file {name}"
        assert (dest / name).read_bytes() == expected[name], f"{name} is partial"

    stall.release()
    results = download_all(urls, dest, workers=8)
    assert [(r.url, r.error) for r in results if not r.ok] == []
    assert [r.status for r in results] == ["skipped"] * len(fast) + ["downloaded"] * (
        len(big) + len(held)
    )
    for r in results:
        assert r.path is not None
        assert r.path.read_bytes() == expected[r.path.name], r.url
    assert listing(dest) == sorted(expected), "the dead writer's temp/lock files remain"


# --------------------------------------------------------------------------- 4


@pytest.mark.timeout(60)
def test_sigint_during_batch_interrupts_and_cleans_up(
    server: ImageServer, stall: StallServer, dest: Path, tmp_path: Path, each_backend: str
) -> None:
    fast = [server.url(f"/any/s/fast{i}.png") for i in range(20)]
    big = [stall.url(f"/big/big{i}.png") for i in range(4)]
    held = [stall.url(f"/hold/held{i}.png") for i in range(4)]
    urls = fast + big + held

    child = Child(
        tmp_path / "procs",
        "interrupted",
        urls=urls,
        dest=str(dest),
        workers=8,
        backend=each_backend,
    )
    try:
        wait_in_child(
            child,
            lambda: (
                len(temp_files(dest, child.proc.pid)) == len(big)
                and len(final_files(dest)) == len(fast)
            ),
            30,
            "the child to be mid-transfer",
        )
        start = time.monotonic()
        child.proc.send_signal(signal.SIGINT)
        returncode = child.wait(15)
        took = time.monotonic() - start
        marker = json.loads(child.out.read_text()) if child.out.exists() else None
    finally:
        child.cleanup()

    assert marker == {"interrupted": True}, child.output()
    assert returncode == -signal.SIGINT, child.output()  # the interrupt went on
    assert took < 5, f"the child took {took:.1f} s to stop after SIGINT"
    assert temp_files(dest) == []
    assert lock_files(dest) == []
    assert final_files(dest) == sorted(u.rsplit("/", 1)[-1] for u in fast)
    for url in fast:
        assert (dest / url.rsplit("/", 1)[-1]).read_bytes() == server.expected(url)


# --------------------------------------------------------------------------- 5


def _slow_mix(server: ImageServer, stall: StallServer) -> tuple[list[str], list[str]]:
    """16 transfers that never finish on their own, and 4 of them with a temp file."""
    in_flight = (
        [stall.url(f"/big/big{i}.png") for i in range(4)]
        + [stall.url(f"/hold/held{i}.png") for i in range(4)]
        + [server.url(f"/slow/slow{i}.png?delay=30") for i in range(4)]
        + [server.url(f"/drip/drip{i}.png?interval=0.5") for i in range(4)]
    )
    pending = [server.url(f"/any/c/pending{i}.png") for i in range(16)]
    return in_flight, pending


def _check_cancelled(
    server: ImageServer,
    in_flight: list[Future[DownloadResult]],
    pending: list[Future[DownloadResult]],
    pending_urls: list[str],
) -> None:
    """In-flight ones failed with TransferError; pending ones were cancelled, never started."""
    for fut in in_flight:
        assert fut.done()
        result = fut.result(timeout=0)  # never raises for an in-flight one
        assert result.status == "failed", result
        assert isinstance(result.error, TransferError), result.error
        assert result.error.cancelled, result.error
        assert result.path is None
    for fut in pending:
        assert fut.cancelled(), f"a pending download was not cancelled: {fut}"
        with pytest.raises(CancelledError):
            fut.result(timeout=0)
    assert [server.hits(u) for u in pending_urls] == [0] * len(pending_urls)


@pytest.mark.timeout(60)
def test_close_cancel_stops_in_flight_and_cancels_pending(
    server: ImageServer, stall: StallServer, dest: Path
) -> None:
    in_flight_urls, pending_urls = _slow_mix(server, stall)
    dl = Downloader(dest, workers=16)
    try:
        in_flight = [dl.submit(u) for u in in_flight_urls]
        pending = [dl.submit(u) for u in pending_urls]
        wait_for(
            lambda: len(temp_files(dest)) == 4 and held_locks(dest) == 16,
            20,
            lambda: f"16 transfers in flight, 4 with a temp file: {listing(dest)}",
        )
        start = time.monotonic()
        dl.close(cancel=True)
        took = time.monotonic() - start
    finally:
        dl.close(cancel=True)

    assert took < 5, f"close(cancel=True) took {took:.1f} s"
    _check_cancelled(server, in_flight, pending, pending_urls)
    assert listing(dest) == [], "temp or lock files left after cancel"


@pytest.mark.timeout(60)
def test_exception_in_with_block_cancels(
    server: ImageServer, stall: StallServer, dest: Path
) -> None:
    in_flight_urls, pending_urls = _slow_mix(server, stall)
    in_flight: list[Future[DownloadResult]] = []
    pending: list[Future[DownloadResult]] = []
    start = 0.0

    def run() -> None:
        nonlocal start
        with Downloader(dest, workers=16) as dl:
            in_flight.extend(dl.submit(u) for u in in_flight_urls)
            pending.extend(dl.submit(u) for u in pending_urls)
            wait_for(
                lambda: len(temp_files(dest)) == 4 and held_locks(dest) == 16,
                20,
                lambda: f"16 transfers in flight: {listing(dest)}",
            )
            start = time.monotonic()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run()
    took = time.monotonic() - start

    assert took < 5, f"leaving the block took {took:.1f} s"
    _check_cancelled(server, in_flight, pending, pending_urls)
    assert listing(dest) == []


@pytest.mark.timeout(30)
def test_close_cancel_cancels_pending_even_when_a_worker_frees_first(
    server: ImageServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dl = Downloader(dest, workers=2)
    try:
        in_flight = [dl.submit(server.url(f"/slow/s{i}.png?delay=30")) for i in range(2)]
        pending = [dl.submit(server.url(f"/any/c/pending{i}.png")) for i in range(4)]
        wait_for(lambda: held_locks(dest) == 2, 10, "2 transfers in flight")

        # Regression (found by this test): close(cancel=True) fired the cancel, then
        # cancelled the executor's queue, so a worker freed in between took a pending
        # item and failed it. The interleaving made certain: the closing thread loses the
        # CPU before each shutdown of the executor until a worker has taken a queued item,
        # for at most 1 s (with the queue cancelled first, none ever does).
        original = ThreadPoolExecutor.shutdown

        def descheduled_shutdown(
            self: ThreadPoolExecutor, wait: bool = True, *, cancel_futures: bool = False
        ) -> None:
            with contextlib.suppress(AssertionError):
                wait_for(lambda: any(f.running() or f.done() for f in pending), 1, "a worker")
            original(self, wait, cancel_futures=cancel_futures)

        monkeypatch.setattr(ThreadPoolExecutor, "shutdown", descheduled_shutdown)
        dl.close(cancel=True)
    finally:
        monkeypatch.undo()
        dl.close(cancel=True)

    statuses = ["cancelled" if f.cancelled() else f.result(timeout=0).status for f in pending]
    assert statuses == ["cancelled"] * len(pending)
    assert all(f.result(timeout=0).status == "failed" for f in in_flight)
    assert listing(dest) == []


# --------------------------------------------------------------------------- 6


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(60)
def test_threads_and_fds_back_to_baseline(server: ImageServer, dest: Path) -> None:
    urls = shared_basename_urls(server, 200, "t")
    # Baseline with the server running and idle (its accept thread and socket included).
    threads_before, fds_before = threading.active_count(), _open_fds()

    results = download_all(urls, dest, workers=16)
    assert all(r.status == "downloaded" for r in results)

    # The server's per-connection threads end when they see the client's close, a moment
    # after download_all returns: that, and only that, is waited for.
    wait_for(
        lambda: threading.active_count() == threads_before and _open_fds() == fds_before,
        5,
        lambda: (
            f"threads {threading.active_count()} (baseline {threads_before}: "
            f"{[t.name for t in threading.enumerate()]}), fds {_open_fds()} "
            f"(baseline {fds_before})"
        ),
    )


# --------------------------------------------------------------------------- 7


@pytest.mark.timeout(30)
def test_same_url_submitted_concurrently_is_downloaded_once(
    server: ImageServer, dest: Path
) -> None:
    url = server.url("/slow/same.jpg?delay=0.3")  # every submit is in flight at once
    with Downloader(dest, workers=16) as dl:
        futures = [dl.submit(url) for _ in range(48)]
        results = [f.result(timeout=20) for f in futures]

    statuses = sorted(r.status for r in results)
    assert statuses == ["downloaded"] + ["skipped"] * 47
    assert {r.path for r in results} == {dest / "same.jpg"}
    assert all(r.bytes == len(server.expected(url)) for r in results)
    assert listing(dest) == ["same.jpg"]
    assert (dest / "same.jpg").read_bytes() == server.expected(url)
    assert server.hits("/slow/same.jpg") == 1


# --------------------------------------------------------------------------- 8


@pytest.mark.timeout(60)
def test_no_pool_full_warnings_at_64_workers(
    server: ImageServer, dest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="urllib3")
    server.latency = 0.05  # keeps all 64 workers busy at once
    urls = shared_basename_urls(server, 640, "w")
    results = download_all(urls, dest, workers=64)
    assert all(r.status == "downloaded" for r in results)
    noisy = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")]
    assert [m for m in noisy if "pool is full" in m.lower()] == []
    assert noisy == []


@pytest.mark.timeout(60)
def test_connections_are_reused(
    server: ImageServer, dest: Path, caplog: pytest.LogCaptureFixture, each_backend: str
) -> None:
    # ImageServer counts requests, not connections: count them where urllib3 opens them.
    caplog.set_level(logging.DEBUG, logger="urllib3.connectionpool")
    urls = shared_basename_urls(server, 200, "r")
    server.reset_hits()
    results = download_all(urls, dest, workers=8)
    assert all(r.status == "downloaded" for r in results)
    opened = [r for r in caplog.records if r.getMessage().startswith("Starting new HTTP")]
    assert server.total_requests == 200
    # Counted where the server accepts them, for any backend; and where urllib3 opens them.
    assert 1 <= server.total_connections <= 8, server.total_connections
    if each_backend == "requests":
        assert 1 <= len(opened) <= 8, f"{len(opened)} connections opened for 200 requests"


# --------------------------------------------------------------------------- 9


@pytest.mark.timeout(60)
def test_map_over_large_generator_in_flat_memory(server_process: str, dest: Path) -> None:
    workers = 8
    produced = 0

    def urls() -> Iterator[str]:
        nonlocal produced
        for i in range(3000):
            produced += 1
            yield f"{server_process}/any/m{i % 50}/img{i}.png"

    ahead = 0
    failed = 0
    samples: list[int] = []  # traced live bytes after 750, 1500, 2250 and 3000 results
    tracemalloc.start()
    try:
        with Downloader(dest, workers=workers) as dl:
            for n, result in enumerate(dl.map(urls()), 1):
                failed += not result.ok
                ahead = max(ahead, produced - n)
                if n % 750 == 0:
                    gc.collect()  # count live memory, not cycles awaiting the collector
                    samples.append(tracemalloc.get_traced_memory()[0])
                elif samples and n % 750 < 16:
                    # The least over the next results: bodies in flight come and go.
                    samples[-1] = min(samples[-1], tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()

    assert failed == 0
    assert produced == 3000
    assert ahead <= 4 * workers, f"map() ran {ahead} URLs ahead of its consumer"
    # A leak grows memory in every window of 750 URLs. A table of the interpreter that
    # predates tracemalloc.start() (the interned-strings dict, which pathlib feeds; since
    # fetchpool no longer interns per-URL names, only other code) counts whole when it is
    # reallocated: a one-off step of ~1.8 MiB in one window, seen in runs of this whole
    # file. Hence the median window. Measured: windows within +-60 KiB; one
    # small record kept per URL (as the no-xattr fallback does by design) gives 340-510 KiB
    # in every window.
    windows = sorted(b - a for a, b in itertools.pairwise(samples))
    kib = [w // 1024 for w in windows]
    assert windows[len(windows) // 2] < 200 * 1024, f"memory grows with URLs: {kib} KiB"
    assert samples[-1] - samples[0] < 4 * 1024 * 1024, f"memory grew: {kib} KiB"
    assert len(os.listdir(dest)) == 3000


def test_map_interns_no_name_per_url(
    server_process: str, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pathlib before 3.14 interns every part it parses. Names made per URL (final and
    # temporary) that went through it leaked on 3.12 (interned strings are immortal
    # there) and, elsewhere, made the interpreter reallocate its interned-strings table
    # every few ten thousand URLs, which fragmented malloc's arenas: peak RSS grew with
    # the URLs fed to map(). Nothing a download makes may go through sys.intern.
    interned: list[str] = []
    real_intern = sys.intern

    def spy(text: str) -> str:
        interned.append(text)
        return real_intern(text)

    # Half the names collide (same name, other directory in the URL): derived names too.
    urls = [f"{server_process}/any/d{i % 2}/uniq{i // 2}.png" for i in range(200)]
    monkeypatch.setattr(sys, "intern", spy)
    with Downloader(dest, workers=4) as dl:
        results = list(dl.map(urls))
    monkeypatch.undo()
    per_url = [t for t in interned if t.endswith((".png", ".part"))]
    assert per_url == [], f"{len(per_url)} names interned, e.g. {per_url[:3]}"
    assert all(r.status == "downloaded" for r in results)
    paths = [r.path for r in results]
    assert len(set(paths)) == 200
    assert paths[0] == dest / "uniq0.png"
    assert all(p is not None and p.parent == dest and p.is_file() for p in paths)


@pytest.mark.parametrize("directory", ["/a/b", "a", ".", "/"])
def test_child_path_equals_joined_path(directory: str) -> None:
    parent = Path(directory)
    child = child_path(parent, "x y.png")
    joined = parent / "x y.png"
    assert (child, str(child), hash(child), child.name) == (
        joined,
        str(joined),
        hash(joined),
        joined.name,
    )
    assert type(child) is type(joined)
    assert child.parent == parent
    assert child.with_suffix(".gif") == joined.with_suffix(".gif")


# --------------------------------------------------------------------------- workers bound


class _PeakServer(ThreadingHTTPServer):
    """Counts the requests it serves at once; ``/r/<n>`` redirects to ``/img/<n>``."""

    daemon_threads = True

    def __init__(self, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), _PeakHandler)
        self.delay = delay
        self.active = 0
        self.peak = 0
        self.count_lock = threading.Lock()
        self.body = make_image("png", 3000, 7)


class _PeakHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _PeakServer

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    counted = False

    def _count(self, step: int) -> None:
        srv = self.server
        with srv.count_lock:
            srv.active += step
            srv.peak = max(srv.peak, srv.active)
        self.counted = step > 0

    def do_GET(self) -> None:
        srv = self.server
        self._count(+1)
        try:
            time.sleep(srv.delay)
            # The request stops counting just before its last bytes go out: once the
            # client has them it may send the next request at once, before this thread
            # runs again (the same process, one GIL), which would count one too many.
            if self.path.startswith("/r/"):
                self.send_response(302)
                self.send_header("Location", "/img/" + self.path[3:])
                self.send_header("Content-Length", "0")
                self._count(-1)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(srv.body)))
            self.end_headers()
            self._count(-1)
            self.wfile.write(srv.body)
        finally:
            if self.counted:
                self._count(-1)


@pytest.mark.timeout(60)
def test_never_more_requests_in_flight_than_workers(dest: Path) -> None:
    # Redirect hops and successors started while their predecessors write files must
    # not push the count over ``workers`` (the curl loop lets a successor send first).
    srv = _PeakServer(delay=0.05)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        urls = [f"{base}/{'r' if i % 3 == 0 else 'img'}/{i}.png" for i in range(36)]
        results = download_all(urls, dest, workers=4)
    finally:
        srv.shutdown()
        srv.server_close()
    assert [r.status for r in results] == ["downloaded"] * len(urls)
    assert 1 < srv.peak <= 4


def _open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.timeout(60)
def test_close_closes_every_connection_while_failed_results_are_kept(
    server_process: str, dest: Path
) -> None:
    # Kept results hold their errors, whose tracebacks hold the frames that held the
    # responses, and (urllib3 2) their pools: close() must not leave those pools'
    # sockets to the garbage collector.
    urls = [
        f"{server_process}/status/404/x{i}.png" if i % 7 == 0 else f"{server_process}/any/a{i}.png"
        for i in range(300)
    ]
    gc.collect()
    before = _open_sockets()
    with Downloader(dest, workers=32, retry=1) as dl:
        results = list(dl.map(urls))
    failed = [r for r in results if not r.ok]
    assert len(failed) == 43
    assert all(r.error is not None and r.error.__traceback__ is not None for r in failed)
    assert _open_sockets() <= before


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` in the main thread during the test.

    A run started in the background (``cmd &`` where job control is off, as in scripts)
    inherits SIGINT ignored, and Python then installs no handler of its own.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_while_close_waits_cancels_what_is_pending(server: ImageServer, dest: Path) -> None:
    # The with block ended well and close() waits for the downloads; Ctrl-C there must
    # cancel what is pending (DESIGN), not leave it running behind the interrupt.
    urls = [server.url(f"/slow/ctrlc{i}.png?delay=0.5") for i in range(12)]
    dl = Downloader(dest, workers=1)
    futures = [dl.submit(u) for u in urls]
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            dl.close()
    finally:
        timer.cancel()
    assert all(f.done() for f in futures)
    ended = [f.result() for f in futures if not f.cancelled()]
    assert sum(r.status == "downloaded" for r in ended) <= 2
    assert len(ended) < len(futures)  # the pending ones were cancelled, not run
    assert temp_files(dest) == []
