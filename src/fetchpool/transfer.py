"""One HTTP attempt, written once for every backend: redirects, status, framing, limits.

Redirects are followed here, by hand, and never by a backend: ``requests`` reads the
body of every 3xx response into memory (DESIGN rule 6), and libcurl would apply its own
rules. Bodies come from the backend undecoded and are decoded here, so that
``max_bytes`` counts decoded bytes and a compressed bomb stops at the limit.
"""

from __future__ import annotations

import functools
import http.client
import importlib
import logging
import threading
import zlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from .backends import BodyEnded, Reply, Request, SpliceSink, check_guard, describe
from .checksums import Expected
from .deadline import Guard
from .errors import ChecksumError, HTTPStatusError, RedirectError, TooLargeError, TransferError
from .hosts import Ticket, host_key
from .naming import is_sensitive_header, redact_url, split_userinfo
from .retry import parse_retry_after
from .steps import Admit, Read, Send, Splice, Steps

__all__ = [
    "CHUNK_SIZE",
    "MAX_REDIRECTS",
    "SPLICE_BLOCK",
    "SPLICE_MIN",
    "Body",
    "content_length",
    "open_response",
    "request_headers",
]

log = logging.getLogger("fetchpool")

#: Bytes asked of the backend per read.
CHUNK_SIZE = 256 * 1024
#: The step between two progress events of a spliced body.
SPLICE_BLOCK = 1024 * 1024
#: The least body left after the head for which a splice is worth setting up.
SPLICE_MIN = 1024 * 1024
MAX_REDIRECTS = 10
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CROSS_ORIGIN_DROP = ("Authorization", "Cookie", "Proxy-Authorization")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def request_headers(headers: Mapping[str, str], cross_origin: bool) -> dict[str, str]:
    """The headers a request sends: the caller's ``headers``, ``Accept-Encoding: identity``
    unless they name one, and on a ``cross_origin`` hop none of the sensitive ones."""
    if not headers:
        return {"Accept-Encoding": "identity"}  # the default: nothing to look through
    sent = dict(headers)
    if not any(name.lower() == "accept-encoding" for name in sent):
        sent["Accept-Encoding"] = "identity"
    if cross_origin:
        for name in [n for n in sent if is_sensitive_header(n)]:
            del sent[name]
    return sent


def open_response(
    url: str,
    *,
    headers: Mapping[str, str],
    timeout: tuple[float, float],
    allow_downgrade: bool,
    guard: Guard,
    secrets: tuple[str, ...],
    shown: str = "",
    ticket: Ticket | None = None,
    cancel: threading.Event | None = None,
) -> Steps[Reply]:
    """Send GET for ``url``, following up to 10 redirects; the step ends with the 2xx reply.

    The reply is streamed: its body is unread. The caller must close it.
    ``secrets`` (from :func:`~fetchpool.naming.secrets_of`) are kept out of messages.
    ``shown`` is the URL as messages show it (:func:`~fetchpool.naming.redact_url`), if
    the caller has it already. With per-host limits, ``ticket`` is the download's, already
    admitted for the first request: each redirect hop is admitted to its own host (until
    ``cancel`` is set), and a 429 or 503 with ``Retry-After`` pauses the host that sent it.

    Raises:
        HTTPStatusError: the final answer is not 2xx (its body is never read).
        RedirectError: a loop, too many hops, a non-http(s) target or a refused downgrade.
        TransferError: the connection failed, timed out or hit the deadline.
        InvalidURL: the backend rejected the URL.
    """
    shown = shown or redact_url(url)
    # Credentials in the URL travel as an Authorization header that is dropped on a
    # cross-origin hop, and the URL itself then holds no secret to leak.
    current, auth = split_userinfo(url)
    first_origin: tuple[str, str, int | None] | None = None  # parsed at the first redirect
    seen = {current}
    cross_origin = False
    for hop in range(MAX_REDIRECTS + 1):
        if hop and ticket is not None:
            key = host_key(current)
            if key is not None:
                yield Admit(ticket, key, cancel or threading.Event())
        request = Request(
            url=current,
            headers=request_headers(headers, cross_origin),
            auth=None if cross_origin else auth,
            drop=(*_CROSS_ORIGIN_DROP, *filter(is_sensitive_header, headers))
            if cross_origin
            else (),
            timeout=timeout,
            shown=shown,
            secrets=secrets,
        )
        reply: Reply = yield Send(request, guard)
        status = reply.status
        if 200 <= status < 300:
            return reply
        location = reply.headers.get("Location")
        # Never read a non-2xx body: closing drops the connection instead.
        reply.close()
        if status not in _REDIRECT_STATUSES or location is None:
            retry_after = parse_retry_after(reply.headers.get("Retry-After"))
            if ticket is not None and retry_after and status in (429, 503):
                key = host_key(current)
                if key is not None:
                    ticket.pause(key, retry_after, status)
            reason = reply.reason or http.client.responses.get(status, "")
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
                f"bad redirect Location for {shown}: {describe(exc, secrets)}", url=shown
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
        if first_origin is None:
            first_origin = _origin(split_userinfo(url)[0])
        if target_origin != first_origin:
            cross_origin = True
        log.debug("redirect %d for %s -> %s", status, shown, redact_url(target))
        current = target
    raise AssertionError("unreachable")  # pragma: no cover


def _is_decimal(text: str) -> bool:
    # str.isdigit() accepts "²" and other digits int() refuses.
    return text.isascii() and text.isdigit()


def content_length(headers: Mapping[str, str], shown: str) -> int | None:
    """Return the ``Content-Length`` of a response, or ``None`` when it has none.

    Raises:
        TransferError: the header is not a number, or repeated with different values.
    """
    raw = headers.get("Content-Length")
    if raw is None:
        return None
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        # Transfer-Encoding wins over Content-Length (RFC 9112 6.3).
        return None
    if _is_decimal(raw):
        return int(raw)  # the usual one: no list, no spaces
    values = {v.strip() for v in raw.split(",")}
    if len(values) != 1 or not _is_decimal(next(iter(values))):
        raise TransferError(
            f"malformed Content-Length {raw[:60]!r} from {shown}", url=shown, retryable=False
        )
    return int(next(iter(values)))


class _Decoder(Protocol):
    def feed(self, data: bytes, limit: int) -> bytes: ...
    def more(self, limit: int) -> bytes: ...
    def finished(self) -> bool: ...


class CorruptBody(Exception):
    """A compressed body its decoder refused (turned into a :class:`TransferError`)."""


class _ZlibDecoder:
    """gzip/deflate decoding with bounded output per call (bombs stay small)."""

    def __init__(self, encoding: str) -> None:
        self._gzip = encoding in ("gzip", "x-gzip")
        self._obj = zlib.decompressobj(47 if self._gzip else 15)
        self._started = False

    def feed(self, data: bytes, limit: int) -> bytes:
        try:
            return self._feed(data, limit)
        except zlib.error as exc:
            raise CorruptBody(str(exc)) from exc

    def _feed(self, data: bytes, limit: int) -> bytes:
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
        try:
            tail = self._obj.unconsumed_tail
            if tail:
                return self._obj.decompress(tail, limit)
            if self._obj.eof and self._gzip and self._obj.unused_data:
                leftover = self._obj.unused_data
                self._obj = zlib.decompressobj(47)
                return self._obj.decompress(leftover, limit)
        except zlib.error as exc:
            raise CorruptBody(str(exc)) from exc
        return b""

    def finished(self) -> bool:
        return self._obj.eof and not self._obj.unconsumed_tail


class _BrotliDecoder:
    """``br`` decoding (RFC 7932) with bounded output per call: brotli >= 1.2, or
    brotlicffi >= 1.2 (their ``output_buffer_limit`` keeps bombs small)."""

    def __init__(self, module: ModuleType) -> None:
        self._error: type[Exception] = module.error
        self._obj = module.Decompressor()
        # brotli calls it process(), brotlicffi decompress().
        process = getattr(self._obj, "process", None)
        self._process: Callable[..., bytes] = process or self._obj.decompress

    def _run(self, data: bytes, limit: int) -> bytes:
        try:
            return self._process(data, output_buffer_limit=limit)
        except self._error as exc:
            raise CorruptBody(str(exc)) from exc

    def feed(self, data: bytes, limit: int) -> bytes:
        if self._obj.is_finished():
            raise CorruptBody("data after the end of the brotli stream")
        return self._run(data, limit)

    def more(self, limit: int) -> bytes:
        # Output held back by the limit: the decoder takes no input until it is out.
        return b"" if self._obj.can_accept_more_data() else self._run(b"", limit)

    def finished(self) -> bool:
        return bool(self._obj.is_finished())


class _ZstdDecoder:
    """``zstd`` decoding (RFC 8878) with bounded output per call: ``compression.zstd``
    (Python 3.14) or its backport ``backports.zstd``, as urllib3 uses. Concatenated
    frames are one body."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module
        self._obj = module.ZstdDecompressor()

    def feed(self, data: bytes, limit: int) -> bytes:
        if self._obj.eof:
            data = self._obj.unused_data + data
            self._obj = self._module.ZstdDecompressor()
        return self._run(data, limit)

    def _run(self, data: bytes, limit: int) -> bytes:
        try:
            out: bytes = self._obj.decompress(data, max_length=limit)
        except self._module.ZstdError as exc:
            raise CorruptBody(str(exc)) from exc
        return out

    def more(self, limit: int) -> bytes:
        if self._obj.eof:
            if not self._obj.unused_data:
                return b""
            # The next frame, already received.
            leftover = self._obj.unused_data
            self._obj = self._module.ZstdDecompressor()
            return self._run(leftover, limit)
        # Output held back by the limit is released by a call with no new input.
        return b"" if self._obj.needs_input else self._run(b"", limit)

    def finished(self) -> bool:
        return bool(self._obj.eof) and not self._obj.unused_data


def _try_import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _import_first(*names: str) -> ModuleType | None:
    for name in names:
        module = _try_import(name)
        if module is not None:
            return module
    return None


@functools.cache
def brotli_module() -> ModuleType | None:
    """The brotli binding that decodes ``br`` bodies, or ``None`` if none usable is
    installed (``pip install "fetchpool[brotli]"``). Imported when first needed."""
    module = _import_first("brotlicffi", "brotli")
    # Before 1.2, neither bounds a call's output: a bomb would be decoded whole.
    if module is None or not hasattr(module.Decompressor(), "can_accept_more_data"):
        return None
    return module


@functools.cache
def zstd_module() -> ModuleType | None:
    """The module that decodes ``zstd`` bodies, or ``None`` if it is not installed
    (``pip install "fetchpool[zstd]"``). Imported when first needed."""
    return _import_first("compression.zstd", "backports.zstd")


def _decoder(encoding: str, shown: str) -> _Decoder | None:
    """The decoder for a ``Content-Encoding``, ``None`` for identity.

    Raises:
        TransferError: an encoding fetchpool cannot decode here (not retried).
    """
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _ZlibDecoder(encoding)
    hint = ""
    if encoding == "br":
        module = brotli_module()
        if module is not None:
            return _BrotliDecoder(module)
        hint = ' (pip install "fetchpool[brotli]" to decode it)'
    elif encoding == "zstd":
        module = zstd_module()
        if module is not None:
            return _ZstdDecoder(module)
        hint = ' (pip install "fetchpool[zstd]" to decode it)'
    raise TransferError(
        f"unsupported Content-Encoding {encoding[:40]!r} from {shown}{hint}",
        url=shown,
        retryable=False,
    )


class Body:
    """The streamed body of a 2xx reply: decoded chunks with limits enforced.

    Args:
        reply: the reply from :func:`open_response`.
        shown: the URL as messages show it.
        max_bytes: the limit on decoded bytes, or ``None``.
        guard: the attempt's deadline guard.
        expected: what the caller expects of the body; its ``size`` is checked here
            against ``Content-Length`` and against the bytes received (that the body
            is not shorter is the writer's to check, at its end).
        offset: for the rest of a body resumed (a ``206``), the bytes of it the file
            holds already: they count against the limits, and progress counts on from
            them. ``total`` is then the size of the whole body.

    Raises (on construction):
        TooLargeError: ``Content-Length`` exceeds ``max_bytes``.
        TransferError: malformed ``Content-Length`` or an unsupported ``Content-Encoding``.
        ChecksumError: ``Content-Length`` contradicts the expected size (not retried:
            the server would announce the same again).
    """

    def __init__(
        self,
        reply: Reply,
        shown: str,
        max_bytes: int | None,
        guard: Guard | None,
        expected: Expected | None = None,
        offset: int = 0,
        total: int | None = None,
    ) -> None:
        self.reply = reply
        self.shown = shown
        self.max_bytes = max_bytes
        self.guard = guard
        self.length = content_length(reply.headers, shown)
        encoding = reply.headers.get("Content-Encoding", "").strip().lower()
        self.decoder = _decoder(encoding, shown)
        # With an encoding the length counts compressed bytes: no size announced.
        self.total = self.length if self.decoder is None else None
        #: The bytes of the body before this answer's (kept in the file), or 0.
        self.offset = offset
        if offset:
            self.total = total
        if self.total is not None and max_bytes is not None and self.total > max_bytes:
            raise TooLargeError(
                f"{shown} announces {self.total} bytes, over max_bytes={max_bytes}", url=shown
            )
        #: The expected size, if any: more decoded bytes than this stop the body.
        self.expected_size = None if expected is None else expected.size
        # One limit checked per chunk for both: an expected size costs no more.
        self._limit = max_bytes
        if expected is not None and expected.size is not None:
            error = (
                None
                if self.total is None
                else expected.size_error(self.total, shown, "its Content-Length says")
            )
            if error is not None:
                error.retryable = False
                raise error
            if max_bytes is None or expected.size < max_bytes:
                self._limit = expected.size
        #: Body bytes received as sent, and after decoding (with those before ``offset``).
        self.received = 0
        self.decoded = offset
        self._draining = False  # the decoder may have more output for the last input
        self._ended = False

    def _count(self, size: int) -> None:
        self.decoded += size
        if self._limit is not None and self.decoded > self._limit:
            if self._limit == self.expected_size:
                raise ChecksumError(
                    f"size mismatch for {self.shown}: expected {self.expected_size} bytes, "
                    f"the body is longer (stopped at {self.decoded})",
                    url=self.shown,
                    algorithm="size",
                    expected=self.expected_size,
                    actual=self.decoded,
                )
            raise TooLargeError(
                f"{self.shown} sent more than max_bytes={self.max_bytes} bytes", url=self.shown
            )

    def _truncated(self) -> TransferError:
        if self.length is None:  # chunked: the connection closed before the last chunk
            return TransferError(
                f"truncated body from {self.shown}: the connection closed after "
                f"{self.received} bytes, before the end of the body",
                url=self.shown,
            )
        return TransferError(
            f"truncated body from {self.shown}: {self.received} of {self.length} bytes",
            url=self.shown,
        )

    def may_splice(self) -> bool:
        """Whether :meth:`splice_into` may move anything: an identity body of known length
        with at least :data:`SPLICE_MIN` bytes left (a small file need not make the step)."""
        return (
            self.decoder is None
            and self.length is not None
            and self.length - self.received >= SPLICE_MIN
        )

    def splice_into(self, sink: SpliceSink, progress: Callable[[], None]) -> Steps[bool]:
        """Have the backend move the rest of the body straight into ``sink``, if it can.

        For a big identity body with a known length the backend may splice it from the
        socket to the file without the bytes entering Python (the requests backend does
        so over plain HTTP). Run it between two :meth:`read` steps (after the head);
        :meth:`read` then ends the body as usual.

        Args:
            sink: where the bytes go.
            progress: called after each :data:`SPLICE_BLOCK` or so moved, and at the end.

        Returns:
            (as the step's result) whether all of the body was moved; ``False`` (the
            rest left to :meth:`read`, every count up to date) otherwise.

        Raises:
            TransferError: reset, read timeout, deadline, cancellation or truncation.
            StorageError: from ``sink``.
        """
        length = self.length
        if length is None or not self.may_splice():
            return False
        reported = self.received

        def moved(count: int) -> None:
            nonlocal reported
            self.received += count
            # Unreachable while the length is known and checked, kept as a safeguard.
            self._count(count)
            if self.received - reported >= SPLICE_BLOCK or self.received == self.length:
                reported = self.received
                progress()

        try:
            done: bool = yield Splice(self.reply, sink, length - self.received, moved)
        except BodyEnded:
            raise self._truncated() from None
        return done

    def _decoded(self, out: bytes) -> bytes:
        self._draining = True
        self._count(len(out))
        return out

    def read(self) -> Steps[bytes]:
        """The next decoded chunk of the body, ``b""`` once it ended well (a step).

        Raises:
            TransferError: reset, timeout, deadline, truncation, malformed framing or a
                corrupt compressed stream.
            TooLargeError: more than ``max_bytes`` decoded bytes.
        """
        decoder = self.decoder
        try:
            if self._draining:
                assert decoder is not None
                out = decoder.more(CHUNK_SIZE)
                if out:
                    return self._decoded(out)
                self._draining = False
            while not self._ended:
                check_guard(self.guard, self.shown)
                try:
                    data: bytes = yield Read(self.reply, CHUNK_SIZE)
                except BodyEnded:
                    raise self._truncated() from None
                if not data:
                    self._end()
                    break
                self.received += len(data)
                if self.length is not None and self.received > self.length:
                    raise TransferError(
                        f"{self.shown} sent more than its Content-Length",
                        url=self.shown,
                        retryable=False,
                    )
                if decoder is None:
                    self._count(len(data))
                    return data
                out = decoder.feed(data, CHUNK_SIZE)
                if out:
                    return self._decoded(out)
        except CorruptBody as exc:
            raise TransferError(
                f"corrupt compressed body from {self.shown}: {exc}", url=self.shown
            ) from exc
        return b""

    def _end(self) -> None:
        self._ended = True
        check_guard(self.guard, self.shown)
        if self.length is not None and self.received < self.length:
            raise self._truncated()
        if self.decoder is not None and not self.decoder.finished():
            raise TransferError(f"truncated compressed body from {self.shown}", url=self.shown)
