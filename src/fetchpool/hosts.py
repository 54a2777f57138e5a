"""Per-host limits: transfers in flight, requests per second, and shared pauses.

With ``per_host`` or ``rate`` set, a Downloader gives every download a :class:`Ticket`
on its URL's host (scheme, host and port). Two places consult it:

- **Starting.** A download waits in :class:`HostLimits`' queue, in submit order, until
  its host has room; the queue hands out the first download whose host has, so a list
  that is mostly one slow host never fills every worker with that host's downloads.
- **Each request** (every attempt and every redirect hop) is admitted first
  (:class:`~fetchpool.steps.Admit`): the download's slot moves to the host it is about
  to connect to (a redirect to another host counts there), the host's token bucket
  gives it a turn, and a host paused by a ``Retry-After`` holds it until the pause ends.

A download holds one slot, on the host it talks to, from its start to its end: its
retries' waits included, which keeps a struggling host's load down. A download that must
wait for a slot on another host (a redirect there, or a retry back) gives its own up
first, so no two downloads can wait for each other; and while one waits, that host
starts no queued download, so a download under way is never starved by new ones.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

__all__ = ["HostLimits", "Ticket", "host_key"]

log = logging.getLogger("fetchpool")

T = TypeVar("T")

#: Downloads of a host with ``rate`` set that may wait for their first turn at once.
_FRESH_MAX = 1


#: The usual URL: a plain host name or IPv4 address, maybe a port.
_PLAIN = re.compile(r"(https?)://([A-Za-z0-9._-]+)(?::([0-9]{1,5}))?(?=[/?#]|\Z)", re.IGNORECASE)


def host_key(url: str) -> str | None:
    """Return ``"scheme://host:port"`` for an http(s) URL, or ``None`` for anything else."""
    # urlsplit would be most of what a ticket costs: the usual URL is matched instead,
    # and anything unusual (user-info, IPv6, escapes) is left to it.
    plain = _PLAIN.match(url)
    if plain is not None:
        scheme, host, port = plain.groups()
        scheme = scheme.lower()
        number = int(port) if port else (443 if scheme == "https" else 80)
        if number <= 65535:
            return f"{scheme}://{host.lower()}:{number}"
        return None
    return _host_key_parsed(url)


def _host_key_parsed(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except (ValueError, TypeError, AttributeError):
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        return None
    if port is None:
        port = 443 if scheme == "https" else 80
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class _Host:
    """One host's state."""

    __slots__ = ("active", "fresh", "next_ok", "paused_until", "waiting")

    def __init__(self) -> None:
        self.active = 0  # downloads holding a slot here
        self.fresh = 0  # started here, not yet admitted once (rate only)
        self.waiting = 0  # downloads under way that wait for a slot here
        self.next_ok = 0.0  # when the token bucket gives the next turn
        self.paused_until = 0.0


class HostLimits(Generic[T]):
    """The per-host limits of one Downloader, and its queue of downloads not started.

    Thread-safe. ``T`` is what the queue holds for a runner (its future and steps).

    Args:
        per_host: the most downloads talking to one host at once, or ``None``.
        rate: the most requests started per second to one host, or ``None``.
        pause_cap: the longest pause a ``Retry-After`` imposes (the retry policy's cap).
        clock: seconds, monotonic (tests may give their own).
    """

    def __init__(
        self,
        per_host: int | None,
        rate: float | None,
        pause_cap: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_host = per_host
        self.interval = None if rate is None else 1.0 / rate
        self.pause_cap = pause_cap
        self.clock = clock
        self._lock = threading.Lock()
        self._changes = threading.Condition(self._lock)
        #: Bumped whenever a waiting download may get in (a slot freed, a first turn).
        self.version = 0
        self._sleepers = 0  # threads in wait_change()
        self._hosts: dict[str, _Host] = {}
        # The queue: per host, its downloads in submit order; a heap of the hosts that may
        # have room, by their first download's number; the hosts found full; those whose
        # state changed since (to look at again).
        self._seq = itertools.count()
        self._pending: dict[str, deque[tuple[int, T, Ticket]]] = {}
        self._ready: list[tuple[int, str]] = []
        self._full: set[str] = set()
        self._changed: set[str] = set()
        self._pause_check = math.inf
        self._queued = 0

    # -- tickets -------------------------------------------------------------------------

    def ticket(self, url: str) -> Ticket | None:
        """Return a new download's ticket on ``url``'s host (``None``: not http(s))."""
        key = host_key(url)
        return None if key is None else Ticket(self, key)

    def _host(self, key: str) -> _Host:
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host()
        return host

    def _changed_now(self, key: str) -> None:
        # With the lock held.
        self._changed.add(key)
        self.version += 1
        if self._sleepers:
            self._changes.notify_all()

    def _forget_if_idle(self, key: str, host: _Host, now: float) -> None:
        # Memory stays bounded by the hosts in use, not by every host ever seen.
        if (
            not host.active
            and not host.fresh
            and not host.waiting
            and host.next_ok <= now
            and host.paused_until <= now
            and key not in self._pending
        ):
            del self._hosts[key]

    def pause(self, key: str, seconds: float, status: int) -> None:
        """Pause new requests to ``key`` for ``seconds`` (capped), as its ``Retry-After``
        asked; logged once per pause, not once per download."""
        seconds = min(seconds, self.pause_cap)
        if seconds <= 0:
            return
        now = self.clock()
        with self._lock:
            host = self._host(key)
            until = now + seconds
            if until <= host.paused_until:
                return
            was_paused = host.paused_until > now
            host.paused_until = until
        if not was_paused:
            log.warning(
                "%s answered %d with Retry-After: pausing new requests to it for %.1f s",
                key,
                status,
                seconds,
            )

    def wait_change(self, seconds: float) -> None:
        """Block until a download may get in, at most ``seconds``."""
        with self._lock:
            self._sleepers += 1
            try:
                self._changes.wait(seconds)
            finally:
                self._sleepers -= 1

    def wake_all(self) -> None:
        """Wake every thread in :meth:`wait_change` (the Downloader is cancelling)."""
        with self._lock:
            self.version += 1
            self._changes.notify_all()

    # -- the queue of downloads not started -----------------------------------------------

    def push(self, item: T, ticket: Ticket) -> None:
        """Queue a download (``item``) to start once its host has room."""
        with self._lock:
            key = ticket.key
            entry = (next(self._seq), item, ticket)
            queue = self._pending.get(key)
            if queue is None:
                queue = self._pending[key] = deque()
                heapq.heappush(self._ready, (entry[0], key))
            queue.append(entry)
            self._queued += 1

    def _may_start(self, host: _Host, now: float) -> bool:
        if host.paused_until > now:
            return False
        if self.per_host is not None and (host.active >= self.per_host or host.waiting):
            return False
        return self.interval is None or host.fresh < _FRESH_MAX

    def _look_again(self, now: float) -> None:
        # With the lock held: hosts found full that may have room now go back in the heap.
        back = self._changed & self._full
        self._changed.clear()
        if now >= self._pause_check:
            self._pause_check = math.inf
            for key in self._full:
                until = self._hosts[key].paused_until
                if until <= now:
                    back.add(key)
                elif until < self._pause_check:
                    self._pause_check = until
        for key in back:
            self._full.discard(key)
            heapq.heappush(self._ready, (self._pending[key][0][0], key))

    def pop(self) -> T | None:
        """Take the first queued download whose host has room, its slot taken; ``None``
        when no host with downloads queued has room now."""
        now = self.clock()
        with self._lock:
            if self._changed or now >= self._pause_check:
                self._look_again(now)
            ready = self._ready
            while ready:
                key = ready[0][1]
                host = self._host(key)
                queue = self._pending[key]
                if not self._may_start(host, now):
                    heapq.heappop(ready)
                    self._full.add(key)
                    if host.paused_until > now:
                        self._pause_check = min(self._pause_check, host.paused_until)
                    continue
                _, item, ticket = queue.popleft()
                if queue:
                    heapq.heapreplace(ready, (queue[0][0], key))
                else:
                    heapq.heappop(ready)
                    del self._pending[key]
                self._queued -= 1
                host.active += 1
                ticket.held = key
                if self.interval is not None:
                    host.fresh += 1
                    ticket.fresh = True
                return item
            return None

    def has_ready(self) -> bool:
        """Whether :meth:`pop` may find a download (cheap; may be wrong towards yes)."""
        return (
            bool(self._ready)
            or bool(self._changed & self._full)
            or (self.clock() >= self._pause_check)
        )

    def next_check(self) -> float:
        """When a host now paused may take a queued download again (``inf``: none);
        always in the future (a pause that is over is taken into account first)."""
        now = self.clock()
        with self._lock:
            if now >= self._pause_check:
                self._look_again(now)
            return self._pause_check

    def __len__(self) -> int:
        return self._queued

    def drain(self) -> list[T]:
        """Take every queued download out, in submit order (shutting down)."""
        with self._lock:
            entries = [entry for queue in self._pending.values() for entry in queue]
            self._pending.clear()
            self._ready.clear()
            self._full.clear()
            self._changed.clear()
            self._pause_check = math.inf
            self._queued = 0
        entries.sort(key=lambda entry: entry[0])
        return [item for _, item, _ in entries]


class Ticket:
    """One download's standing with the per-host limits (see :class:`HostLimits`)."""

    __slots__ = ("fresh", "held", "key", "limits", "waiting_on")

    def __init__(self, limits: HostLimits[Any], key: str) -> None:
        self.limits = limits
        #: The host of the download's URL.
        self.key = key
        #: The host whose slot the download holds (``None`` before its start).
        self.held: str | None = None
        #: Started, and not admitted once yet (counted in the host's ``fresh``).
        self.fresh = False
        #: The host whose slot the download waits for (counted in its ``waiting``).
        self.waiting_on: str | None = None

    def admit(self, key: str) -> float:
        """Admit the next request, to ``key``, now if possible.

        Returns:
            ``0.0`` when admitted (the slot is on ``key`` and a turn was taken); else how
            many seconds to wait before asking again (``inf``: until a slot frees, see
            :attr:`HostLimits.version`).
        """
        limits = self.limits
        now = limits.clock()
        with limits._lock:
            host = limits._host(key)
            if host.paused_until > now:
                return host.paused_until - now
            moving = key != self.held
            if moving and limits.per_host is not None and host.active >= limits.per_host:
                # Wait holding nothing (another download may wait for this one's slot),
                # and first in line: the host starts no queued download meanwhile.
                self._leave(now)
                if self.waiting_on != key:
                    self._stop_waiting(now)
                    host.waiting += 1
                    self.waiting_on = key
                return math.inf
            if limits.interval is not None:
                if host.next_ok > now:
                    return host.next_ok - now
                host.next_ok = now + limits.interval
            if moving:
                self._leave(now)
                host.active += 1
                self.held = key
            self._stop_waiting(now)
            if self.fresh:
                self.fresh = False
                limits._host(self.key).fresh -= 1
                limits._changed_now(self.key)
        return 0.0

    def wait(self, key: str, cancelled: Callable[[], bool]) -> bool:
        """Block until :meth:`admit` lets the request to ``key`` go; ``False`` if
        ``cancelled()`` became true first (the blocking driver's way)."""
        while True:
            delay = self.admit(key)
            if not delay:
                return True
            if cancelled():
                return False
            # Woken when a slot frees; pauses and turns end on their own.
            self.limits.wait_change(min(delay, 0.25))

    def pause(self, key: str, seconds: float, status: int) -> None:
        """Pause ``key`` for every download (see :meth:`HostLimits.pause`)."""
        self.limits.pause(key, seconds, status)

    def stand_aside(self) -> None:
        """The download waits for something else before its first request (a lock):
        another download of its host may start meanwhile, whatever ``rate`` says."""
        limits = self.limits
        with limits._lock:
            if self.fresh:
                self.fresh = False
                limits._hosts[self.key].fresh -= 1
                limits._changed_now(self.key)

    def _stop_waiting(self, now: float) -> None:
        # With the lock held: no longer first in line for a slot.
        key, self.waiting_on = self.waiting_on, None
        self._let_go(key, "waiting", now)

    def _leave(self, now: float) -> None:
        # With the lock held: give the slot back.
        key, self.held = self.held, None
        self._let_go(key, "active", now)

    def _let_go(self, key: str | None, count: str, now: float) -> None:
        # With the lock held: one less of ``count`` on ``key``'s host, if any.
        if key is None:
            return
        limits = self.limits
        host = limits._hosts[key]
        setattr(host, count, getattr(host, count) - 1)
        limits._changed_now(key)
        limits._forget_if_idle(key, host, now)

    def finish(self) -> None:
        """The download ended (or never ran): give back what it holds."""
        limits = self.limits
        now = limits.clock()
        with limits._lock:
            if self.fresh:
                self.fresh = False
                host = limits._hosts[self.key]
                host.fresh -= 1
                limits._changed_now(self.key)
                limits._forget_if_idle(self.key, host, now)
            self._stop_waiting(now)
            self._leave(now)
