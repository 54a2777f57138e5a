"""``splice(2)`` for big plain-HTTP bodies of the requests backend: socket, pipe, file.

The bytes never enter user memory. Everything looked at here is private to urllib3
and http.client (2.x and CPython 3.10-3.13 checked); each piece is type-checked, so
that another version, a mock (``responses`` puts a ``BytesIO`` there), TLS or chunked
framing take the ordinary path instead of failing.
"""

from __future__ import annotations

import errno
import fcntl
import http.client
import io
import math
import os
import select
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import requests
import urllib3
import urllib3.exceptions

from ..deadline import Guard
from ..errors import FetchError
from . import BodyEnded, Request, SpliceSink, check_guard

__all__ = ["PIPE_SIZE", "splice_body", "spliceable"]

#: The pipe size asked for a spliced body.
PIPE_SIZE = 1024 * 1024
# The longest wait poll() accepts, in milliseconds (a C int).
_POLL_MAX_MS = 2**31 - 1
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# What splice(2) fails with, moving nothing, where a socket cannot be spliced (a
# sandbox's seccomp filter, an exotic socket type): the ordinary path then serves.
_CANNOT_SPLICE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM)

ErrorMapper = Callable[[BaseException], FetchError]


@dataclass
class _Spliceable:
    """The pieces of a response that splicing needs, found by :func:`spliceable`."""

    raw: urllib3.HTTPResponse
    inner: http.client.HTTPResponse
    buffer: io.BufferedReader
    sock: socket.socket


def spliceable(resp: requests.Response) -> _Spliceable | None:
    """Return the parts of ``resp`` to splice its body from, or ``None`` if it can't be."""
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
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    try:
        capacity = fcntl.fcntl(write_end, _F_GETPIPE_SZ)
    except OSError:
        capacity = 65536
    return read_end, write_end, capacity


def splice_body(
    resp: requests.Response,
    sink: SpliceSink,
    length: int,
    moved: Callable[[int], None],
    guard: Guard | None,
    request: Request,
    mapped: ErrorMapper,
) -> bool:
    """Move the next ``length`` body bytes of ``resp`` into ``sink`` with ``os.splice``.

    Resumed, the reply's ``chunks()`` then ends the body as usual, handing the
    connection back to the pool.

    Returns:
        Whether all of it was moved; ``False`` (the rest left to ``chunks()``, every
        count up to date) for TLS, chunked framing, mocked responses, a kernel that
        refuses the splice, no descriptor left for a pipe, or TCP urgent data.

    Raises:
        FetchError: reset, read timeout, deadline or cancellation (``mapped`` words
            it); the connection is then closed, never reused.
        BodyEnded: the peer closed early.
        StorageError: from ``sink``.
    """
    if not hasattr(os, "splice"):
        return False
    parts = spliceable(resp)
    if parts is None:
        return False
    try:
        return _splice(parts, sink, length, moved, guard, request, mapped)
    except BaseException:
        # An unknown part of the body is still on the connection: drop it.
        parts.inner.close()
        connection = getattr(parts.raw, "_connection", None)
        if connection is not None:
            connection.close()
        raise


def _socket_error(raw: urllib3.HTTPResponse, exc: OSError, mapped: ErrorMapper) -> FetchError:
    """Map an error of a read below urllib3 as urllib3 maps its own reads' errors."""
    wrapped: Exception
    if isinstance(exc, TimeoutError):
        pool = getattr(raw, "_pool", None)
        wrapped = urllib3.exceptions.ReadTimeoutError(pool, None, "Read timed out.")  # type: ignore[arg-type]
    else:
        wrapped = urllib3.exceptions.ProtocolError(f"Connection broken: {exc!r}", exc)
    return mapped(wrapped)


def _splice(
    parts: _Spliceable,
    sink: SpliceSink,
    length: int,
    moved: Callable[[int], None],
    guard: Guard | None,
    request: Request,
    mapped: ErrorMapper,
) -> bool:
    raw = parts.raw
    check_guard(guard, request.shown)
    # What http.client's buffer already holds goes first, and through urllib3 so that
    # both keep their counts. peek() shows the buffer without a system call; only
    # when it is empty does it read, once, like any read of chunks() (timed, and
    # guarded: the watchdog's shutdown ends it). b"" means the peer closed.
    try:
        buffered = len(parts.buffer.peek(0))
    except OSError as exc:
        # Read below urllib3: wrap the error as its own reads would be.
        raise _socket_error(raw, exc, mapped) from exc
    try:
        wanted = min(buffered, length)
        data = raw.read(wanted, decode_content=False) if wanted else b""
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, ValueError) as exc:
        raise mapped(exc) from exc
    if data:
        sink.write(data)
        moved(len(data))
        length -= len(data)
    try:
        read_end, write_end, capacity = _new_pipe()
    except OSError:
        # Out of descriptors (EMFILE, ENFILE): the counters agree, chunks() reads on.
        return False
    try:
        return _pump(
            parts, sink, length, moved, guard, request, mapped, read_end, write_end, capacity
        )
    finally:
        os.close(read_end)
        os.close(write_end)


def _pump(
    parts: _Spliceable,
    sink: SpliceSink,
    left: int,
    moved: Callable[[int], None],
    guard: Guard | None,
    request: Request,
    mapped: ErrorMapper,
    read_end: int,
    write_end: int,
    capacity: int,
) -> bool:
    """Splice the rest of the body through the pipe; see :func:`splice_body`."""
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
    in_pipe = 0
    # poll() said readable and nothing has moved since.
    ready = False

    def drain() -> None:
        nonlocal in_pipe
        sink.splice_from(read_end, in_pipe)
        # Count the bytes where chunks() and both HTTP layers look: the body is then
        # consumed for all of them, and the connection goes back to the pool.
        inner.length = (inner.length or 0) - in_pipe
        raw.length_remaining = (raw.length_remaining or 0) - in_pipe
        raw._fp_bytes_read += in_pipe
        count, in_pipe = in_pipe, 0
        moved(count)

    while left:
        check_guard(guard, request.shown)
        try:
            got = os.splice(fd, write_end, min(left, capacity - in_pipe), flags=flags)
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
                raise _socket_error(raw, TimeoutError("timed out"), mapped) from None
            continue
        except OSError as exc:
            if not in_pipe and exc.errno in _CANNOT_SPLICE:
                return False
            raise _socket_error(raw, exc, mapped) from exc
        ready = False
        if got == 0:
            # End of stream: the peer closed early, or the watchdog shut the socket.
            if in_pipe:
                drain()
            check_guard(guard, request.shown)
            raise BodyEnded
        left -= got
        in_pipe += got
        if in_pipe >= capacity or not left:
            drain()
    return True
