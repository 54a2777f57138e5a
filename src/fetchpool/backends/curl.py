"""The libcurl backend (``backend="curl"``, ``pip install "fetchpool[curl]"``).

One thread runs libcurl's multi interface for the whole Downloader: it owns the
``CurlMulti``, every socket (through ``epoll``, by libcurl's socket callbacks) and the
connection cache, so connections are reused across workers and HTTP/2 streams share
one connection per host. The pool's worker threads stay what they are on the requests
backend, blocking callers running the shared pipeline: :meth:`CurlTransport.send`
hands a prepared easy handle to the loop and waits for the headers; the body then
flows from the loop's write callback through a small bounded buffer (the transfer is
paused when the worker falls behind) into the worker's :meth:`CurlReply.chunks`.

Why this shape: the per-URL pipeline (names, locks, retries, temporary files) stays
written once for both backends, and every transfer's socket work happens in C, under
one event loop, without a Python thread per connection.

libcurl is told to do as little as possible on its own: it follows no redirect,
decodes no body, retries nothing, keeps no cookies and reads no proxy variables (the
proxy is chosen here, per URL, as requests would choose it).
"""

from __future__ import annotations

import base64
import heapq
import itertools
import logging
import math
import os
import re
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TypeVar, cast, overload
from urllib.parse import urlsplit

import certifi
import pycurl
from requests.exceptions import RequestException
from requests.models import PreparedRequest
from requests.utils import get_environ_proxies, select_proxy

from .. import __version__
from ..deadline import Guard
from ..errors import FetchError, StorageError, TransferError
from ..hosts import HostLimits, Ticket
from ..pipeline import NOT_PLAIN
from ..retry import CLOCK
from ..ssrf import AddressPolicy, Refusal
from ..steps import Admit, Read, Send, Sleep, Splice, Steps, perform
from ..steps import run as run_steps
from ..storage import Cancelled
from ..workers import IN_PROGRESS
from . import (
    BodyEnded,
    Failure,
    Request,
    SpliceSink,
    attempt_error,
    ca_bundle_from_env,
    check_guard,
    describe,
    on_done,
    refused,
)

if TYPE_CHECKING:
    from ..pipeline import Pipeline, Task
    from ..storage import PathLock

__all__ = ["CurlError", "CurlReply", "CurlTransport"]

T = TypeVar("T")

log = logging.getLogger("fetchpool")

# Numbers this pycurl may not name (libcurl's are stable).
_E_WEIRD_SERVER_REPLY = 8
_OPT_SUPPRESS_CONNECT_HEADERS = 265

# The URL was checked before it got here: only libcurl's parser can still refuse it.
# (E_UNSUPPORTED_PROTOCOL comes from answers, "HTTP/0.9", a bad version: connection.)
_INVALID_URL = frozenset({pycurl.E_URL_MALFORMAT})
_STATUS_LINE = re.compile(r"HTTP/\d(?:\.\d)? +\d{3}(?: |$)")
# A header line (libcurl ends each with a newline): the name up to its first colon, the
# value up to the newline (both stripped afterwards); a line with no colon is no field.
_FIELD = re.compile(r"^([^:\n]*):([^\n]*)", re.MULTILINE)
_TLS_REFUSED = frozenset(
    {
        pycurl.E_PEER_FAILED_VERIFICATION,
        pycurl.E_SSL_CERTPROBLEM,
        pycurl.E_SSL_CIPHER,
        pycurl.E_SSL_CACERT_BADFILE,
        pycurl.E_SSL_ISSUER_ERROR,
        pycurl.E_SSL_PINNEDPUBKEYNOTMATCH,
        pycurl.E_SSL_INVALIDCERTSTATUS,
    }
)
_MALFORMED = frozenset({_E_WEIRD_SERVER_REPLY, pycurl.E_BAD_CONTENT_ENCODING})
#: An express transfer's length before its headers were looked at.
_UNSET = -3
# What ends a transfer at a non-2xx answer's headers, on purpose.
_ENDED_AT_HEADERS = frozenset({pycurl.E_WRITE_ERROR, pycurl.E_HTTP_RETURNED_ERROR})
# What a TLS handshake that the network broke (not the peer refused) says.
_TLS_DROPPED_WORDS = ("SSL_ERROR_SYSCALL", "unexpected eof", "reset by peer", "Connection reset")

#: The bytes a transfer may hold for its worker before libcurl is asked to pause it.
_HIGH_WATER = 1024 * 1024
#: In sink mode, how many bytes the loop writes between two counts by the worker.
_SINK_REPORT = 1024 * 1024
#: libcurl's receive buffer (its write callbacks get at most 16 KiB all the same).
_BUFFER_SIZE = 256 * 1024
_PROXY_CACHE_HOSTS = 256
#: In event mode, about how many buffered bytes one read step takes at once.
_JOIN = 256 * 1024
#: In sink mode, the blocks libcurl hands over are gathered into one reused buffer of
#: this size and written to the file as one: fewer writes, and no big buffer allocated
#: and freed for each, which glibc returns to the kernel and faults in again (a page
#: fault per 4 KiB of the body, most of the time a 1 GiB file took).
_SPOOL = 256 * 1024
#: A direct sink's writer buffers this much of libcurl's 16 KiB blocks before it writes
#: them to the file: a write(2) per 64 blocks rather than one each.
_DIRECT_BUFFER = 1024 * 1024
_START_EARLY_AFTER = 0.004
_BLANK_LINES = frozenset({b"\r\n", b"\n"})


class CurlError(Exception):
    """What libcurl said of a transfer that failed: the cause under a fetchpool error.

    Attributes:
        code: libcurl's ``CURLE_*`` number.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message or 'failed'} (curl error {self.code})"


def _classify(code: int, message: str) -> Failure:
    if code in _INVALID_URL:
        return "invalid-url"
    if code in _TLS_REFUSED:
        return "tls"
    if code == pycurl.E_SSL_CONNECT_ERROR:
        dropped = any(word.lower() in message.lower() for word in _TLS_DROPPED_WORDS)
        return "tls-dropped" if dropped else "tls"
    if code in _MALFORMED or (code == pycurl.E_RECV_ERROR and "chunk" in message.lower()):
        return "malformed"
    if code == pycurl.E_OPERATION_TIMEDOUT:
        return "timeout"
    return "connection"


# What a URL may hold as it is, unquoted (RFC 3986): anything else is quoted first.
_PLAIN_URL = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")


def _wire_url(url: str) -> str:
    """Return ``url`` as requests would put it on the wire (IDNA host, quoted path)."""
    if url.isascii() and _PLAIN_URL.fullmatch(url):
        return _without_dot_segments(url)
    prepared = PreparedRequest()
    prepared.prepare_url(url, None)
    return prepared.url or url


def _without_dot_segments(url: str) -> str:
    """Remove literal ``.`` and ``..`` path segments (RFC 3986 5.2.4), as urllib3 does.

    libcurl would do it too, but it also takes ``%2e%2e`` for ``..``; it is told to send
    the path as it is, so that both backends ask for the same resource.
    """
    if "/." not in url:
        return url  # nearly every URL: no parsing
    parts = urlsplit(url)
    path = parts.path
    if "/." not in path:
        return url
    out: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        if segment == ".":
            pass
        elif segment == "..":
            if len(out) > 1:
                out.pop()
        else:
            out.append(segment)
        if segment in (".", "..") and i == len(segments) - 1:
            out.append("")
    squashed = "/".join(out) or "/"
    if not squashed.startswith("/"):
        squashed = "/" + squashed
    return parts._replace(path=squashed).geturl()


class _Headers(Mapping[str, str]):
    """A response's header fields: looked up whatever the case, listed as they were sent.

    What requests' ``CaseInsensitiveDict`` gives, read-only, with a ``get`` of its own:
    that one (``Mapping.get``) raised and caught a ``KeyError`` for every field a
    response lacks, four of the six looked up per file. Filled by :func:`_parse_head`.
    """

    __slots__ = ("_store",)

    def __init__(self, store: dict[str, tuple[str, str]] | None = None) -> None:
        #: Lower-cased name -> (the name as sent, the value).
        self._store: dict[str, tuple[str, str]] = {} if store is None else store

    def __getitem__(self, name: str) -> str:
        return self._store[name.lower()][1]

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, /, default: str | T) -> str | T: ...
    def get(self, name: str, /, default: object = None) -> object:
        """The value of ``name`` (any case), or ``default`` if the response has none."""
        item = self._store.get(name.lower())
        return default if item is None else item[1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._store

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._store.values())

    def __len__(self) -> int:
        return len(self._store)

    def __eq__(self, other: object) -> bool:
        # As CaseInsensitiveDict compares: names in any case.
        if not isinstance(other, Mapping):
            return NotImplemented
        mine = {key: value for key, (_, value) in self._store.items()}
        return mine == {str(k).lower(): v for k, v in other.items()}

    __hash__ = None  # type: ignore[assignment]  # compared by content, as a dict

    def __repr__(self) -> str:
        return repr(dict(self.items()))


#: The headers of a transfer whose answer has not come yet (never changed: shared).
_NO_HEADERS = _Headers()


def _parse_head(lines: list[bytes]) -> tuple[int, str, _Headers]:
    """Parse a response's status line and header lines (as libcurl hands them over).

    A field sent more than once has its values joined with ``", "``.
    """
    status, reason = 0, ""
    if lines:
        first = lines[0].decode("latin-1").rstrip("\r\n")
        if _STATUS_LINE.match(first):
            parts = first.split(" ", 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            reason = parts[2].strip() if len(parts) > 2 else ""
            lines = lines[1:]
    # One decode and one regex pass for all the fields, rather than a partition and
    # four assignments a line: this runs once a file, on the loop every download shares.
    fields = [
        (name.strip(), value.strip())
        for name, value in _FIELD.findall(b"".join(lines).decode("latin-1"))
    ]
    store = {name.lower(): (name, value) for name, value in fields}
    if len(store) < len(fields):
        # A field sent more than once (rare): join its values in the order sent.
        store = {}
        for name, value in fields:
            key = name.lower()
            seen = store.get(key)
            store[key] = (name, value) if seen is None else (name, f"{seen[1]}, {value}")
    return status, reason, _Headers(store)


def _code_of(exc: pycurl.error) -> tuple[int, str]:
    """libcurl's code and message in a ``pycurl.error``."""
    if len(exc.args) == 2 and isinstance(exc.args[0], int):
        return exc.args[0], str(exc.args[1])
    return -1, str(exc)


_IN, _OUT = select.POLLIN, select.POLLOUT
_ERR = select.POLLERR | select.POLLHUP


class _Poller:
    """``epoll`` where there is one, else ``poll``: register, modify, unregister, poll."""

    def __init__(self) -> None:
        epoll = getattr(select, "epoll", None)
        if epoll is not None:
            self._impl: Any = epoll()
            self._unit = 1.0  # epoll waits in seconds
        else:  # pragma: no cover - not Linux
            self._impl = select.poll()
            self._unit = 1000.0  # poll in milliseconds
        self.register = self._impl.register
        self.modify = self._impl.modify
        self.unregister = self._impl.unregister

    def poll(self, wait: float) -> list[tuple[int, int]]:
        return self._impl.poll(wait * self._unit)  # type: ignore[no-any-return]

    def close(self) -> None:
        close = getattr(self._impl, "close", None)
        if close is not None:
            close()


def _outcome(future: Future[Any]) -> tuple[Any, BaseException | None]:
    """A finished future's result, as a step resumes with it."""
    error = future.exception()
    return (None, error) if error is not None else (future.result(), None)


class _LoopFuture(Future[T]):
    """A future the loop thread completes; its callers' done-callbacks run elsewhere.

    The loop runs every download: a callback run there that blocks (one that processes
    the file, or waits for another download) would hold them all, and cancellation
    with them. Callbacks added once it is done run at once, on the adding thread, as
    on any future; fetchpool's own quick ones use :func:`fetchpool.backends.on_done`.
    """

    # An express download's (see CurlTransport.submit_express): its URL, and what is
    # called if it is cancelled before it started (class attributes: set only there).
    url: str | None = None
    on_cancel: Callable[[str, Future[Any]], None] | None = None

    def __init__(self, transport: CurlTransport) -> None:
        super().__init__()
        self._transport = transport
        # The callers' callbacks added before it is done, handed off together (so they
        # run in the order they were added, as on any future); None once handed off.
        self._callers: list[Callable[[Future[T]], object]] | None = []
        # A function, not a bound method: the future's callback list would then hold
        # the future itself, a cycle only the garbage collector breaks, and with it the
        # callers' callbacks (the Downloader's) would outlive the future for a while.
        # Put in the list directly: nobody else has the future yet, and add_done_callback
        # would take its Condition (two Python calls) for nothing, once a file.
        self._done_callbacks.append(_LoopFuture._hand_off)  # type: ignore[attr-defined]

    def cancel(self) -> bool:
        """Cancel the download if it has not started (see :meth:`Future.cancel`)."""
        cancelled = super().cancel()
        on_cancel = self.on_cancel
        if cancelled and on_cancel is not None:
            # Here rather than as a done-callback added to each future: one a file,
            # for a cancel that almost never comes.
            self.on_cancel = None
            assert self.url is not None
            on_cancel(self.url, self)
        return cancelled

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        with self._condition:
            callers = self._callers
            if callers is not None:
                callers.append(fn)
                return
        super().add_done_callback(fn)  # done and handed off: runs at once, here

    @staticmethod
    def _hand_off(future: Future[Any]) -> None:
        assert isinstance(future, _LoopFuture)
        with future._condition:
            callers, future._callers = future._callers, None
        if callers:
            future._transport.call_back(callers, future)


_in_callback = threading.local()


def _call(fns: list[Callable[[Future[Any]], object]], future: Future[Any]) -> None:
    _in_callback.active = True
    try:
        for fn in fns:
            _call_one(fn, future)
    finally:
        _in_callback.active = False


def _call_one(fn: Callable[[Future[Any]], object], future: Future[Any]) -> None:
    try:
        fn(future)
    except BaseException:  # the caller's (a SystemExit too): logged, as futures do
        log.exception("a done-callback of %r raised", future)


def _complete(future: Future[Any], value: Any, error: BaseException | None) -> None:
    """Set ``future``'s outcome; a done-callback raising a BaseException is logged.

    concurrent.futures already logs a callback's ``Exception``; a ``SystemExit`` (say)
    would escape into the loop and end it, failing every other download.
    """
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except BaseException:  # a user callback's (SystemExit...), not the loop's
        log.exception("a done-callback of %r raised", future)


def _basic_auth(user: str, password: str) -> str:
    def encode(text: str) -> bytes:
        # requests sends latin-1 where it can; beyond it, UTF-8 is what servers expect.
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            return text.encode("utf-8")

    token = base64.b64encode(encode(user) + b":" + encode(password)).decode("ascii")
    return f"Basic {token}"


def _ca_bundle() -> str:
    # The bundle the requests backend uses: the environment's, else certifi's. libcurl
    # reads no variable itself (CURL_CA_BUNDLE and SSL_CERT_FILE are the curl tool's and
    # OpenSSL's defaults, and CAINFO overrides them).
    return ca_bundle_from_env() or certifi.where()


class _Transfer:
    """One request in flight: what the loop thread fills and the worker reads.

    Every field is guarded by ``lock`` (``cond``'s), except those only the loop touches.
    The fields that start the same for every transfer start as class attributes, set on
    the instance only once they change: one is made per request, on the loop thread.
    """

    # Event mode: the download whose steps wait on this transfer (loop thread only).
    run: _Run | None = None
    # Express mode (loop thread only): the download this transfer is the express attempt
    # of, until it is settled (see CurlTransport._settle_express).
    express: _Run | None = None
    owed = False  # a wake-up is owed to its waiter at the end of this turn
    replied = False  # the reply was handed over
    status = 0
    reason = ""
    headers: _Headers = _NO_HEADERS
    ready = False  # the final response's headers are all in
    done = False  # libcurl finished (or the loop gave up on) the transfer
    code = 0
    message = ""
    failure: Failure | None = None
    buffered = 0
    paused = False
    resuming = False  # a "resume" is on its way to the loop
    waiting = False
    closed = False
    # Sink mode (see CurlReply.splice): the loop writes the body straight into
    # ``sink``; ``sunk`` counts what it wrote, ``sink_error`` keeps what it raised.
    sink: SpliceSink | None = None
    sunk = 0
    spooled = 0  # bytes in the slot's spool, not yet written
    reported = 0
    sink_error: BaseException | None = None
    # Event mode, while the loop sinks the body: what counts it, and the bytes owed.
    moved: Callable[[int], None] | None = None
    owed_bytes = 0
    # Event mode, direct sink (loop thread only): libcurl writes the body itself
    # through ``direct``, a writer on the sink's descriptor; its position was
    # ``direct_base`` then, and ``direct_counted`` of what it took since is in ``sunk``.
    direct: BinaryIO | None = None
    direct_base = 0
    direct_counted = 0
    # The SSRF guard (loop thread): the URL's host, whether it goes through a proxy (the
    # guard does not check the proxy's address), the first address refused, and whether
    # a socket to an allowed one was opened.
    host = ""
    proxied = False
    refused: Refusal | None = None
    reached = False

    def __init__(
        self,
        request: Request,
        guard: Guard | None,
        read_timeout: float,
        start: float,
        slot: _Slot,
    ) -> None:
        self.request = request
        self.guard = guard
        self.slot = slot
        # The slot's: a Condition is costly to make (Python code), and the slot has
        # one transfer at a time. ``with t.lock`` where only exclusion is needed: a
        # Condition's __enter__ is a Python call too, the lock's is not.
        self.lock = slot.lock
        self.cond = slot.cond
        self.lines: list[bytes] = []  # header lines of the response coming in (loop)
        self.chunks: deque[bytes] = deque()
        # Loop thread only: when the transfer last saw a byte, and how long it may idle.
        self.read_timeout = read_timeout
        self.active = start

    def finish(self, code: int, message: str, failure: Failure | None = None) -> None:
        """Mark the transfer ended (loop thread) and wake whoever waits on it."""
        self.take_head()
        with self.lock:
            if self.spooled and self.sink is not None:
                self.slot.flush(self, self.sink)
            self.done = True
            self.code = code
            self.message = message
            self.failure = failure
            if (self.run is None and self.express is None) or self.waiting:
                # A blocked worker may wait (event mode's steps wait on nothing but
                # the loop, and a plain Lock's Condition costs four Python calls here).
                self.cond.notify_all()
        if self.run is not None:
            self.slot.transport.owe_wake(self)
        elif self.express is not None:
            self.slot.transport.express_due(self.express)

    def take_head(self) -> None:
        """Parse an express transfer's headers if they are all in and were not parsed (no
        body came, or it broke off, or the loop ended it): as the steps' header callback
        would have, so that its end is told as theirs is ("while reading")."""
        if self.express is not None and not self.ready:
            lines = self.lines
            if lines and lines[-1] in _BLANK_LINES:
                self.parse_lines()

    def parse_lines(self) -> None:
        """Take the final answer's status and headers from ``lines`` (express mode, where
        libcurl's header callback only collects the lines, all answers' blank lines too)."""
        lines = self.lines
        end = len(lines)
        try:
            blank = lines.index(b"\r\n")
        except ValueError:
            # Bare newlines, or no blank line (yet): the first blank line, if any.
            blank = next((i for i, line in enumerate(lines) if line in _BLANK_LINES), end)
        if blank >= end - 1:
            head = lines[:blank]  # the usual: one answer, no informational one before
        else:
            # The last answer that starts with a status line (1xx answers come first,
            # and a chunked body's trailers after it).
            begin = end
            while begin:
                begin -= 1
                if lines[begin][:5] == b"HTTP/" and (not begin or lines[begin - 1] in _BLANK_LINES):
                    break
            stop = begin
            while stop < end and lines[stop] not in _BLANK_LINES:
                stop += 1
            head = lines[begin:stop]
        self.status, self.reason, self.headers = _parse_head(head)
        self.ready = self.status >= 200

    def take(self, size: int = 0) -> tuple[bytes | None, bool]:
        """Take the next buffered block (``None``: none yet; ``b""``: the body ended).

        With ``size``, the blocks buffered are joined up to about that many bytes: one
        step then writes what libcurl gave in 16 KiB callbacks.

        Returns it with whether the caller must now ask the loop to resume the transfer
        (it was paused, and enough of its buffer is taken). ``lock`` must not be held.
        """
        with self.lock:
            if self.chunks:
                data: bytes | None = self.chunks.popleft()
                assert data is not None
                if size and self.chunks and len(data) < size:
                    parts = [data]
                    taken = len(data)
                    while self.chunks and taken < size:
                        parts.append(self.chunks.popleft())
                        taken += len(parts[-1])
                    data = b"".join(parts)
                self.buffered -= len(data)
                # Still paused until the loop resumes it: not idle meanwhile.
                resume = self.paused and not self.resuming and self.buffered < _HIGH_WATER // 2
                self.resuming = self.resuming or resume
                return data, resume
            return (b"" if self.done else None), False

    def start_sink(self, sink: SpliceSink) -> tuple[int, bool]:
        """Write what is buffered into ``sink`` and have the loop write the rest there.

        Returns how many bytes were written here, and whether the caller must now ask
        the loop to resume the transfer. ``lock`` must not be held.

        Raises:
            StorageError: from ``sink``; the loop then writes nothing.
        """
        with self.lock:
            # Under the lock, so that no block lands between what is buffered and the
            # first one the loop writes: the file gets the body in order.
            flushed = 0
            while self.chunks:
                data = self.chunks.popleft()
                self.buffered -= len(data)
                sink.write(data)
                flushed += len(data)
            resume = self.paused and not self.resuming
            self.resuming = self.resuming or resume
            self.reported = 0
            self.sink = sink
        return flushed, resume

    def stop_sink(self) -> None:
        """Have the loop write no more into the sink: its file may go right after."""
        with self.lock:
            self.sink = None
            self.closed = self.closed or not self.done

    def wait_headers(self, given_up: Callable[[], bool]) -> bool:
        """Wait until the headers are in (``True``) or the transfer ended without them."""
        with self.lock:
            while not self.ready and not self.done and not given_up():
                self.cond.wait(0.5)
            return self.ready

    def cause(self) -> CurlError:
        """libcurl's own error, to chain under ours."""
        return CurlError(self.code, self.message)

    def fail(self, during: str) -> NoReturn:
        """Raise the error of a transfer that ended with a non-zero code, its cause chained.

        Raises:
            BodyEnded: the body stopped short (libcurl's partial file, once the headers
                were in).
            FetchError: anything else, mapped with :func:`attempt_error`.
        """
        request = self.request
        cause = self.cause()
        if self.code == pycurl.E_PARTIAL_FILE and self.ready:
            raise BodyEnded from cause
        kind = self.failure or _classify(self.code, self.message)
        if kind == "blocked" and self.refused is not None:
            raise refused(self.refused, request.shown, during, self.guard) from self.refused
        detail = describe(cause, request.secrets)
        raise attempt_error(kind, request.shown, during, detail, self.guard) from cause


class _Run:
    """One download's steps, driven by the loop thread (event mode).

    An express download (see :meth:`CurlTransport.submit_express`) has no steps until
    it is handed on to them; its express fields are set only then.
    """

    __slots__ = (
        "deadline",
        "future",
        "length",
        "lock",
        "parked",
        "replay",
        "seen",
        "steps",
        "task",
    )

    def __init__(self, steps: Steps[Any] | None, future: Future[Any]) -> None:
        self.steps = steps
        self.future = future
        # What it waits for: a transfer (headers or bytes), a blocking call, room for
        # its request (the Send; an express download's Request), its host's turn (the
        # Admit: a sleeper, or waiting for a slot), or (None) nothing but time.
        self.parked: _Transfer | Future[Any] | Send | Request | Admit | None = None
        # The express transfer its first Send is answered with, once handed on.
        self.replay: _Transfer | None = None
        # Express only: the task, its path's lock, when its attempt must end, and how
        # many header lines the idle check saw.
        self.task: Task
        self.lock: PathLock | None
        self.deadline: float
        self.seen: int
        self.length: int  # what Pipeline.express_length said, once the headers are in


class _Handed:
    """A new socket's descriptor for pycurl, which gives libcurl a duplicate of it: the
    original is closed as soon as pycurl lets go of this."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def __del__(self) -> None:
        os.close(self.fd)


class _Slot:
    """An easy handle and the callbacks bound to it, reused across transfers."""

    def __init__(self, transport: CurlTransport) -> None:
        self._transport = self.transport = transport
        self.transfer: _Transfer | None = None
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.proxy: str | None = None
        self.connect_ms = -1
        self.header_lines: list[str] | None = None
        self.header_source: Mapping[str, str] | None = None  # what header_lines were made of
        self.pipewait = 0
        self.spool: bytearray | None = None  # sink mode's buffer, made when first needed
        self.express = False  # the header callback is lines.append
        self.lines: list[bytes] = []  # an express transfer's header lines
        easy = pycurl.Curl()
        self.easy = easy
        easy.setopt(pycurl.NOSIGNAL, 1)
        easy.setopt(pycurl.FOLLOWLOCATION, 0)
        easy.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        easy.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        easy.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS)
        easy.setopt(pycurl.HTTP_CONTENT_DECODING, 0)
        easy.setopt(pycurl.PATH_AS_IS, 1)
        easy.setopt(_OPT_SUPPRESS_CONNECT_HEADERS, 1)
        # The proxy is chosen per URL above libcurl (as requests chooses it): an explicit
        # empty no-proxy list keeps libcurl from applying no_proxy a second time, its way.
        easy.setopt(pycurl.NOPROXY, "")
        easy.setopt(pycurl.BUFFERSIZE, _BUFFER_SIZE)
        easy.setopt(pycurl.USERAGENT, transport.user_agent)
        easy.setopt(pycurl.SSL_VERIFYPEER, 1)
        easy.setopt(pycurl.SSL_VERIFYHOST, 2)
        if os.path.isdir(transport.ca_bundle):
            easy.setopt(pycurl.CAPATH, transport.ca_bundle)
        else:
            easy.setopt(pycurl.CAINFO, transport.ca_bundle)
        easy.setopt(pycurl.PREREQFUNCTION, self.on_connected)
        if transport.policy is not None:
            # libcurl resolves, then asks for a socket to each address it connects to:
            # what is checked here is the address connected to, for every new connection.
            easy.setopt(pycurl.OPENSOCKETFUNCTION, self.on_open_socket)
        easy.setopt(pycurl.HEADERFUNCTION, self.on_header)
        easy.setopt(pycurl.WRITEFUNCTION, self.on_write)

    # The callbacks run on the loop thread, inside libcurl.

    def on_connected(self, *addresses: object) -> int:
        # Connected (or given a reused connection), the request about to go out: from
        # here the read timeout applies, as it does to requests' first recv().
        t = self.transfer
        if t is not None:
            t.active = time.monotonic()
            self._transport.idle_check_by(t.active + t.read_timeout)
        return 0  # CURL_PREREQFUNC_OK

    def on_open_socket(self, purpose: int, address: Any) -> object:
        # Refuse a blocked address (libcurl then tries the next one, if any); _done turns
        # a transfer that found none allowed into a BlockedAddressError.
        t = self.transfer
        policy = self._transport.policy
        if t is None or policy is None:
            return pycurl.SOCKET_BAD
        if not t.proxied:
            refusal = policy.refusal(t.host, str(address.addr[0]))
            if refusal is not None:
                t.refused = t.refused or refusal
                return pycurl.SOCKET_BAD
        try:
            fd = socket.socket(address.family, address.socktype, address.protocol).detach()
        except OSError:
            return pycurl.SOCKET_BAD
        t.reached = True
        return _Handed(fd)

    def on_header(self, line: bytes) -> int | None:
        t = self.transfer
        if t is None:
            return 0
        t.active = time.monotonic()
        if line not in _BLANK_LINES:
            t.lines.append(line)  # parsed at the blank line that ends them: one pass
            return None
        lines, t.lines = t.lines, []
        status, reason, headers = _parse_head(lines)
        with t.lock:
            t.status, t.reason, t.headers = status, reason, headers
            if 100 <= status < 200:
                return None  # an informational answer: the real one follows
            t.ready = True
        # The worker is woken once libcurl is done with this turn, not now: a small body
        # and the transfer's end usually come in the same turn, and one wake-up then
        # serves headers, body and end, where three hand-offs of the GIL did before.
        self._transport.owe_wake(t)
        # Only a 2xx body is ever read (DESIGN rule 7): end any other transfer now.
        return None if 200 <= status < 300 else 0

    def on_write(self, data: bytes) -> int | None:
        t = self.transfer
        if t is None:
            return 0
        t.active = time.monotonic()
        if t.express is not None:
            return self._transport.express_write(t, data)
        with t.lock:
            sink = t.sink
            if sink is None:
                if t.closed:  # the worker is done with it (and may have dropped its file)
                    return 0
                return self._buffer(t, data)
            # Sink mode: written here, on the loop thread, so that a big body costs no
            # hand-off per block; under the lock, so that the worker, leaving splice(),
            # can take the sink back knowing no write is half done.
            spool = self.spool
            if spool is None:
                spool = self.spool = bytearray(_SPOOL)
            start = t.spooled
            end = start + len(data)
            if end > _SPOOL:
                if not self.flush(t, sink):
                    return 0  # ends the transfer
                start, end = 0, len(data)
                if end > _SPOOL:  # pragma: no cover - libcurl's blocks are 16 KiB
                    spool.extend(bytes(end - _SPOOL))
            spool[start:end] = data
            t.spooled = end
            due = t.sunk - t.reported
            if due < _SINK_REPORT:
                return None
            if t.waiting:
                t.cond.notify()
                return None
            moved = t.moved
            if moved is None:
                return None
            t.reported = t.sunk
        # Event mode: counted here, not at the end of the turn, which on a fast link may
        # come many MiB later (progress events would come in lumps). Out of the lock: it
        # runs the caller's progress callback.
        try:
            moved(due)
        except Exception as exc:  # noqa: BLE001 - the steps raise it, once the transfer ended
            t.sink_error = exc
            return 0
        return None

    def flush(self, t: _Transfer, sink: SpliceSink) -> bool:
        """Write what ``t`` spooled into ``sink`` (``t.lock`` held); ``False`` if it failed."""
        assert self.spool is not None
        try:
            with memoryview(self.spool) as view:
                sink.write(view[: t.spooled])
        except Exception as exc:  # noqa: BLE001 - StorageError above all: the worker raises it
            t.sink_error = exc
            t.spooled = 0
            return False
        t.sunk += t.spooled
        t.spooled = 0
        return True

    @staticmethod
    def _buffer(t: _Transfer, data: bytes) -> int | None:
        """Keep ``data`` for the worker (``t.lock`` held), or pause when it is behind."""
        if t.buffered >= _HIGH_WATER:
            # libcurl hands the same bytes again once unpaused.
            t.paused = True
            return pycurl.WRITEFUNC_PAUSE  # type: ignore[no-any-return]
        t.chunks.append(data)
        t.buffered += len(data)
        if t.waiting:
            t.cond.notify()
        elif t.run is not None and not t.owed:
            t.slot.transport.owe_wake(t)
        return None


class CurlReply:
    """The reply of a :class:`CurlTransport`; see :class:`fetchpool.backends.Reply`."""

    def __init__(self, transport: CurlTransport, slot: _Slot, transfer: _Transfer) -> None:
        self._transport = transport
        self._slot = slot
        self._t = transfer
        self.status = transfer.status
        self.reason = transfer.reason
        self.headers = transfer.headers
        self._source: Iterator[bytes] | None = None

    def chunks(self, size: int) -> Iterator[bytes]:
        """Yield the body as libcurl delivers it (framing removed, encoding kept)."""
        t = self._t
        while True:
            with t.lock:
                while not t.chunks and not t.done:
                    t.waiting = True
                    t.cond.wait(0.5)
                    t.waiting = False
                    if not t.done and not t.chunks:
                        check_guard(t.guard, t.request.shown)
            data, resume = t.take()
            if resume:
                self._transport.post("resume", self._slot, t)
            if data:
                yield data
                continue
            if t.code:
                t.fail("while reading")
            return

    def read(self, size: int) -> bytes:
        """Return the next bytes of the body; see :meth:`fetchpool.backends.Reply.read`."""
        if self._source is None:
            self._source = self.chunks(size)
        return next(self._source, b"")

    def splice(self, sink: SpliceSink, length: int, moved: Callable[[int], None]) -> bool:
        """Have the loop thread write the rest of the body into ``sink`` as it arrives.

        What is buffered for this worker goes first; then libcurl's write callback
        writes each block itself, and this thread only counts (``moved``, about every
        :data:`_SINK_REPORT` bytes, so progress events stay on the worker's thread).
        """
        t = self._t
        flushed, resume = t.start_sink(sink)
        try:
            return self._sunk(sink, length, moved, flushed, resume)
        finally:
            # However this ends, the loop writes no more: the pipeline may discard the
            # file (and its descriptor number be reused) right after.
            t.stop_sink()

    def _sunk(
        self,
        sink: SpliceSink,
        length: int,
        moved: Callable[[int], None],
        flushed: int,
        resume: bool,
    ) -> bool:
        """The rest of :meth:`splice`, once the loop writes: count what it wrote."""
        t = self._t
        if flushed:
            moved(flushed)
            length -= flushed
        if resume:
            self._transport.post("resume", self._slot, t)
        counted = 0
        while True:
            with t.lock:
                while not t.done and t.sunk - counted < _SINK_REPORT:
                    t.waiting = True
                    t.cond.wait(0.5)
                    t.waiting = False
                    if not t.done:
                        check_guard(t.guard, t.request.shown)
                sunk, done = t.sunk, t.done
                t.reported = sunk
            if sunk > counted:
                moved(sunk - counted)
                counted = sunk
            if done:
                break
        if t.sink_error is not None:
            raise t.sink_error
        if t.code:
            t.fail("while reading")
        if counted < length:
            raise BodyEnded
        return True

    def close(self) -> None:
        """End the transfer if it is still running, and give its handle back."""
        t = self._t
        with t.lock:
            t.closed = True
            t.chunks.clear()
            t.buffered = 0
        self._transport.post("close", self._slot, t)


class CurlTransport:
    """Sends the workers' requests through one libcurl multi handle on one loop thread.

    Args:
        workers: the pool's size: at most this many transfers run at once.
        policy: the SSRF guard's policy, checked on every new connection, or ``None``.

    Raises:
        ImportError: pycurl is not installed (raised when this module is imported).
    """

    def __init__(self, workers: int, policy: AddressPolicy | None = None) -> None:
        self.policy = policy
        self.user_agent = f"fetchpool/{__version__} " + " ".join(pycurl.version.split()[:2])
        self.ca_bundle = _ca_bundle()
        self._workers = workers
        self._lock = threading.Lock()
        self._free: list[_Slot] = []
        self._slots: list[_Slot] = []
        self._commands: deque[tuple[str, _Slot, _Transfer]] = deque()
        self._proxies: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._loop_ident: int | None = None  # the loop thread's, while it runs
        self._stopping = False
        self._closed = False
        self._releaser: threading.Thread | None = None
        self._failed: BaseException | None = None
        # os.pipe() is close-on-exec already; pipe2() would be Linux only.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        self._multi.setopt(pycurl.M_MAXCONNECTS, max(16, workers))
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._poller = _Poller()
        self._poller.register(self._wake_r, _IN)
        # Sockets watched, with their events; and those libcurl let go of but that stay
        # watched until they stir: a kept-alive connection is let go of after every
        # transfer and wanted again by the next one, two system calls saved each time.
        self._watched: dict[int, int] = {self._wake_r: _IN}
        self._idle_sockets: set[int] = set()
        self._sockets: dict[int, int] = {}  # watched socket -> its inode
        self._timer: float | None = None
        self._owed: list[_Transfer] = []
        self._idle_check = 0.0
        self._running: dict[int, _Slot] = {}
        # Transfers whose body libcurl writes straight into its file (see _go_direct):
        # counted once a turn of the loop (loop thread).
        self._direct: list[_Transfer] = []
        # Event mode (see runner()): downloads queued (under _lock), and those whose
        # steps the loop drives, at most _limit at once (loop thread).
        self._limit = workers
        self._queue: deque[tuple[Future[Any], Callable[[], Steps[Any]] | str]] = deque()
        # The express lane (see runner()): its downloads whose transfer ended or whose
        # body turned out not to fit, to settle after the turn (loop thread).
        self._pipeline: Pipeline | None = None
        self._express_cap = 0
        self._express_seconds = 0.0
        self._due: list[_Run] = []
        # With per-host limits, the downloads that have a host wait in its queue instead;
        # runs waiting for a slot on a host, and the limits' version they last saw.
        self._hosts: HostLimits[Any] | None = None
        self._admits: list[_Run] = []
        self._idle_runs: set[_Run] = set()  # in a blocking call, no transfer open
        self._admits_seen = -1
        # Futures submitted and not yet completed (a set, not a counter: a KeyboardInterrupt
        # landing between two statements of submit() must not leave it skewed for good).
        self._unfinished: set[Future[Any]] = set()
        self._all_done = threading.Condition(self._lock)
        self._runs: set[_Run] = set()
        # Runs whose request waits for room: at most _limit transfers are in flight,
        # while a few more runs may be writing what theirs brought (loop thread).
        self._sends: deque[_Run] = deque()
        self._sleepers: list[tuple[float, int, _Run, threading.Event]] = []
        self._seq = itertools.count()
        self._rouse = False
        self._blocked: deque[tuple[_Run, Future[Any]]] = deque()  # under _lock
        self._helpers: ThreadPoolExecutor | None = None
        self._callbacks: ThreadPoolExecutor | None = None  # callers' done-callbacks
        self._falling: deque[tuple[_Run, Any, BaseException | None]] = deque()  # under _lock
        self._fallers = 0  # threads draining _falling (under _lock)
        self._gone = False  # the loop drives no download any more (under _lock)
        self._turn_began = 0.0

    # -- worker side ---------------------------------------------------------------------

    def _proxy_for(self, url: str) -> str:
        # Keyed by what precedes the path ("http://host:port"): no parsing per request.
        end = url.find("/", url.find("//") + 2)
        key = (url if end < 0 else url[:end]).lower()
        proxy = self._proxies.get(key)  # one dict read is atomic: no lock
        if proxy is None:
            # The choice requests makes: *_proxy and no_proxy from the environment.
            proxy = select_proxy(url, get_environ_proxies(url)) or ""
            with self._lock:
                if len(self._proxies) >= _PROXY_CACHE_HOSTS:
                    self._proxies.clear()
                self._proxies[key] = proxy
        return proxy

    def _start_thread(self) -> None:
        # With self._lock held.
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._run, name="fetchpool-curl", daemon=True)
            self._thread.start()

    def _slot(self) -> _Slot:
        with self._lock:
            if self._free:
                return self._free.pop()
        slot = _Slot(self)
        with self._lock:
            self._slots.append(slot)
        return slot

    def post(self, what: str, slot: _Slot, transfer: _Transfer) -> None:
        """Queue a command about ``transfer`` for the loop thread and wake it.

        A command names its transfer, not just the handle: one that arrives after the
        handle went on to another transfer is then dropped.
        """
        with self._lock:
            if self._closed:
                return  # no loop runs any more, and the wake-up pipe is gone
            self._commands.append((what, slot, transfer))
            self._start_thread()
        self._wake()

    def _wake(self) -> None:
        """Make the loop look at its commands soon (it does anyway when this is it)."""
        # get_ident() is C; current_thread() is a Python call, twice a file here.
        if self._woken or threading.get_ident() == self._loop_ident:
            # A wake-up is on its way already (read without the lock: what the caller
            # queued before this read is there before the loop clears the flag, after
            # its read of the pipe, and so before it looks at its work again).
            return
        with self._lock:
            wake = not self._woken
            self._woken = True
        if wake:
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass

    def send(self, request: Request, guard: Guard) -> CurlReply:
        """Send one GET, redirects not followed; see :class:`fetchpool.backends.Transport`."""
        slot, t = self._prepare(request, guard)
        guard.on_fire(lambda: self.post("abort", slot, t))
        self.post("add", slot, t)
        if not t.wait_headers(lambda: self._failed is not None or self._closed):
            self.post("close", slot, t)
            if t.done and t.code:
                t.fail("requesting")  # never BodyEnded: the headers are not in
            raise attempt_error("connection", request.shown, "requesting", "no response", guard)
        return CurlReply(self, slot, t)

    def _prepare(
        self, request: Request, guard: Guard | None, express: bool = False
    ) -> tuple[_Slot, _Transfer]:
        """Set a free handle up for ``request`` (any thread); ``express``: for an express
        transfer (no guard: the loop watches its deadline).

        Raises:
            FetchError: the guard fired, the URL is refused, or the transport is closed.
        """
        if guard is not None:
            check_guard(guard, request.shown, "requesting")
        if self._closed or self._failed is not None:
            detail = (
                "the transport is closed"
                if self._closed
                else f"the curl loop failed: {self._failed!r}"
            )
            error = attempt_error("connection", request.shown, "requesting", detail, guard)
            if isinstance(error, TransferError):
                # No later attempt can heal it: fail now rather than sleep through retries
                # (on a fall-back thread each, or all of them on a few).
                error.retryable = False
            raise error
        connect, read = request.timeout
        proxy = self._proxy_for(request.url)
        host = ""
        if self.policy is not None:
            host = urlsplit(request.url).hostname or ""
            if proxy:
                refusal = self.policy.proxied(host)
                if refusal is not None:
                    raise refused(refusal, request.shown, "requesting", guard)
        slot = self._slot()
        easy = slot.easy
        headers = request.headers
        if request.auth is None and headers is slot.header_source:
            header_lines = slot.header_lines  # the same headers (the express lane's, say)
        else:
            header_lines = [
                f"{name}: {value}" if value else f"{name};" for name, value in headers.items()
            ]
            if request.auth is not None:
                header_lines.append(f"Authorization: {_basic_auth(*request.auth)}")
        try:
            easy.setopt(pycurl.URL, _wire_url(request.url))
        except (pycurl.error, RequestException, UnicodeError, ValueError) as exc:
            self._give_back(slot)
            raise attempt_error(
                "invalid-url", request.shown, "requesting", describe(exc, request.secrets), guard
            ) from exc
        if header_lines is not slot.header_lines and header_lines != slot.header_lines:
            # Nearly always the same lines as the handle's last request: pycurl would
            # build libcurl's list of them anew.
            easy.setopt(pycurl.HTTPHEADER, header_lines)
            slot.header_lines = header_lines
        # A mapping the caller cannot change (a request's is never changed once made).
        slot.header_source = headers if request.auth is None else None
        connect_ms = max(1, int(connect * 1000))
        if connect_ms != slot.connect_ms:
            easy.setopt(pycurl.CONNECTTIMEOUT_MS, connect_ms)
            slot.connect_ms = connect_ms
        pipewait = int(request.url[:6].lower() == "https:")
        if pipewait != slot.pipewait:
            # Over TLS, wait for a connection that can multiplex (HTTP/2) rather than open
            # another one; plain http is HTTP/1.1 here, where waiting only costs time.
            easy.setopt(pycurl.PIPEWAIT, pipewait)
            slot.pipewait = pipewait
        if proxy != slot.proxy:
            # "" switches libcurl's own reading of the environment off, too.
            easy.setopt(pycurl.PROXY, proxy)
            slot.proxy = proxy
        start = time.monotonic()
        t = _Transfer(request, guard, read, start + connect, slot)
        if express:
            # The lines are collected in C, and parsed once the body begins: no Python
            # call per header line. A 4xx or 5xx answer ends at its headers all the same
            # (libcurl's FAILONERROR): the steps get it at once, with its Retry-After.
            # Into the slot's list, emptied: the handle's callback stays what it was (a
            # transfer's lines are read only while it has the slot).
            lines = slot.lines
            lines.clear()
            t.lines = lines
            if not slot.express:
                easy.setopt(pycurl.HEADERFUNCTION, lines.append)
                easy.setopt(pycurl.FAILONERROR, 1)
                slot.express = True
        elif slot.express:
            easy.setopt(pycurl.HEADERFUNCTION, slot.on_header)
            easy.setopt(pycurl.FAILONERROR, 0)
            slot.express = False
        if host:
            t.host = host
            t.proxied = bool(proxy)
        slot.transfer = t
        return slot, t

    def _give_back(self, slot: _Slot) -> None:
        slot.transfer = None
        with self._lock:
            self._free.append(slot)

    def close(self) -> None:
        """Stop the loop thread and close every handle (and so every connection)."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._stopping = True
            thread = self._thread
        if thread is not None:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass
            if thread is threading.current_thread():
                self._releaser = thread
                # A finalizer run by the garbage collector on the loop thread itself: the
                # loop ends when this returns, and closes what it owns on its way out.
                return
            thread.join()
        self._release()

    def _release(self) -> None:
        """Close the handles, the multi, the selector and the wake-up pipe."""
        for t in list(self._direct):  # the loop failed, or ended from a finalizer
            self._drop_direct(t)
        for slot in self._slots:
            slot.easy.close()
        self._slots.clear()
        self._free.clear()
        if self._helpers is not None:
            # Their calls are short (a file created, an fsync) or end on the cancel:
            # waited for, so that no thread of this transport outlives its close().
            self._helpers.shutdown(wait=True)
        if self._callbacks is not None:
            self._callbacks.shutdown(wait=False)  # waited for by shutdown(wait=True)
        self._multi.close()
        self._poller.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- event mode: the loop thread drives the downloads' steps ---------------------------

    def runner(
        self,
        workers: int,
        hosts: HostLimits[Any] | None = None,
        pipeline: Pipeline | None = None,
    ) -> CurlTransport:
        """Drive downloads' steps on the loop thread, ``workers`` at once (the pool's runner).

        Only a step that must block (a lock another writer holds, an fsync) goes to a
        helper thread; waiting for the network, for a retry or for a host's turn holds
        no thread at all. ``hosts``: the per-host limits, if they are on. ``pipeline``:
        the one whose plain downloads :meth:`submit_express` may take, if any.
        """
        self._limit = workers
        self._hosts = hosts
        # The SSRF guard checks addresses on the transfer the express lane does not make.
        self._pipeline = pipeline if self.policy is None else None
        if self._pipeline is not None:
            self._express_cap = self._pipeline.express_cap
            self._express_seconds = self._pipeline.express_limit()
        return self

    @property
    def takes_express(self) -> bool:
        """Whether :meth:`submit_express` may be called."""
        return self._pipeline is not None

    def submit(self, start: Callable[[], Steps[T]], ticket: Ticket | None = None) -> Future[T]:
        """Queue the steps ``start()`` makes; the future gets what they end with.

        ``ticket``: the download's, with per-host limits (it then waits for its host).

        Raises:
            RuntimeError: the transport is closed.
        """
        future: Future[T] = _LoopFuture(self)
        self._push((future,), (start,), ticket)
        return future

    def submit_express(
        self, url: str, on_cancel: Callable[[str, Future[Any]], None]
    ) -> Future[Any]:
        """Queue a download of ``url`` (a string, no file name, no expectations, no stop of
        its own) to take the express lane (see :meth:`Pipeline.express
        <fetchpool.pipeline.Pipeline.express>`); the future gets its result.

        ``on_cancel(url, future)`` is called if the future is cancelled before it started.

        Raises:
            RuntimeError: the transport is closed.
        """
        return self.submit_express_many((url,), on_cancel)[0]

    def submit_express_many(
        self, urls: Sequence[str], on_cancel: Callable[[str, Future[Any]], None]
    ) -> list[Future[Any]]:
        """:meth:`submit_express` for each of ``urls``, queued in their order at once.

        One lock and one wake-up for them all: while the caller's thread queues them
        one by one, it keeps the GIL from the loop, which then starts the first of
        them only once all are queued.

        Raises:
            RuntimeError: the transport is closed.
        """
        futures: list[Future[Any]] = []
        for url in urls:
            future: _LoopFuture[Any] = _LoopFuture(self)
            future.url = url
            future.on_cancel = on_cancel
            futures.append(future)
        self._push(futures, urls, None)
        return futures

    def _push(
        self,
        futures: Sequence[Future[Any]],
        starts: Sequence[Callable[[], Steps[Any]] | str],
        ticket: Ticket | None,
    ) -> None:
        """Queue ``futures`` with what starts each, in their order (a ``ticket``: one's)."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("cannot submit to a closed transport")
            if ticket is not None and self._hosts is not None:
                ((future, start),) = zip(futures, starts, strict=True)
                self._hosts.push((future, start, ticket), ticket)
                # Cancelled by the caller while its host has no room, it is done now:
                # close() must not wait for the host to take it out of the queue.
                on_done(future, self._finished)
            else:
                self._queue.extend(zip(futures, starts, strict=True))
            self._unfinished.update(futures)
            self._start_thread()
            gone = self._gone
        if gone:
            self._abandon()
        self._wake()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Cancel the queued downloads (``cancel_futures``); wait for the rest (``wait``)."""
        if cancel_futures:
            with self._lock:
                queued = self._take_queued()
            for future, _ in queued:
                future.cancel()
                self._finished(future)
        if wait and threading.current_thread() is not self._thread:
            with self._lock:
                while self._unfinished:
                    self._all_done.wait()
        if wait and self._callbacks is not None:
            # As a thread pool's shutdown waits for the callbacks its workers run; not
            # from one of those callbacks (it would wait for itself). Only once every
            # download is done: the callbacks of those still running (close(cancel=True)
            # shuts down without waiting first) must not run on the loop thread.
            self._callbacks.shutdown(wait=not getattr(_in_callback, "active", False))

    def call_back(self, fn: list[Callable[[Future[Any]], object]], future: Future[Any]) -> None:
        """Run a caller's done-callbacks of ``future``, in order, off the loop thread."""
        with self._lock:
            if self._callbacks is None:
                self._callbacks = ThreadPoolExecutor(
                    self._limit, thread_name_prefix="fetchpool-callback"
                )
            callbacks = self._callbacks
        try:
            callbacks.submit(_call, fn, future)
        except RuntimeError:  # shut down (a callback added late, after close()): run it here
            _call(fn, future)

    def wake(self) -> None:
        """Look again at the downloads waiting to retry (the cancel event was set)."""
        with self._lock:
            self._rouse = True
        self._wake()

    def _finished(self, future: Future[Any], slot: _Slot | None = None) -> None:
        """Count ``future`` done; ``slot``: its handle, given back at the same time."""
        with self._lock:
            if slot is not None:
                self._free.append(slot)
            self._unfinished.discard(future)
            if not self._unfinished:
                self._all_done.notify_all()

    def _take_queued(self) -> list[tuple[Future[Any], Callable[[], Steps[Any]] | str]]:
        """Take every queued download out (with ``_lock`` held); none has started."""
        queued = list(self._queue)
        self._queue.clear()
        if self._hosts is not None:
            for future, start, ticket in self._hosts.drain():
                ticket.finish()
                queued.append((future, start))
        return queued

    def _has_room(self, extra: int = 0) -> bool:
        """Whether another download may start (loop thread).

        ``workers`` downloads at once, plus ``extra``, not counting those that wait with
        no transfer open (for a retry, for their host, for a lock another writer holds):
        a wait holds no place. At most :data:`~fetchpool.workers.IN_PROGRESS` times
        ``workers`` are under way in all.
        """
        runs = len(self._runs)
        room = self._limit + extra
        if runs < room:
            return True  # the usual case, and extra <= workers < the cap
        waiting = len(self._sleepers) + len(self._admits) + len(self._idle_runs)
        return runs - waiting < room and runs < IN_PROGRESS * self._limit

    def _has_queued(self) -> bool:
        """Whether a queued download may start now (cheap; may be wrong towards yes)."""
        return bool(self._queue) or (self._hosts is not None and self._hosts.has_ready())

    def _start_runs(self, extra: int = 0) -> bool:
        """Start queued downloads while there is room; return whether one started.

        ``extra``: downloads whose transfer is over and that only write their file now,
        not counted (their successors may send meanwhile).
        """
        started = False
        hosts = self._hosts
        # The usual case of _has_room first, without its call (once a file).
        while len(self._runs) < self._limit + extra or self._has_room(extra):
            ticket: Ticket | None = None
            with self._lock:
                if self._queue:
                    future, start = self._queue.popleft()
                elif hosts is not None and (item := hosts.pop()) is not None:
                    future, start, ticket = item
                else:
                    return started
            if not future.set_running_or_notify_cancel():
                if ticket is not None:
                    ticket.finish()
                self._finished(future)
                continue
            started = True
            if isinstance(start, str):
                self._start_express(future, start)
                continue
            run = _Run(start(), future)
            self._runs.add(run)
            self._step(run, None, None)
        return started

    def _step(self, run: _Run, value: Any, error: BaseException | None) -> None:
        """Resume ``run`` with ``value`` (or ``error``) and go on until it must wait."""
        steps = run.steps
        assert steps is not None
        while True:
            try:
                effect = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                self._run_done(run, stop.value, None)
                return
            except BaseException as exc:  # noqa: BLE001 - the steps' own failure: its future's
                self._run_done(run, None, exc)
                return
            value, error = None, None
            try:
                if isinstance(effect, Read):
                    got = self._answer(effect.reply._t)  # type: ignore[attr-defined]
                    if got is None:
                        run.parked = effect.reply._t  # type: ignore[attr-defined]
                        return
                    value, error = got
                elif isinstance(effect, Send):
                    if run.replay is not None and self._replay(run, effect):
                        return
                    if len(self._running) >= self._limit:
                        # As many transfers as workers are in flight (the runs that
                        # are writing files let a successor start): wait for room.
                        run.parked = effect
                        self._sends.append(run)
                        return
                    self._send(run, effect)
                    return
                elif isinstance(effect, Splice):
                    got = self._sink(effect)
                    if got is None:
                        run.parked = effect.reply._t  # type: ignore[attr-defined]
                        return
                    value, error = got
                elif isinstance(effect, Admit):
                    delay = effect.ticket.admit(effect.key)
                    if delay:
                        self._park_admit(run, effect, delay)
                        return
                elif isinstance(effect, Sleep):
                    if CLOCK.record is not None:  # instant_retries(): nothing to wait for
                        perform(effect, self)
                        continue
                    when = time.monotonic() + effect.seconds
                    heapq.heappush(self._sleepers, (when, next(self._seq), run, effect.cancel))
                    run.parked = None
                    return
                else:
                    self._block(run, effect.call, effect.idle)
                    return
            except Exception as exc:  # noqa: BLE001 - thrown into the steps, which decide
                error = exc

    def _park_admit(self, run: _Run, effect: Admit, delay: float) -> None:
        """Park ``run`` until its host may take its request (``delay`` seconds, or
        ``inf``: until a slot frees)."""
        run.parked = effect
        if effect.cancel.is_set():
            self._step(run, None, Cancelled())
        elif delay == math.inf:
            self._admits.append(run)
        else:
            when = time.monotonic() + delay
            heapq.heappush(self._sleepers, (when, next(self._seq), run, effect.cancel))

    def _readmit(self, run: _Run) -> None:
        """Ask again for the turn ``run`` waits for; go on with it if it is given."""
        effect = run.parked
        assert isinstance(effect, Admit)
        delay = 0.0 if effect.cancel.is_set() else effect.ticket.admit(effect.key)
        if delay:
            self._park_admit(run, effect, delay)
            return
        run.parked = None
        self._step(run, None, Cancelled() if effect.cancel.is_set() else None)

    def _resume_admits(self) -> None:
        """Ask again for the runs waiting for a slot, once the limits have changed."""
        hosts = self._hosts
        if hosts is None or not self._admits or hosts.version == self._admits_seen:
            return
        self._admits_seen = hosts.version
        waiting, self._admits = self._admits, []
        for run in waiting:
            self._readmit(run)

    def _send(self, run: _Run, effect: Send) -> None:
        """Hand ``run``'s request to libcurl (there is room for it).

        Raises:
            FetchError: from :meth:`_prepare` (the guard fired, the URL is refused...).
        """
        slot, t = self._prepare(effect.request, effect.guard)
        t.run = run
        run.parked = t
        effect.guard.on_fire(partial(self.post, "abort", slot, t))
        self._add(slot, t)

    def _resume_sends(self) -> bool:
        """Send the requests that waited for room, while there is room; return whether
        one went to libcurl."""
        sends = self._sends
        sent = False
        while sends and len(self._running) < self._limit:
            run = sends.popleft()
            effect = run.parked
            run.parked = None
            if isinstance(effect, Request):  # an express download's
                self._send_express(run, effect)
                sent = True
                continue
            assert isinstance(effect, Send)
            try:
                self._send(run, effect)
            except Exception as exc:  # noqa: BLE001 - thrown into the steps, which decide
                self._step(run, None, exc)
            else:
                sent = True
        return sent

    # -- the express lane: plain downloads without the steps (loop thread) ----------------

    def _express_steps(self, url: str) -> Steps[Any]:
        """The steps of an express download taken out of the queue unstarted."""
        assert self._pipeline is not None
        return self._pipeline.steps_of(url, None)

    def _start_express(self, future: Future[Any], url: str) -> None:
        """Start the download of ``url`` in the express lane, or through the steps where
        it cannot take it (see :meth:`Pipeline.express <fetchpool.pipeline.Pipeline.express>`)."""
        pipeline = self._pipeline
        assert pipeline is not None
        try:
            got = pipeline.express(url)
        except Exception as exc:  # noqa: BLE001 - a bug: the future's, as _step makes it
            self._conclude(future, None, exc)
            return
        if not isinstance(got, tuple):  # refused: its result
            self._conclude(future, got, None)
            return
        task, lock = got
        run = _Run(None, future)
        run.task = task
        run.lock = lock
        self._runs.add(run)
        if lock is None:
            self._convert(run, None)
            return
        request = pipeline.express_request(task)
        if len(self._running) >= self._limit:
            run.parked = request  # room comes with the next transfer's end
            self._sends.append(run)
            return
        self._send_express(run, request)

    def _send_express(self, run: _Run, request: Request) -> None:
        """Hand an express download's request to libcurl (there is room for it)."""
        task = run.task
        if task.cancel.is_set():
            self._convert(run, None)  # the steps end it as cancelled
            return
        try:
            slot, t = self._prepare(request, None, express=True)
        except Exception:  # noqa: BLE001 - the steps meet it again in their request, and say so
            self._convert(run, None)
            return
        t.express = run
        run.parked = t
        run.seen = 0
        run.length = _UNSET
        assert task.began is not None
        run.deadline = task.began[0] + self._express_seconds
        self.idle_check_by(run.deadline)
        self._add(slot, t)

    def express_write(self, t: _Transfer, data: bytes) -> int | None:
        """Keep a block of an express transfer's body (in libcurl's write callback).

        At the first block the headers are all in: a non-2xx answer ends there (only a
        2xx body is ever read, DESIGN rule 7), and a body that is no plain one, or grows
        past the express lane's cap, goes on as a transfer of the steps.
        """
        if not t.ready:
            t.parse_lines()
            run = t.express
            assert run is not None
            if not 200 <= t.status < 300:
                run.length = NOT_PLAIN
                return 0
            pipeline = self._pipeline
            assert pipeline is not None
            run.length = pipeline.express_length(t.status, t.headers, t.request.shown)
            if run.length == NOT_PLAIN:
                return self._promote(t, data)
        size = t.buffered + len(data)
        if size > self._express_cap:
            return self._promote(t, data)
        t.chunks.append(data)
        t.buffered = size
        return None

    def _promote(self, t: _Transfer, data: bytes) -> int | None:
        """Make the express transfer ``t`` one of the steps', live: its steps take it
        once this turn of libcurl is over (see :meth:`_settle_express`)."""
        run = t.express
        assert run is not None
        t.express = None
        self._due.append(run)
        with t.lock:
            return _Slot._buffer(t, data)

    def express_due(self, run: _Run) -> None:
        """The express transfer of ``run`` ended: settle it after this turn (loop thread)."""
        self._due.append(run)

    def _settle_express(self) -> None:
        """Write the express downloads whose transfer ended well; hand the others on.

        As for the steps' downloads, the next requests go out first (see
        :meth:`_send_successors`).
        """
        due, self._due = self._due, []
        pipeline = self._pipeline
        assert pipeline is not None
        if self._sends or self._has_queued():
            self._start_successors(sum(cast(_Transfer, run.parked).done for run in due))
        for run in due:
            t = run.parked
            assert isinstance(t, _Transfer)
            result = None
            if t.express is not None:  # ended in the express lane (not promoted)
                t.express = None
                if not t.code:
                    if run.length == _UNSET:  # no body came: its headers were not looked at
                        run.length = pipeline.express_length(t.status, t.headers, t.request.shown)
                    chunks = t.chunks
                    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    assert run.lock is not None
                    try:
                        if run.length != NOT_PLAIN:
                            result = pipeline.finish_express(
                                run.task, run.lock, t.headers, run.length, body
                            )
                    except Exception:  # the steps meet it again, and make it the URL's error
                        log.debug(
                            "express lane: finishing %s failed", t.request.shown, exc_info=True
                        )
            if result is None:
                self._convert(run, t)
                continue
            run.lock = None
            slot = t.slot
            slot.transfer = None
            self._runs.discard(run)
            # _conclude, with the slot given back under the same lock.
            future = run.future
            _complete(future, result, None)
            self._finished(future, slot)
            if time.monotonic() - self._turn_began >= _START_EARLY_AFTER:
                self._start_early()

    def _hand_on(self, run: _Run, t: _Transfer | None) -> None:
        """Give an express download its steps, ``t`` (if any) to answer their first
        request with; they go on under its lock (no other writer comes in between)."""
        lock = run.lock
        run.lock = None
        # Not if finishing it released the lock already (and then failed): the steps
        # take it again.
        run.task.held = lock if lock is not None and lock.held else None
        assert self._pipeline is not None
        run.steps = self._pipeline.steps(run.task)
        run.replay = t
        run.parked = None

    def _convert(self, run: _Run, t: _Transfer | None) -> None:
        """Go on with an express download through its steps (see :meth:`_hand_on`)."""
        self._hand_on(run, t)
        self._step(run, None, None)

    def _replay(self, run: _Run, effect: Send) -> bool:
        """Answer the first request of a download handed on from the express lane with
        its express transfer; ``False`` if the request is another one (a ``Range``...),
        which then goes out as usual (the express transfer is closed)."""
        t = run.replay
        assert t is not None
        run.replay = None
        request = effect.request
        if request.url != t.request.url or request.headers != t.request.headers:
            self.post("close", t.slot, t)
            return False
        t.request = request
        # Its deadline counts from the express request (Task.began): if that ended the
        # transfer, the guard has fired already, and the error names the deadline.
        t.guard = effect.guard
        t.run = run
        run.parked = t
        if not t.done:
            effect.guard.on_fire(partial(self.post, "abort", t.slot, t))
        got = self._answer(t)
        if got is not None:
            run.parked = None
            self._step(run, *got)
        return True

    def _stop_express(self) -> None:
        """End the express transfers of downloads cancelled (their steps say so)."""
        for slot in list(self._running.values()):
            t = slot.transfer
            if t is not None and t.express is not None and t.express.task.cancel.is_set():
                self._remove(slot, (pycurl.E_ABORTED_BY_CALLBACK, "stopped"), "timeout")

    def _sink(self, effect: Splice) -> tuple[Any, BaseException | None] | None:
        """Start writing a big body into its file as it arrives (sink mode).

        What is buffered goes first. Then libcurl writes the rest itself where the sink
        gives a descriptor (:meth:`_go_direct`); else the write callback gathers the
        blocks in the slot's spool and writes a quarter MiB at a time.
        """
        t: _Transfer = effect.reply._t  # type: ignore[attr-defined]
        flushed, resume = t.start_sink(effect.sink)
        if resume:
            self.post("resume", t.slot, t)  # run after this step: direct by then
        t.moved = effect.moved
        t.owed_bytes = effect.length
        t.sunk += flushed  # the loop's own thread: no write can race it
        left = effect.length - flushed
        if left > 0 and not t.done and id(t.slot.easy) in self._running:
            try:
                self._go_direct(t, effect.sink, left)
            except Exception as exc:  # noqa: BLE001 - StorageError above all: the steps'
                t.moved = None
                t.stop_sink()
                return None, exc
        return self._sinking(t)

    def _go_direct(self, t: _Transfer, sink: SpliceSink, length: int) -> None:
        """Have libcurl write the next ``length`` bytes of ``t``'s body into ``sink`` itself.

        Its write callback becomes the ``write`` of a buffered writer on a descriptor of
        the file: C, with no Python frame per 16 KiB block (65,536 calls a GiB, most of
        what a big body cost), and a write(2) per MiB. Such a callback must not raise
        (pycurl would print the traceback): the sink allocated the space first, so a full
        disk is raised here. Set on the loop thread, outside the handle's callbacks
        (pycurl refuses it inside); undone by :meth:`_end_direct` once libcurl let go of
        the handle.

        Raises:
            StorageError: from the sink (no room for the body).
        """
        fd = sink.direct(length)
        if fd is None:
            return  # the sink must see the bytes: the write callback writes them
        try:
            # Owns the descriptor from here: closing it closes that.
            writer = open(fd, "wb", buffering=_DIRECT_BUFFER)  # noqa: SIM115 - see _end_direct
        except BaseException:
            os.close(fd)
            raise
        easy = t.slot.easy
        try:
            t.direct_base = writer.tell()
            total = easy.getinfo(pycurl.CONTENT_LENGTH_DOWNLOAD_T)
            if total > 0:
                # libcurl passes no byte past Content-Length over HTTP/1.1, nor nghttp2
                # over HTTP/2; should one come, it must not grow the file beyond the
                # space allocated: libcurl then ends the transfer (FILESIZE_EXCEEDED).
                easy.setopt(pycurl.MAXFILESIZE_LARGE, total)
            # It returns the block's length: what pycurl tells libcurl was consumed.
            easy.setopt(pycurl.WRITEFUNCTION, writer.write)
        except BaseException:
            try:
                easy.setopt(pycurl.MAXFILESIZE_LARGE, 0)
            finally:
                writer.close()
            raise
        t.direct = writer
        t.direct_counted = 0
        self._direct.append(t)

    def _end_direct(self, t: _Transfer) -> None:
        """Write out and count what libcurl gave ``t``'s writer, give the handle its write
        callback back, and close the writer (loop thread), if ``t`` was written directly.

        Called once libcurl let go of the handle (or will run no more), before anything
        can reuse or close it.
        """
        writer = t.direct
        if writer is None:
            return
        try:
            try:
                writer.flush()
            except OSError as exc:
                self._write_failed(t, exc)
            self._count_sunk(t)
        finally:
            t.direct = None
            self._direct.remove(t)
            try:
                easy = t.slot.easy
                easy.setopt(pycurl.WRITEFUNCTION, t.slot.on_write)
                easy.setopt(pycurl.MAXFILESIZE_LARGE, 0)
            finally:
                try:
                    writer.close()  # the descriptor closed, even where the flush fails
                except OSError as exc:
                    self._write_failed(t, exc)

    @staticmethod
    def _write_failed(t: _Transfer, exc: OSError) -> None:
        """Make ``exc``, from writing out or closing a direct sink, ``t``'s storage error.

        The writer's last MiB is written when the body ended, and a network file system
        may report a failed write only at close: the file is not whole, and that download
        must fail (not the loop).
        """
        if t.sink_error is None:
            shown = t.request.shown
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            t.sink_error = StorageError(
                f"cannot write the body of {shown} to its file: {reason}",
                url=shown,
                errno=exc.errno,
            )

    @staticmethod
    def _count_sunk(t: _Transfer) -> int:
        """How many bytes of ``t``'s body reached its file, or its writer (loop thread).

        Those the loop wrote, and those libcurl gave the direct sink's writer: its
        position tells (nothing else writes the file meanwhile), and the sink is told
        of them.
        """
        writer = t.direct
        if writer is not None:
            written = writer.tell() - t.direct_base
            fresh = written - t.direct_counted
            if fresh:
                t.direct_counted = written
                t.sunk += fresh
                sink = t.sink
                if sink is not None:
                    sink.wrote(fresh)
        return t.sunk

    @staticmethod
    def _tell(t: _Transfer, sunk: int) -> None:
        """Count ``t``'s bytes in its file up to ``sunk`` (``t.moved``), a MiB at a time.

        libcurl writes a fast link's bytes in runs of several MiB per turn of the loop (a
        few milliseconds): told as one count they would make one progress event, and the
        events would come in lumps, as they did before the counting moved into the write
        callback. Told a MiB at a time, they make one event per MiB of the body, each
        turn's events a few milliseconds after the last turn's.
        """
        moved = t.moved
        assert moved is not None
        due, t.reported = sunk - t.reported, sunk
        while due > _SINK_REPORT:
            moved(_SINK_REPORT)
            due -= _SINK_REPORT
        if due:
            moved(due)

    def _report_direct(self) -> None:
        """Count what libcurl wrote into the files of direct sinks since the last turn.

        Where the write callback counted (and marked the transfer active) with every
        block, this does once a turn of the loop.
        """
        for t in list(self._direct):
            if t.done:
                continue  # _sinking counts the rest
            before = t.direct_counted
            sunk = self._count_sunk(t)
            if t.direct_counted == before:
                continue
            t.active = time.monotonic()  # bytes came: not idle
            if sunk - t.reported < _SINK_REPORT:
                continue
            try:
                self._tell(t, sunk)
            except Exception as exc:  # noqa: BLE001 - the steps raise it, once it ended
                t.sink_error = exc
                if id(t.slot.easy) in self._running:
                    self._remove(t.slot, (pycurl.E_WRITE_ERROR, "stopped"), None)

    def _sinking(self, t: _Transfer) -> tuple[Any, BaseException | None] | None:
        """Count what reached ``t``'s file; once it ended, what its splice returns."""
        try:
            sunk = self._count_sunk(t)
            with t.lock:
                done = t.done
                if done:
                    t.sink = None
            if sunk > t.reported:
                self._tell(t, sunk)
            if not done:
                return None
            t.moved = None
            if t.sink_error is not None:
                raise t.sink_error
            if t.code == pycurl.E_FILESIZE_EXCEEDED or sunk > t.owed_bytes:
                # As the chunk path says it (rule 7: malformed framing is no success).
                shown = t.request.shown
                raise TransferError(
                    f"{shown} sent more than its Content-Length", url=shown, retryable=False
                )
            if t.code:
                t.fail("while reading")
            if sunk < t.owed_bytes:
                raise BodyEnded
        except Exception as exc:  # noqa: BLE001 - thrown into the steps
            t.moved = None
            t.stop_sink()
            return None, exc
        return True, None

    def _answer(self, t: _Transfer) -> tuple[Any, BaseException | None] | None:
        """What a step waiting on ``t`` resumes with, or ``None`` if it must wait on."""
        if t.moved is not None:
            return self._sinking(t)
        if not t.replied:
            if t.ready:
                t.replied = True
                return CurlReply(self, t.slot, t), None
            if not t.done:
                return None
            self.post("close", t.slot, t)
            try:
                if t.code:
                    t.fail("requesting")  # never BodyEnded: the headers are not in
                raise attempt_error(
                    "connection", t.request.shown, "requesting", "no response", t.guard
                )
            except FetchError as exc:
                return None, exc
        data, resume = t.take(_JOIN)
        if resume:
            self.post("resume", t.slot, t)
        if data is None:
            return None
        if not data and t.code:
            try:
                t.fail("while reading")
            except (FetchError, BodyEnded) as exc:
                return None, exc
        return data, None

    def _run_done(self, run: _Run, value: Any, error: BaseException | None) -> None:
        self._runs.discard(run)
        replay = run.replay
        if replay is not None:
            # Handed on from the express lane, the steps ended before their first
            # request (cancelled, or a file found there meanwhile): the transfer goes.
            run.replay = None
            self.post("close", replay.slot, replay)
        self._conclude(run.future, value, error)

    def _conclude(self, future: Future[Any], value: Any, error: BaseException | None) -> None:
        """Complete ``future``, and count it finished whatever its callbacks do."""
        try:
            _complete(future, value, error)
        finally:
            self._finished(future)

    def _block(self, run: _Run, call: Callable[[], Any], idle: bool = False) -> None:
        if self._helpers is None:
            # A thread for every run there may be (see _has_room): a run whose call waits
            # for a lock another run holds must never leave that run without a thread for
            # its own call. Threads are made as calls need them.
            self._helpers = ThreadPoolExecutor(
                IN_PROGRESS * self._limit, thread_name_prefix="fetchpool-wait"
            )
        if idle:
            self._idle_runs.add(run)
        future = self._helpers.submit(call)
        run.parked = future
        future.add_done_callback(partial(self._unblocked, run))

    def _unblocked(self, run: _Run, future: Future[Any]) -> None:
        with self._lock:
            gone = self._gone
            if not gone:
                self._blocked.append((run, future))
        if gone:
            self._fall_back(run, *_outcome(future))
        else:
            self._wake()

    def _resume_blocked(self) -> None:
        while True:
            with self._lock:
                if not self._blocked:
                    return
                run, future = self._blocked.popleft()
            run.parked = None
            self._idle_runs.discard(run)
            self._step(run, *_outcome(future))

    def _wake_sleepers(self, now: float) -> None:
        with self._lock:
            rouse, self._rouse = self._rouse, False
        if rouse:
            self._stop_express()
        if rouse and self._sleepers:
            woken = [e for e in self._sleepers if e[3].is_set()]
            self._sleepers = [e for e in self._sleepers if not e[3].is_set()]
            heapq.heapify(self._sleepers)
            for _, _, run, _ in woken:
                self._wake_sleeper(run)
        while self._sleepers and self._sleepers[0][0] <= now:
            run = heapq.heappop(self._sleepers)[2]
            self._wake_sleeper(run)

    def _wake_sleeper(self, run: _Run) -> None:
        if isinstance(run.parked, Admit):
            self._readmit(run)
        else:
            self._step(run, None, None)

    def _abandon(self) -> None:
        """Finish, each on a thread of its own, the downloads the loop will drive no more.

        The loop failed or stopped: every download still gets its result, its steps run
        by the blocking driver (whose requests fail at once: the transport is done).
        """
        with self._lock:
            self._gone = True
            blocked = list(self._blocked)
            self._blocked.clear()
            queued = self._take_queued()
        for run, future in blocked:
            self._fall_back(run, *_outcome(future))
        runs, self._runs = self._runs, set()
        self._sleepers.clear()
        self._sends.clear()
        self._admits.clear()
        self._due.clear()
        for run in runs:
            if run.steps is None:
                # In the express lane: on through the steps, whose request fails at once.
                self._hand_on(run, None)
                self._fall_back(run, None, None)
                continue
            parked = run.parked
            if isinstance(parked, _Transfer):
                got = self._answer(parked)
                if got is None:
                    # Every transfer is ended before this, so its answer is ready; were
                    # one not, the step must fail: a read given nothing would end the
                    # body where it stands.
                    during = "while reading" if parked.replied else "requesting"
                    error = attempt_error(
                        "connection", parked.request.shown, during, "the loop stopped", None
                    )
                    got = (None, error)
                self._fall_back(run, *got)
            elif isinstance(parked, Send):
                error = attempt_error(
                    "connection", parked.request.shown, "requesting", "the loop stopped", None
                )
                self._fall_back(run, None, error)
            elif parked is None or isinstance(parked, Admit):
                # Resumed as admitted: its request then fails at once (the loop is gone).
                self._fall_back(run, None, None)
            # A run in a blocking call falls back when the call returns (_unblocked).
        for future, start in queued:
            if future.set_running_or_notify_cancel():
                steps = self._express_steps(start) if isinstance(start, str) else start()
                self._fall_back(_Run(steps, future), None, None)
            else:
                self._finished(future)

    def _fall_back(self, run: _Run, value: Any, error: BaseException | None) -> None:
        # At most _limit threads drain the fall-backs, however many downloads were
        # queued: one thread each could be thousands at once, and a thread that cannot
        # start must not strand its future.
        with self._lock:
            self._falling.append((run, value, error))
            spawn = self._fallers < self._limit
            self._fallers += spawn
        if not spawn:
            return
        try:
            threading.Thread(
                target=self._drain_falling, name="fetchpool-curl-fallback", daemon=True
            ).start()
        except BaseException:  # noqa: BLE001 - no thread (RuntimeError, MemoryError)
            with self._lock:
                self._fallers -= 1
                orphaned = not self._fallers
            if orphaned:
                self._drain_falling(spawned=False)  # nobody else will: end them here
            else:
                log.debug("curl loop: no thread for a fall-back; the others drain it")

    def _drain_falling(self, spawned: bool = True) -> None:
        while True:
            with self._lock:
                if not self._falling:
                    self._fallers -= spawned
                    return
                run, value, error = self._falling.popleft()
            assert run.steps is not None  # the express lane's are handed on before
            if spawned:
                try:
                    result = run_steps(run.steps, self, value, error)
                except BaseException as exc:  # noqa: BLE001 - the future's to report
                    outcome: tuple[Any, BaseException | None] = (None, exc)
                else:
                    outcome = (result, None)
            else:
                run.steps.close()  # its claims, lock and temporary file go
                task = getattr(run, "task", None)
                if task is not None and self._pipeline is not None:
                    # Handed on from the express lane, never started: close() ran none
                    # of the steps' cleanup.
                    self._pipeline.abandon(task)
                outcome = (None, RuntimeError("no thread to finish the download on"))
            self._conclude(run.future, *outcome)

    # -- loop thread ---------------------------------------------------------------------

    def _on_socket(self, what: int, fd: int, multi: object, data: object) -> None:
        if what == pycurl.POLL_REMOVE:
            if fd in self._watched:
                self._idle_sockets.add(fd)
            return
        events = (_IN if what & pycurl.POLL_IN else 0) | (_OUT if what & pycurl.POLL_OUT else 0)
        self._idle_sockets.discard(fd)
        # An exception here would escape socket_action() and end the loop: a socket the
        # poller will not take is forgotten instead, and its transfer times out.
        try:
            known = self._watched.get(fd)
            if known == events and self._same_socket(fd):
                return
            if known is not None:
                self._poller.modify(fd, events)
            else:
                self._register(fd, events)
            self._watched[fd] = events
        except OSError:
            # A number the kernel reused (its old socket closed, and so unwatched by
            # the kernel) behind our back: start afresh.
            self._forget(fd)
            try:
                self._register(fd, events)
                self._watched[fd] = events
            except OSError:
                log.debug("curl loop: cannot watch socket %d", fd, exc_info=True)

    def _register(self, fd: int, events: int) -> None:
        self._poller.register(fd, events)
        self._sockets[fd] = os.fstat(fd).st_ino

    def _same_socket(self, fd: int) -> bool:
        # libcurl may close a socket it let go of (or, with a full connection cache,
        # one it never let go of) and open another under the same number, which the
        # kernel then watches for nobody: asking for the events we hold is no proof
        # that the socket is the one we watch. Its inode is.
        try:
            same = os.fstat(fd).st_ino == self._sockets.get(fd)
        except OSError:
            same = False
        if not same:
            log.debug("curl loop: socket %d is a new one under an old number", fd)
        return same

    def _forget(self, fd: int) -> None:
        self._watched.pop(fd, None)
        self._sockets.pop(fd, None)
        self._idle_sockets.discard(fd)
        try:
            self._poller.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def _on_timer(self, timeout_ms: int) -> None:
        self._timer = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000

    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        try:
            self._loop()
            if threading.current_thread() is self._thread and self._closed:
                with self._lock:
                    # close() was called from this very thread (a finalizer) and did not
                    # wait for it: the loop closes what it owned itself.
                    orphaned = self._releaser is threading.current_thread()
                if orphaned:
                    self._release()
        except BaseException as exc:
            log.exception("the curl loop failed")
            self._failed = exc
            for slot in list(self._running.values()):
                if slot.transfer is not None:
                    self._drop_direct(slot.transfer)
                    slot.transfer.finish(-1, f"internal error: {exc!r}", "connection")
            with self._lock:
                stranded = [t for _, _, t in self._commands]
            for t in stranded:
                t.finish(-1, f"internal error: {exc!r}", "connection")
            self._abandon()
            raise
        finally:
            self._loop_ident = None  # a thread started later may get the same number

    def owe_wake(self, t: _Transfer) -> None:
        """Wake ``t``'s worker at the end of this turn of the loop (loop thread)."""
        t.owed = True
        self._owed.append(t)

    def _pay_wakes(self) -> None:
        # Resuming a download may owe more wake-ups (another transfer's end, say).
        while self._owed or self._due:
            if self._due:
                self._settle_express()
                continue
            owed, self._owed = self._owed, []
            if self._sends or self._has_queued():
                self._send_successors(owed)
            for t in owed:
                t.owed = False
                run = t.run
                if run is None:
                    with t.lock:
                        t.cond.notify_all()
                elif run.parked is t:
                    got = self._answer(t)
                    if got is not None:
                        run.parked = None
                        self._step(run, *got)
                        if run not in self._runs:
                            self._start_early()

    def _send_successors(self, owed: list[_Transfer]) -> None:
        """Send the next requests before the downloads whose transfer ended write files.

        When many transfers end in one turn (a latency-bound batch), writing each file
        before starting the next download would delay the last successor by the whole
        batch's writes, every round: their requests go out first, and the writes happen
        while the server takes its time.
        """
        ended = 0
        for t in owed:
            run = t.run
            ended += t.done and run is not None and run.parked is t
        self._start_successors(ended)

    def _start_successors(self, ended: int) -> None:
        """Start what may follow ``ended`` downloads whose transfer is over, and send."""
        if not ended:
            return
        # Those that waited for room first (the ended transfers made it), then new ones.
        sent = self._resume_sends()
        if self._start_runs(extra=ended) or sent:
            self._push_requests()

    def _push_requests(self) -> None:
        """Have libcurl send the requests just added now, not at its next turn."""
        self._multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        self._collect()

    def _start_early(self) -> None:
        # A download ended in a turn that has gone on for a while: start the next one
        # and send its request now, rather than once every transfer that ended in this
        # turn has been written. When many end at once (a latency-bound batch), the last
        # would otherwise wait for them all. Not sooner: each early start is a pass of
        # libcurl's, and starting in batches is cheaper when small files end in crowds.
        now = time.monotonic()
        if now - self._turn_began >= _START_EARLY_AFTER and self._start_runs():
            self._turn_began = now
            self._push_requests()

    def idle_check_by(self, when: float) -> None:
        """Have the loop look for idle transfers no later than ``when`` (loop thread)."""
        self._idle_check = min(self._idle_check, when)

    def _loop(self) -> None:
        while True:
            self._do_commands()
            self._resume_blocked()
            self._resume_admits()
            self._resume_sends()
            self._start_runs()
            self._pay_wakes()
            if self._stopping:
                for slot in list(self._running.values()):
                    self._remove(slot, (pycurl.E_ABORTED_BY_CALLBACK, "closed"), None)
                self._abandon()
                return
            now = time.monotonic()
            if self._timer is not None and self._timer <= now:
                self._timer = None
                self._multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
                self._collect()
                self._pay_wakes()
            if now >= self._idle_check:
                # Take in what is there first: a slow write into a file (a sink) holds the
                # whole loop, and the other transfers' bytes are waiting, not missing. Judged
                # as of before that pass, so that a write stalling inside it times out no
                # transfer whose bytes it was about to read.
                self._turn(0.0)
                self._idle_check = self._check_idle(now)
            self._wake_sleepers(now)
            wait = self._idle_check - now
            if self._timer is not None:
                wait = min(wait, self._timer - now)
            if self._sleepers:
                wait = min(wait, self._sleepers[0][0] - now)
            hosts = self._hosts
            if hosts is not None:
                wait = min(wait, hosts.next_check() - now)
                if self._admits and hosts.version != self._admits_seen:
                    wait = 0.0
            if (
                self._commands
                or self._due
                or self._blocked
                or (self._has_room() and self._has_queued())
                or (self._sends and len(self._running) < self._limit)
            ):
                wait = 0.0  # posted from this thread (no wake-up written), or runnable now
            self._turn(max(0.0, wait))

    def _turn(self, wait: float) -> None:
        """Wait up to ``wait`` seconds for sockets, and let libcurl act on them."""
        events = self._poller.poll(wait)
        self._turn_began = time.monotonic()
        for fd, mask in events:
            if fd == self._wake_r:
                self._drain_wake()
                continue
            if fd in self._idle_sockets:
                # No transfer wants it (the server closing a kept-alive connection,
                # say): stop watching it, and libcurl finds out when it next uses it.
                self._forget(fd)
                continue
            flags = 0
            if mask & _IN:
                flags |= pycurl.CSELECT_IN
            if mask & _OUT:
                flags |= pycurl.CSELECT_OUT
            if mask & _ERR:
                flags |= pycurl.CSELECT_ERR
            self._multi.socket_action(fd, flags)
        self._collect()
        if self._direct:
            self._report_direct()
        self._pay_wakes()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        # Only now: a post between the read and this sees no wake owed, and its command
        # is run all the same, at the top of the loop, before the next wait.
        with self._lock:
            self._woken = False

    def _do_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                what, slot, t = self._commands.popleft()
            if slot.transfer is not t:
                continue  # about a transfer that is over: the handle has moved on
            running = id(slot.easy) in self._running
            if what == "add":
                self._add(slot, t)
            elif what == "resume":
                with t.lock:
                    t.paused = t.resuming = False
                if running and not t.closed:
                    # Held back by us until now, not idle: the read timeout starts again.
                    t.active = time.monotonic()
                    try:
                        slot.easy.pause(pycurl.PAUSE_CONT)
                    except pycurl.error as exc:
                        # Delivering what was held back failed (its callback refused it,
                        # the connection broke): that transfer ends, not the loop.
                        self._remove(slot, _code_of(exc), None)
            elif what == "abort":
                if running:
                    self._remove(slot, (pycurl.E_ABORTED_BY_CALLBACK, "stopped"), "timeout")
            elif what == "close":
                if running:
                    self._remove(slot, (pycurl.E_ABORTED_BY_CALLBACK, "closed"), "connection")
                self._give_back(slot)

    def _add(self, slot: _Slot, t: _Transfer) -> None:
        if t.guard is not None and t.guard.fired:
            # Cancelled or past its deadline before it could start.
            t.finish(pycurl.E_ABORTED_BY_CALLBACK, "stopped", "timeout")
        elif not t.done and not t.closed:
            try:
                self._multi.add_handle(slot.easy)
            except pycurl.error as exc:
                t.finish(*_code_of(exc), "connection")
            else:
                self._running[id(slot.easy)] = slot

    def _remove(self, slot: _Slot, result: tuple[int, str], failure: Failure | None) -> None:
        del self._running[id(slot.easy)]
        try:
            self._multi.remove_handle(slot.easy)
        except pycurl.error:
            log.debug("curl loop: removing a handle failed", exc_info=True)
        t = slot.transfer
        if t is not None:
            self._end_direct(t)
            if not t.done:
                t.finish(result[0], result[1], failure)

    def _collect(self) -> None:
        while True:
            queued, ok, failed = self._multi.info_read()
            for easy in ok:
                self._done(easy, 0, "")
            for easy, code, message in failed:
                self._done(easy, code, message)
            if not queued:
                return

    def _done(self, easy: pycurl.Curl, code: int, message: str) -> None:
        slot = self._running.pop(id(easy), None)
        if slot is None:  # pragma: no cover - libcurl reports only handles it was given
            return
        try:
            self._multi.remove_handle(easy)
        except pycurl.error:
            log.debug("curl loop: removing a finished handle failed", exc_info=True)
        t = slot.transfer
        if t is not None:
            t.take_head()
            run = t.express
            if run is not None and not code:
                # An express transfer that ended well (most of them): what finish() does,
                # less what it cannot need (no sink, no waiter: the loop alone has it).
                t.done = True
                self._due.append(run)
                return
        if t is not None and code in _ENDED_AT_HEADERS and t.ready and not 200 <= t.status < 300:
            # Our own header callback (or libcurl's FAILONERROR, in the express lane)
            # ended a non-2xx answer: the headers are all in.
            code, message = 0, ""
        failure: Failure | None = None
        if code == _E_WEIRD_SERVER_REPLY and easy.getinfo(pycurl.NUM_CONNECTS) == 0:
            # Garbage where a status line belongs, on a connection kept from an earlier
            # answer (one that sent more than its Content-Length): the connection is bad,
            # not the server's answer, and a fresh connection heals it, as it does where
            # urllib3 drops such a connection before reuse.
            failure = "connection"
        elif code and t is not None and t.refused is not None and not t.reached:
            failure = "blocked"  # every address was refused: nothing was sent
        if t is not None:
            self._end_direct(t)
            t.finish(code, message, failure)

    def _drop_direct(self, t: _Transfer) -> None:
        """:meth:`_end_direct` where the loop failed: the descriptor is closed whatever."""
        try:
            self._end_direct(t)
        except Exception:  # closed all the same: logged, not raised
            log.debug("curl loop: ending a direct sink failed", exc_info=True)

    def _check_idle(self, now: float) -> float:
        """End transfers that saw no byte for their read timeout; return the next check."""
        nearest = now + 1.0
        for slot in list(self._running.values()):
            t = slot.transfer
            if t is None or t.paused:
                continue
            run = t.express
            if run is not None:
                # An express transfer has no guard: its deadline is watched here.
                if run.deadline <= now:
                    self._remove(slot, (pycurl.E_OPERATION_TIMEDOUT, "deadline"), "timeout")
                    continue
                nearest = min(nearest, run.deadline)
                lines = len(t.lines)
                if lines != run.seen:
                    # Header lines came since the last look (collected in C, they do not
                    # stamp the transfer as they come): not idle.
                    run.seen = lines
                    t.active = now
            limit = t.active + t.read_timeout
            if limit <= now:
                self._remove(
                    slot,
                    (pycurl.E_OPERATION_TIMEDOUT, f"no data for {t.read_timeout:g} s"),
                    "timeout",
                )
            else:
                nearest = min(nearest, limit)
        return nearest
