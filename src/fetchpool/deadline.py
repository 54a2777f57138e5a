"""Per-attempt deadlines enforced from outside the read (DESIGN rule 8).

http.client reads the status line and headers with no hook between reads, and a
socket read timeout restarts on every byte, so a server that drips one byte per
second can hold a plain ``requests`` call forever. Here each attempt runs under a
:class:`Guard`; the connection classes below hand the attempt's socket to its guard
when the request has been sent, and a single :class:`Watchdog` thread shuts that
socket down when the deadline passes (or when the downloader is cancelled), which
makes the blocked read return at once.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from types import TracebackType
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager

__all__ = ["GUARDED_POOL_CLASSES", "Guard", "Watchdog", "guard_pool_manager"]

_current = threading.local()


class Guard:
    """The deadline of one attempt; a context manager that makes it the thread's current one."""

    def __init__(self, watchdog: Watchdog, seconds: float, limit: str = "deadline") -> None:
        self._watchdog = watchdog
        self.seconds = seconds
        self.limit = limit
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self.cancelled = False
        self._sock: socket.socket | None = None
        self._active = True

    @property
    def fired(self) -> bool:
        """True once the deadline passed or the download was cancelled."""
        return self.expired or self.cancelled or time.monotonic() >= self.deadline

    def attach(self, sock: socket.socket) -> None:
        """Register the socket this attempt is reading from."""
        with self._watchdog.lock:
            if not self._active:
                return
            self._sock = sock
            if self.expired or self.cancelled:
                _shutdown(sock)

    def _fire(self, *, cancelled: bool) -> None:
        # Called with the watchdog lock held.
        if not self._active:
            return
        if cancelled:
            self.cancelled = True
        else:
            self.expired = True
        if self._sock is not None:
            _shutdown(self._sock)

    def __enter__(self) -> Guard:
        self._previous = getattr(_current, "guard", None)
        _current.guard = self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _current.guard = self._previous
        with self._watchdog.lock:
            self._active = False
            self._sock = None
        self._watchdog.forget(self)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Watchdog:
    """One thread that fires the guards whose deadline passed.

    The thread starts with the first guard and stops on :meth:`stop`.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._heap: list[tuple[float, int, Guard]] = []
        self._active: set[Guard] = set()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cancelled = False

    def guard(self, seconds: float, limit: str = "deadline") -> Guard:
        """Return a new guard that fires ``seconds`` from now; ``limit`` names it in errors."""
        g = Guard(self, max(0.0, seconds), limit)
        with self.lock:
            if self._cancelled:
                g.cancelled = True
            self._active.add(g)
            heapq.heappush(self._heap, (g.deadline, next(self._seq), g))
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(
                    target=self._run, name="fetchpool-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is g:
                self._wake.notify()
        return g

    def forget(self, g: Guard) -> None:
        """Drop a finished guard (its heap entry is discarded lazily)."""
        with self.lock:
            self._active.discard(g)
            # Most guards finish long before their deadline: compact now and then so
            # the heap stays proportional to the attempts in flight.
            if len(self._heap) > 2 * len(self._active) + 64:
                self._heap = [e for e in self._heap if e[2] in self._active]
                heapq.heapify(self._heap)

    def cancel_all(self) -> None:
        """Fire every active guard now and every future one at once."""
        with self.lock:
            self._cancelled = True
            for g in self._active:
                g._fire(cancelled=True)

    def stop(self) -> None:
        """Stop and join the thread."""
        with self.lock:
            self._stopping = True
            thread = self._thread
            self._wake.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        with self.lock:
            while not self._stopping:
                now = time.monotonic()
                while self._heap and (
                    self._heap[0][0] <= now or self._heap[0][2] not in self._active
                ):
                    _, _, g = heapq.heappop(self._heap)
                    if g in self._active:
                        g._fire(cancelled=False)
                        self._active.discard(g)
                timeout = self._heap[0][0] - now if self._heap else None
                self._wake.wait(timeout)


def current_guard() -> Guard | None:
    """The guard of the attempt running on this thread, if any."""
    return getattr(_current, "guard", None)


class _GuardedHTTPConnection(HTTPConnection):
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        g = current_guard()
        if g is not None and self.sock is not None:
            g.attach(self.sock)
        return super().getresponse(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        g = current_guard()
        if g is not None and self.sock is not None:
            g.attach(self.sock)
        return super().getresponse(*args, **kwargs)


class _GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


GUARDED_POOL_CLASSES: dict[str, type[HTTPConnectionPool]] = {
    "http": _GuardedHTTPConnectionPool,
    "https": _GuardedHTTPSConnectionPool,
}


def guard_pool_manager(manager: PoolManager) -> bool:
    """Make ``manager`` create guarded connections, if it uses urllib3's default pools.

    Returns:
        Whether the manager now hands sockets to guards (a custom pool class is left
        alone; the deadline is then checked between body chunks only).
    """
    classes = manager.pool_classes_by_scheme
    if classes.get("http") is HTTPConnectionPool and classes.get("https") is HTTPSConnectionPool:
        manager.pool_classes_by_scheme = dict(GUARDED_POOL_CLASSES)
        return True
    return all(classes.get(s) is GUARDED_POOL_CLASSES[s] for s in ("http", "https"))
