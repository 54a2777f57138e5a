"""One HTTP attempt: redirects, status, framing, limits and the streamed body.

Redirects are followed here, by hand, because ``requests`` reads the body of every
3xx response into memory (DESIGN rule 6), even with ``allow_redirects=False`` when it
fills ``Response.next``. Bodies are read undecoded from urllib3 and decoded here so
that ``max_bytes`` counts decoded bytes and a compressed bomb stops at the limit.
"""

from __future__ import annotations

import errno
import fcntl
import http.client
import io
import logging
import math
import os
import select
import socket
import ssl
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.poolmanager import PoolManager

from . import __version__
from .deadline import Guard, guard_pool_manager
from .errors import (
    FetchError,
    HTTPStatusError,
    InvalidURL,
    RedirectError,
    TooLargeError,
    TransferError,
)
from .naming import is_sensitive_header, redact_url, scrub, split_userinfo
from .retry import parse_retry_after

__all__ = [
    "CHUNK_SIZE",
    "MAX_REDIRECTS",
    "SPLICE_BLOCK",
    "SPLICE_MIN",
    "Body",
    "SpliceSink",
    "open_response",
    "prepare_session",
]

log = logging.getLogger("fetchpool")

#: Bytes asked of the socket per read.
CHUNK_SIZE = 256 * 1024
#: The pipe size asked for a spliced body, and the step between its progress events.
SPLICE_BLOCK = 1024 * 1024
#: The least body left after the head for which a pipe is worth setting up.
SPLICE_MIN = 1024 * 1024
# The longest wait poll() accepts, in milliseconds (a C int).
_POLL_MAX_MS = 2**31 - 1
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# What splice(2) fails with, moving nothing, where a socket cannot be spliced (a
# sandbox's seccomp filter, an exotic socket type): the ordinary path then serves.
_CANNOT_SPLICE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM)
MAX_REDIRECTS = 10
_ENV_CACHE_HOSTS = 256
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CROSS_ORIGIN_DROP = ("Authorization", "Cookie", "Proxy-Authorization")
_NETWORK_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
    ValueError,
)


class _GuardedAdapter(HTTPAdapter):
    """An adapter whose pools, direct and through proxies, hand sockets to the guard."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        guard_pool_manager(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        manager: PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        guard_pool_manager(manager)
        return manager


def _guard_adapter(adapter: HTTPAdapter) -> None:
    """Guard a caller's adapter: its direct pools and every proxy manager it makes."""
    guard_pool_manager(adapter.poolmanager)
    if isinstance(adapter, _GuardedAdapter) or adapter.__dict__.get("_fetchpool_guarded"):
        return
    adapter.__dict__["_fetchpool_guarded"] = True
    make = adapter.proxy_manager_for

    def proxy_manager_for(proxy: str, **proxy_kwargs: Any) -> PoolManager:
        manager: PoolManager = make(proxy, **proxy_kwargs)
        guard_pool_manager(manager)
        return manager

    adapter.proxy_manager_for = proxy_manager_for  # type: ignore[method-assign]


def _no_redirects(*args: object, **kwargs: object) -> Iterator[Any]:
    return iter(())


def prepare_session(session: requests.Session) -> requests.Session:
    """Make ``session`` safe to use for fetchpool's attempts and return it.

    Disarms ``requests``' own redirect machinery on this instance (it would read 3xx
    bodies) and guards the default connection pools of its adapters.
    """
    session.resolve_redirects = _no_redirects  # type: ignore[method-assign]
    for adapter in session.adapters.values():
        if isinstance(adapter, HTTPAdapter):
            _guard_adapter(adapter)
    return session


def default_session(workers: int) -> requests.Session:
    """Return a new session for one worker thread: no urllib3 retries, pools sized to match."""
    session = requests.Session()
    session.headers["User-Agent"] = (
        f"fetchpool/{__version__} python-requests/{requests.__version__}"
    )
    for prefix in ("http://", "https://"):
        session.mount(
            prefix,
            _GuardedAdapter(pool_connections=16, pool_maxsize=max(1, workers), max_retries=0),
        )
    return prepare_session(session)


def _describe(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """Return a short text for a cause, good for an error message, with secrets removed."""
    text = scrub(str(exc) or type(exc).__name__, secrets)
    return text if len(text) <= 300 else text[:297] + "..."


def _caused_by(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether ``exc`` or anything it wraps (cause, context, args) is one of ``kinds``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return True
        todo += [a for a in current.args if isinstance(a, BaseException)]
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return False


def network_error(
    exc: BaseException,
    url: str,
    guard: Guard | None,
    during: str,
    secrets: tuple[str, ...] = (),
) -> FetchError:
    """Map a ``requests``/urllib3/socket exception to the right :class:`FetchError`."""
    shown = redact_url(url)

    def describe(exc: BaseException) -> str:
        return _describe(exc, secrets)

    if guard is not None and guard.cancelled:
        return TransferError(f"download of {shown} cancelled", url=shown, cancelled=True)
    if guard is not None and guard.fired:
        return TransferError(
            f"{guard.limit} of {guard.seconds:.3g} s exceeded {during} {shown}", url=shown
        )
    if isinstance(
        exc,
        (
            requests.exceptions.InvalidURL,
            requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema,
            urllib3.exceptions.LocationParseError,
        ),
    ):
        return InvalidURL(f"invalid URL {shown}: {describe(exc)}", url=shown)
    if isinstance(exc, requests.exceptions.SSLError):
        # The connection dropping mid-handshake may heal; a refused certificate or a
        # protocol mismatch will not.
        dropped = _caused_by(
            exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, TimeoutError)
        ) and not _caused_by(exc, (ssl.SSLCertVerificationError,))
        return TransferError(
            f"TLS error {during} {shown}: {describe(exc)}", url=shown, retryable=dropped
        )
    if _caused_by(
        exc,
        (
            requests.exceptions.InvalidHeader,
            urllib3.exceptions.InvalidHeader,
            urllib3.exceptions.InvalidChunkLength,
        ),
    ):
        return TransferError(
            f"malformed response {during} {shown}: {describe(exc)}", url=shown, retryable=False
        )
    if isinstance(
        exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    ):
        return TransferError(f"timed out {during} {shown}: {describe(exc)}", url=shown)
    return TransferError(f"connection failed {during} {shown}: {describe(exc)}", url=shown)


def _environment(
    session: requests.Session, url: str, cache: dict[tuple[str, str], dict[str, Any]] | None
) -> dict[str, Any]:
    # Proxies and CA bundle depend only on scheme and host; reading them from
    # os.environ on every request is a large share of requests' per-call cost.
    parts = urlsplit(url)
    key = (parts.scheme.lower(), parts.netloc.lower())
    settings = cache.get(key) if cache is not None else None
    if settings is None:
        settings = dict(session.merge_environment_settings(url, {}, True, None, None))
        if cache is not None:
            if len(cache) >= _ENV_CACHE_HOSTS:
                # Many distinct hosts (a crawl): stay bounded rather than clever.
                cache.clear()
            cache[key] = settings
    return settings


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def open_response(
    session: requests.Session,
    url: str,
    *,
    headers: Mapping[str, str],
    timeout: tuple[float, float],
    allow_downgrade: bool,
    guard: Guard | None,
    secrets: tuple[str, ...],
    env_cache: dict[tuple[str, str], dict[str, Any]] | None = None,
    shown: str = "",
) -> requests.Response:
    """Send GET for ``url``, following up to 10 redirects, and return the 2xx response.

    The response is streamed: its body is unread. The caller must close it.
    ``secrets`` (from :func:`~fetchpool.naming.secrets_of`) are kept out of messages.
    ``env_cache`` (one per session) keeps the proxy and CA settings that ``requests``
    would otherwise read from the environment on every request. ``shown`` is the URL as
    messages show it (:func:`~fetchpool.naming.redact_url`), if the caller has it already.

    Raises:
        HTTPStatusError: the final answer is not 2xx (its body is never read).
        RedirectError: a loop, too many hops, a non-http(s) target or a refused downgrade.
        TransferError: the connection failed, timed out or hit the deadline.
        InvalidURL: ``requests`` rejected the URL.
    """
    shown = shown or redact_url(url)
    # Credentials in the URL travel as an Authorization header that is dropped on a
    # cross-origin hop, and the URL itself then holds no secret to leak.
    current, auth = split_userinfo(url)
    first_origin = _origin(current)
    seen = {current}
    cross_origin = False
    for hop in range(MAX_REDIRECTS + 1):
        request = requests.Request(
            "GET", current, headers=dict(headers), auth=None if cross_origin else auth
        )
        prepared = session.prepare_request(request)
        if not any(name.lower() == "accept-encoding" for name in headers):
            prepared.headers["Accept-Encoding"] = "identity"
        if cross_origin:
            for name in [*_CROSS_ORIGIN_DROP, *filter(is_sensitive_header, headers)]:
                prepared.headers.pop(name, None)
        settings = _environment(session, current, env_cache)
        try:
            resp = session.send(prepared, allow_redirects=False, timeout=timeout, **settings)
        except _NETWORK_ERRORS as exc:
            raise network_error(exc, url, guard, "requesting", secrets) from exc
        status = resp.status_code
        if 200 <= status < 300:
            return resp
        location = resp.headers.get("Location")
        # Never read a non-2xx body: closing drops the connection instead.
        resp.close()
        if status not in _REDIRECT_STATUSES or location is None:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            reason = resp.reason or http.client.responses.get(status, "")
            raise HTTPStatusError(
                f"HTTP {status} {reason} for {shown}".rstrip(),
                url=shown,
                status_code=status,
                retry_after=retry_after,
            )
        if hop == MAX_REDIRECTS:
            raise RedirectError(f"more than {MAX_REDIRECTS} redirects for {shown}", url=shown)
        try:
            target = urljoin(current, location.strip())
            target_scheme = urlsplit(target).scheme.lower()
            target_origin = _origin(target)
        except ValueError as exc:
            raise RedirectError(
                f"bad redirect Location for {shown}: {_describe(exc, secrets)}", url=shown
            ) from exc
        if target_scheme not in ("http", "https"):
            raise RedirectError(
                f"redirect to a {target_scheme or 'relative'}: URL refused for {shown}", url=shown
            )
        downgrade = urlsplit(current).scheme.lower() == "https" and target_scheme == "http"
        if downgrade and not allow_downgrade:
            raise RedirectError(
                f"redirect from https to http refused for {shown} (allow_downgrade=False)",
                url=shown,
            )
        target = target.split("#", 1)[0]
        if target in seen:
            raise RedirectError(f"redirect loop for {shown}", url=shown)
        seen.add(target)
        if target_origin != first_origin:
            cross_origin = True
        log.debug("redirect %d for %s -> %s", status, shown, redact_url(target))
        current = target
    raise AssertionError("unreachable")  # pragma: no cover


def _is_decimal(text: str) -> bool:
    # str.isdigit() accepts "²" and other digits int() refuses.
    return text.isascii() and text.isdigit()


def content_length(resp: requests.Response, url: str) -> int | None:
    """Return the response's ``Content-Length``, or ``None`` when it has none.

    Raises:
        TransferError: the header is not a number, or repeated with different values.
    """
    raw = resp.headers.get("Content-Length")
    if raw is None:
        return None
    if "chunked" in resp.headers.get("Transfer-Encoding", "").lower():
        # Transfer-Encoding wins over Content-Length (RFC 9112 6.3).
        return None
    values = {v.strip() for v in raw.split(",")}
    if len(values) != 1 or not _is_decimal(next(iter(values))):
        shown = redact_url(url)
        raise TransferError(
            f"malformed Content-Length {raw[:60]!r} from {shown}", url=shown, retryable=False
        )
    return int(next(iter(values)))


class SpliceSink(Protocol):
    """Where :meth:`Body.splice_into` puts the body (a :class:`~fetchpool.storage.TempFile`)."""

    def write(self, data: bytes | memoryview) -> None: ...
    def splice_from(self, pipe_fd: int, count: int) -> None: ...


@dataclass
class _Spliceable:
    """The pieces of a response that splicing needs, found by :func:`_spliceable`."""

    raw: urllib3.HTTPResponse
    inner: http.client.HTTPResponse
    buffer: io.BufferedReader
    sock: socket.socket


def _spliceable(resp: requests.Response) -> _Spliceable | None:
    """Return the parts of ``resp`` to splice its body from, or ``None`` if it can't be.

    Everything looked at here is private to urllib3 and http.client (2.x and CPython
    3.10-3.13 checked); each piece is type-checked so that another version, a mock
    (``responses`` puts a ``BytesIO`` there), TLS or chunked framing take the ordinary
    path instead of failing.
    """
    raw = resp.raw
    if not isinstance(raw, urllib3.HTTPResponse) or raw.chunked:
        return None
    inner = getattr(raw, "_fp", None)
    if not isinstance(inner, http.client.HTTPResponse) or inner.chunked:
        return None
    buffer = getattr(inner, "fp", None)
    if not isinstance(buffer, io.BufferedReader):
        return None
    connection = getattr(raw, "_connection", None)
    sock: object = getattr(connection, "sock", None)
    # TLS records must be decrypted in user memory: an SSLSocket cannot be spliced.
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return None
    plain: socket.socket = sock
    # The bytes must come from the very socket http.client reads (not a proxy tunnel's
    # wrapper), and both layers must keep the counts that are advanced after a splice.
    source = getattr(buffer, "raw", None)
    reads_from = getattr(source, "_sock", None)
    if not isinstance(source, socket.SocketIO) or reads_from is not plain:
        return None
    if not isinstance(inner.length, int) or not isinstance(raw.length_remaining, int):
        return None
    if not isinstance(getattr(raw, "_fp_bytes_read", None), int) or plain.fileno() < 0:
        return None
    return _Spliceable(raw, inner, buffer, plain)


def _new_pipe() -> tuple[int, int, int]:
    """Open a pipe for one body; return its read end, write end and capacity."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        # A 1 MiB pipe moves the body in 16 times fewer system calls than the default
        # 64 KiB; where the limits refuse it (pipe-user-pages-soft), the default serves.
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, SPLICE_BLOCK)
    except OSError:
        pass
    try:
        capacity = fcntl.fcntl(write_end, _F_GETPIPE_SZ)
    except OSError:
        capacity = 65536
    return read_end, write_end, capacity


class _Decoder(Protocol):
    def feed(self, data: bytes, limit: int) -> bytes: ...
    def more(self, limit: int) -> bytes: ...
    def finished(self) -> bool: ...


class _ZlibDecoder:
    """gzip/deflate decoding with bounded output per call (bombs stay small)."""

    def __init__(self, encoding: str) -> None:
        self._gzip = encoding in ("gzip", "x-gzip")
        self._obj = zlib.decompressobj(47 if self._gzip else 15)
        self._started = False
        self._tail = b""

    def feed(self, data: bytes, limit: int) -> bytes:
        if self._obj.eof and self._gzip:
            # Concatenated gzip members are one body.
            data = self._obj.unused_data + data
            self._obj = zlib.decompressobj(47)
        else:
            data = self._obj.unconsumed_tail + data
        try:
            out = self._obj.decompress(data, limit)
        except zlib.error:
            if self._gzip or self._started:
                raise
            # Some servers send raw deflate without the zlib wrapper.
            self._obj = zlib.decompressobj(-15)
            out = self._obj.decompress(data, limit)
        self._started = True
        return out

    def more(self, limit: int) -> bytes:
        tail = self._obj.unconsumed_tail
        if tail:
            return self._obj.decompress(tail, limit)
        if self._obj.eof and self._gzip and self._obj.unused_data:
            leftover = self._obj.unused_data
            self._obj = zlib.decompressobj(47)
            return self._obj.decompress(leftover, limit)
        return b""

    def finished(self) -> bool:
        return self._obj.eof and not self._obj.unconsumed_tail


@dataclass
class Body:
    """The streamed body of a 2xx response: decoded chunks with limits enforced.

    Args:
        resp: the response from :func:`open_response`.
        url: the caller's URL (for messages).
        max_bytes: the limit on decoded bytes, or ``None``.
        guard: the attempt's deadline guard.

    Raises (on construction):
        TooLargeError: ``Content-Length`` exceeds ``max_bytes``.
        TransferError: malformed ``Content-Length`` or an unsupported ``Content-Encoding``.
    """

    resp: requests.Response
    url: str
    max_bytes: int | None
    guard: Guard | None
    secrets: tuple[str, ...] = ()
    shown: str = ""

    def __post_init__(self) -> None:
        if not self.shown:
            self.shown = redact_url(self.url)
        self.length = content_length(self.resp, self.url)
        encoding = self.resp.headers.get("Content-Encoding", "").strip().lower()
        self.decoder: _Decoder | None = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            self.decoder = _ZlibDecoder(encoding)
        elif encoding not in ("", "identity"):
            raise TransferError(
                f"unsupported Content-Encoding {encoding[:40]!r} from {self.shown}",
                url=self.shown,
                retryable=False,
            )
        # With an encoding the length counts compressed bytes: no size announced.
        self.total = self.length if self.decoder is None else None
        if self.total is not None and self.max_bytes is not None and self.total > self.max_bytes:
            raise TooLargeError(
                f"{self.shown} announces {self.total} bytes, over max_bytes={self.max_bytes}",
                url=self.shown,
            )
        self.received = 0
        self.decoded = 0

    def _count(self, data: bytes) -> bytes:
        self.decoded += len(data)
        if self.max_bytes is not None and self.decoded > self.max_bytes:
            raise TooLargeError(
                f"{self.shown} sent more than max_bytes={self.max_bytes} bytes", url=self.shown
            )
        return data

    def _check_guard(self) -> None:
        if self.guard is not None and self.guard.fired:
            raise network_error(
                TimeoutError("stopped"), self.url, self.guard, "while reading", self.secrets
            )

    def _truncated(self) -> TransferError:
        return TransferError(
            f"truncated body from {self.shown}: {self.received} of {self.length} bytes",
            url=self.shown,
        )

    def splice_into(self, sink: SpliceSink, progress: Callable[[], None]) -> bool:
        """Move the rest of the body into ``sink`` with ``os.splice``, if it can be.

        Socket to pipe to file, the bytes never enter user memory: for a big identity
        body over plain HTTP this is the cheapest way there is. Call it between two
        chunks of :meth:`chunks` (after the head); resumed, :meth:`chunks` then ends the
        body as usual, handing the connection back to the pool.

        Args:
            sink: where the bytes go (bytes http.client had buffered are written).
            progress: called after each :data:`SPLICE_BLOCK` or so moved, and at the end.

        Returns:
            Whether all of the body was moved; ``False`` (the rest left to
            :meth:`chunks`, every count up to date) for TLS, chunked framing, a content
            encoding, an unknown or small length, mocked responses, a kernel that
            refuses the splice, no descriptor left for a pipe, or TCP urgent data.

        Raises:
            TransferError: reset, read timeout, deadline, cancellation or truncation;
                the connection is then closed, never reused.
            StorageError: from ``sink``.
        """
        if not hasattr(os, "splice") or self.decoder is not None or self.length is None:
            return False
        if self.length - self.received < SPLICE_MIN:
            return False
        parts = _spliceable(self.resp)
        if parts is None:
            return False
        try:
            return self._splice(parts, sink, progress)
        except BaseException:
            # An unknown part of the body is still on the connection: drop it.
            parts.inner.close()
            connection = getattr(parts.raw, "_connection", None)
            if connection is not None:
                connection.close()
            raise

    def _splice(self, parts: _Spliceable, sink: SpliceSink, progress: Callable[[], None]) -> bool:
        assert self.length is not None
        raw = parts.raw
        self._check_guard()
        # What http.client's buffer already holds goes first, and through urllib3 so that
        # both keep their counts. peek() shows the buffer without a system call; only
        # when it is empty does it read, once, like any read of chunks() (timed, and
        # guarded: the watchdog's shutdown ends it). b"" means the peer closed.
        try:
            buffered = len(parts.buffer.peek(0))
        except OSError as exc:
            # Read below urllib3: wrap the error as its own reads would be.
            raise self._socket_error(raw, exc) from exc
        try:
            wanted = min(buffered, self.length - self.received)
            data = raw.read(wanted, decode_content=False) if wanted else b""
        except _NETWORK_ERRORS as exc:
            raise network_error(exc, self.url, self.guard, "while reading", self.secrets) from exc
        if data:
            self.received += len(data)
            sink.write(self._count(data))
            progress()
        try:
            read_end, write_end, capacity = _new_pipe()
        except OSError:
            # Out of descriptors (EMFILE, ENFILE): the counters agree, chunks() reads on.
            return False
        try:
            return self._pump(parts, sink, progress, read_end, write_end, capacity)
        finally:
            os.close(read_end)
            os.close(write_end)

    def _pump(
        self,
        parts: _Spliceable,
        sink: SpliceSink,
        progress: Callable[[], None],
        read_end: int,
        write_end: int,
        capacity: int,
    ) -> bool:
        """Splice the rest of the body through the pipe; see :meth:`splice_into`."""
        assert self.length is not None
        raw, inner = parts.raw, parts.inner
        fd = parts.sock.fileno()
        # urllib3 set the read timeout on the socket for this response; like a recv(),
        # each wait for bytes gets all of it.
        timeout = parts.sock.gettimeout()
        # Rounded up: a wait cut to 0 ms would report a timeout without waiting at all.
        wait_ms = None if timeout is None else max(1, math.ceil(timeout * 1000))
        if wait_ms is not None and wait_ms > _POLL_MAX_MS:
            # Beyond what poll() takes (24.8 days): no wait of its own, the deadline ends it.
            wait_ms = None
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        left = self.length - self.received
        in_pipe = spliced = reported = 0
        # poll() said readable and nothing has moved since.
        ready = False

        def drain() -> None:
            nonlocal in_pipe, spliced, reported
            sink.splice_from(read_end, in_pipe)
            # Count the bytes where chunks() and both HTTP layers look: the body is then
            # consumed for all of them, and the connection goes back to the pool.
            self.received += in_pipe
            self._count_spliced(in_pipe)
            inner.length = (inner.length or 0) - in_pipe
            raw.length_remaining = (raw.length_remaining or 0) - in_pipe
            raw._fp_bytes_read += in_pipe
            spliced += in_pipe
            in_pipe = 0
            if spliced - reported >= SPLICE_BLOCK or not left:
                reported = spliced
                progress()

        while left:
            self._check_guard()
            try:
                moved = os.splice(fd, write_end, min(left, capacity - in_pipe), flags=flags)
            except BlockingIOError:
                # EAGAIN: the socket has nothing, or the pipe is full (its slots hold
                # whole socket buffers, so it can fill before ``capacity`` bytes). Empty
                # it first: then EAGAIN can only mean the socket.
                if in_pipe:
                    drain()
                elif ready:
                    # Readable, yet splice moves nothing: TCP urgent data stops a socket
                    # splice for good (recv() steps over it). The pipe is empty and the
                    # counters agree: chunks() reads the rest.
                    return False
                elif poller.poll(wait_ms):
                    ready = True
                else:
                    raise self._socket_error(raw, TimeoutError("timed out")) from None
                continue
            except OSError as exc:
                if not in_pipe and exc.errno in _CANNOT_SPLICE:
                    return False
                raise self._socket_error(raw, exc) from exc
            ready = False
            if moved == 0:
                # End of stream: the peer closed early, or the watchdog shut the socket.
                if in_pipe:
                    drain()
                self._check_guard()
                raise self._truncated()
            left -= moved
            in_pipe += moved
            if in_pipe >= capacity or not left:
                drain()
        return True

    def _socket_error(self, raw: urllib3.HTTPResponse, exc: OSError) -> FetchError:
        """Map an error of a read below urllib3 as urllib3 maps its own reads' errors."""
        wrapped: Exception
        if isinstance(exc, TimeoutError):
            pool = getattr(raw, "_pool", None)
            wrapped = urllib3.exceptions.ReadTimeoutError(pool, None, "Read timed out.")  # type: ignore[arg-type]
        else:
            wrapped = urllib3.exceptions.ProtocolError(f"Connection broken: {exc!r}", exc)
        return network_error(wrapped, self.url, self.guard, "while reading", self.secrets)

    def _count_spliced(self, count: int) -> None:
        self.decoded += count
        if self.max_bytes is not None and self.decoded > self.max_bytes:
            # Unreachable while the length is known and checked, kept as a safeguard.
            raise TooLargeError(
                f"{self.shown} sent more than max_bytes={self.max_bytes} bytes", url=self.shown
            )

    def chunks(self) -> Iterator[bytes]:
        """Yield the decoded body in chunks.

        Raises:
            TransferError: reset, timeout, deadline, truncation, malformed framing or a
                corrupt compressed stream.
            TooLargeError: more than ``max_bytes`` decoded bytes.
        """
        raw = self.resp.raw
        limit = CHUNK_SIZE
        source: Iterator[bytes]
        if raw.chunked and raw.supports_chunked_reads():
            # urllib3's chunk parser tells a garbage chunk-size line (malformed, final)
            # from a connection that closed between chunks (truncated, retryable);
            # http.client's reports both as IncompleteRead.
            source = raw.read_chunked(CHUNK_SIZE, decode_content=False)
        else:
            source = iter(lambda: raw.read(CHUNK_SIZE, decode_content=False), b"")
        while True:
            self._check_guard()
            try:
                data = next(source, b"")
            except _NETWORK_ERRORS as exc:
                raise network_error(
                    exc, self.url, self.guard, "while reading", self.secrets
                ) from exc
            if not data:
                break
            self.received += len(data)
            if self.length is not None and self.received > self.length:
                raise TransferError(
                    f"{self.shown} sent more than its Content-Length",
                    url=self.shown,
                    retryable=False,
                )
            if self.decoder is None:
                yield self._count(data)
                continue
            try:
                out = self.decoder.feed(data, limit)
                while out:
                    yield self._count(out)
                    out = self.decoder.more(limit)
            except zlib.error as exc:
                raise TransferError(
                    f"corrupt compressed body from {self.shown}: {exc}", url=self.shown
                ) from exc
        self._check_guard()
        if self.length is not None and self.received < self.length:
            raise self._truncated()
        if self.decoder is not None and not self.decoder.finished():
            raise TransferError(f"truncated compressed body from {self.shown}", url=self.shown)
