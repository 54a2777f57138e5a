"""The exception hierarchy: every failure on a result is one of these.

All errors subclass :class:`FetchError`, carry the (redacted) ``url`` they are about,
chain their cause with ``raise ... from``, and pickle. Because ``__cause__`` does not
survive pickling, the message also holds the cause's text.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "BlockedAddressError",
    "ChecksumError",
    "FetchError",
    "HTTPStatusError",
    "InvalidURL",
    "NotAnImageError",
    "RedirectError",
    "ShardError",
    "StorageError",
    "TooLargeError",
    "TransferError",
    "UnsafeFilenameError",
]


class FetchError(Exception):
    """Base class of every fetchpool error.

    Attributes:
        url: the URL the error is about, with user-info removed.
    """

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.url = url

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def _extra(self) -> tuple[Any, ...]:
        return ()

    def __reduce__(self) -> tuple[Any, ...]:
        # Explicit so that subclasses with extra constructor arguments (and the
        # OSError mix-in, whose own reduce would reinterpret args) round-trip.
        return (type(self), (self.message, self.url, *self._extra()))


class InvalidURL(FetchError, ValueError):
    """The input is not an http(s) URL, or not a string."""


class HTTPStatusError(FetchError):
    """The server answered with a status other than 2xx (after redirects).

    Attributes:
        status_code: the HTTP status code.
        retry_after: seconds the server asked to wait (``Retry-After``), if any.
    """

    def __init__(
        self,
        message: str,
        url: str = "",
        status_code: int = 0,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, url)
        self.status_code = status_code
        self.retry_after = retry_after

    def _extra(self) -> tuple[Any, ...]:
        return (self.status_code, self.retry_after)


class TransferError(FetchError):
    """The transfer broke: connection reset or refused, timeout, truncated or malformed body.

    Attributes:
        retryable: whether another attempt can help (``False`` for malformed framing or
            a cancelled download).
        cancelled: the download was stopped by ``Downloader.close(cancel=True)`` or an
            interrupt, not by anything the server did.
    """

    def __init__(
        self, message: str, url: str = "", retryable: bool = True, cancelled: bool = False
    ) -> None:
        super().__init__(message, url)
        self.retryable = retryable and not cancelled
        self.cancelled = cancelled

    def _extra(self) -> tuple[Any, ...]:
        return (self.retryable, self.cancelled)


class TooLargeError(FetchError):
    """The body is (or announced itself as) larger than ``max_bytes``."""


class NotAnImageError(FetchError, ValueError):
    """``verify="image"`` is set and the body does not start like an image."""


class ChecksumError(FetchError):
    """The body (or a file found with ``overwrite="skip"``) is not what the caller expected.

    Raised when the size or a hash given with :class:`~fetchpool.Item` does not match.
    A body that does not match is retried, like a truncated one: a corrupted transfer
    can heal. A ``Content-Length`` that contradicts the expected size is not: the
    server would announce the same again.

    Attributes:
        algorithm: ``"sha256"``, ``"md5"`` or ``"size"``.
        expected: the hex digest or size the caller gave.
        actual: what the body had: its hex digest, or its size (for a body cut short
            when it passed the expected size, the bytes received by then).
        retryable: whether another attempt can help.
    """

    def __init__(
        self,
        message: str,
        url: str = "",
        algorithm: str = "",
        expected: str | int | None = None,
        actual: str | int | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message, url)
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual
        self.retryable = retryable

    def _extra(self) -> tuple[Any, ...]:
        return (self.algorithm, self.expected, self.actual, self.retryable)


class UnsafeFilenameError(FetchError, ValueError):
    """A filename escapes ``dest``, is reserved, or is already used by another URL."""


class BlockedAddressError(FetchError):
    """``block_private`` refused every address of the host (loopback, private, link-local...).

    Never retried: no request was sent, and the host would resolve the same again.

    Attributes:
        host: the host of the URL (or of the redirect hop) refused.
        address: the address refused (empty where a proxy would have connected).
    """

    def __init__(self, message: str, url: str = "", host: str = "", address: str = "") -> None:
        super().__init__(message, url)
        self.host = host
        self.address = address

    def _extra(self) -> tuple[Any, ...]:
        return (self.host, self.address)


class RedirectError(FetchError):
    """A redirect loop, too many hops, a non-http(s) target, or a refused https→http hop."""


class StorageError(FetchError, OSError):
    """The local side failed: disk full, permission denied, a file in the way. Never retried.

    Attributes:
        errno: the errno of the underlying ``OSError`` (``errno.ENOSPC`` for a full disk),
            or ``None``.
    """

    def __init__(self, message: str, url: str = "", errno: int | None = None) -> None:
        super().__init__(message, url)
        self.errno = errno
        self.strerror = os.strerror(errno) if errno else message

    def _extra(self) -> tuple[Any, ...]:
        return (self.errno,)


class ShardError(FetchError):
    """The cluster shard holding this URL failed as a whole (``fetchpool.dask``).

    Its Dask worker died more often than the scheduler allows (``KilledWorker``), the
    shard's task raised, or its result could not come back; the message names the cause.
    The URL's file may or may not have been written: run the URL again to know.
    """
