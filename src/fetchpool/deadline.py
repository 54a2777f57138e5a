"""Per-attempt deadlines enforced from outside the read (DESIGN rule 8).

http.client reads the status line and headers with no hook between reads, and a
socket read timeout restarts on every byte, so a server that drips one byte per
second can hold a plain ``requests`` call forever. Here each attempt runs under a
:class:`Guard`; a backend hands the attempt's socket to its guard when the request
has been sent (or registers a callback), and a single :class:`Watchdog` thread shuts
that socket down (or calls the callback) when the deadline passes or the downloader
is cancelled, which makes the blocked read return at once.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from types import TracebackType

__all__ = ["Guard", "Stop", "Watchdog", "current_guard", "guarding"]

_current = threading.local()


class Guard:
    """The deadline of one attempt; a context manager that ends it when the attempt ends."""

    def __init__(
        self,
        watchdog: Watchdog,
        seconds: float,
        limit: str = "deadline",
        began: float | None = None,
    ) -> None:
        self._watchdog = watchdog
        self.seconds = seconds
        self.limit = limit
        self.deadline = (time.monotonic() if began is None else began) + seconds
        self.expired = False
        self.cancelled = False
        self._stop: Callable[[], None] | None = None
        self._active = True

    @property
    def fired(self) -> bool:
        """True once the deadline passed or the download was cancelled."""
        return self.expired or self.cancelled or time.monotonic() >= self.deadline

    def attach(self, sock: socket.socket) -> None:
        """Register the socket this attempt is reading from: firing shuts it down."""
        self.on_fire(partial(_shutdown, sock))

    def on_fire(self, stop: Callable[[], None]) -> None:
        """Register what ends this attempt when the guard fires (at once if it has).

        ``stop`` runs on the watchdog's thread with its lock held: it must only wake or
        shut down, never block. A later registration replaces an earlier one.
        """
        with self._watchdog.lock:
            if not self._active:
                return
            self._stop = stop
            if self.expired or self.cancelled:
                stop()

    def _fire(self, *, cancelled: bool) -> None:
        # Called with the watchdog lock held.
        if not self._active:
            return
        if cancelled:
            self.cancelled = True
        else:
            self.expired = True
        if self._stop is not None:
            self._stop()

    def __enter__(self) -> Guard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._watchdog.forget(self)


class Stop:
    """What stops one download on its own, the rest of its Downloader going on.

    Its ``event`` stands for the Downloader's cancel event in that download's checks and
    waits (a retry's backoff, a lock another writer holds); :meth:`set` sets it and fires
    the guard of the attempt in flight, which stops its transfer at once.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._guard: Guard | None = None

    def watch(self, guard: Guard) -> None:
        """Make ``guard`` the one :meth:`set` fires (at once if it was set already)."""
        with guard._watchdog.lock:
            self._guard = guard
            if self.event.is_set():
                guard._fire(cancelled=True)

    def set(self) -> None:
        """Stop the download: its waits and checks end, its attempt in flight stops."""
        self.event.set()
        # The event first: an attempt that watches its guard after this read sees it.
        guard = self._guard
        if guard is not None:
            with guard._watchdog.lock:
                guard._fire(cancelled=True)


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

    def guard(self, seconds: float, limit: str = "deadline", began: float | None = None) -> Guard:
        """Return a new guard that fires ``seconds`` from now (from ``began``, a
        ``time.monotonic()`` in the past, if given); ``limit`` names it in errors."""
        g = Guard(self, max(0.0, seconds), limit, began)
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
        """Drop a finished guard: it fires no more (its heap entry is discarded lazily)."""
        with self.lock:  # one acquisition per attempt for all of it
            g._active = False
            g._stop = None
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
        if threading.current_thread() is self._thread:
            # Called on the watchdog's own thread (a finalizer the garbage collector ran
            # there), maybe with the lock held: flag it, the loop sees it when it wakes.
            self._stopping = True
            return
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


@contextmanager
def guarding(guard: Guard) -> Iterator[Guard]:
    """Make ``guard`` this thread's current one for the block (for blocking backends)."""
    previous = getattr(_current, "guard", None)
    _current.guard = guard
    try:
        yield guard
    finally:
        _current.guard = previous


def current_guard() -> Guard | None:
    """The guard made current on this thread by :func:`guarding`, if any."""
    return getattr(_current, "guard", None)
