"""Resuming a body with HTTP ``Range`` and ``If-Range``: within a run, and across runs.

Within a run, when an attempt of a large body (:data:`RESUME_MIN` bytes or more in its
file) breaks in a way another attempt can heal, the next attempt keeps those bytes and
asks for the rest: ``Range: bytes=N-`` with ``If-Range`` (the strong ``ETag``, else
``Last-Modified``; with neither, it starts over). Only a ``206`` whose ``Content-Range``
is exactly ``bytes N-(total-1)/total``, the total of the first answer, is appended; a
``200`` (the validator changed, or the server ignores ``Range``) starts over from the
first byte; anything else is a :class:`~fetchpool.errors.TransferError` and the next
attempt starts over.

Across runs (``resume=True``), the body goes into a partial file beside the target
(:func:`~fetchpool.storage.partial_path`) whose origin URL, validator and total are
recorded in extended attributes; a download that fails, is cancelled or is killed
leaves it there, and the next run with ``resume=True`` continues it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from .errors import HTTPStatusError, RedirectError, StorageError, TransferError
from .storage import Cancelled, TempFile

__all__ = ["RESUME_MIN", "Kept", "check_partial_reply", "range_headers", "validator_of"]

log = logging.getLogger("fetchpool")

#: A broken body is kept for the next attempt from this many bytes in its file.
RESUME_MIN: Final = 1024 * 1024
_CONTENT_RANGE: Final = re.compile(r"bytes[ \t]+([0-9]+)-([0-9]+)/([0-9]+)", re.ASCII)
_REPLACED: Final = frozenset({"range", "if-range", "accept-encoding"})


def validator_of(headers: Mapping[str, str]) -> str | None:
    """Return what ``If-Range`` may send for the body of a response with ``headers``.

    The ``ETag`` if it is strong (a weak one, ``W/"..."``, is not allowed in
    ``If-Range``), else ``Last-Modified``, else ``None`` (the body cannot be resumed).
    """
    etag = (headers.get("ETag") or "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    modified = (headers.get("Last-Modified") or "").strip()
    return modified or None


def range_headers(headers: Mapping[str, str], offset: int, validator: str) -> dict[str, str]:
    """Return the request headers asking for the body from byte ``offset`` on.

    An encoded body cannot be resumed (its byte offsets are not the file's): the rest
    is asked for as it is stored, whatever ``Accept-Encoding`` the caller gave.
    """
    sent = {name: value for name, value in headers.items() if name.lower() not in _REPLACED}
    sent["Accept-Encoding"] = "identity"
    sent["Range"] = f"bytes={offset}-"
    sent["If-Range"] = validator
    return sent


def check_partial_reply(headers: Mapping[str, str], offset: int, total: int, shown: str) -> None:
    """Check that a ``206`` answer is the rest of the body from byte ``offset`` on.

    Raises:
        TransferError: its ``Content-Range`` is missing, unparsable, or not exactly
            ``bytes offset-(total-1)/total``; its body is encoded; or its
            ``Content-Length`` is not the rest's length. Retryable: the next attempt
            starts over from the first byte.
    """
    raw = headers.get("Content-Range")
    found = None if raw is None else _CONTENT_RANGE.fullmatch(raw.strip())

    def wrong(why: str) -> TransferError:
        return TransferError(
            f"cannot resume {shown} at byte {offset} of {total}: {why}; starting over",
            url=shown,
        )

    if found is None:
        what = "no Content-Range" if raw is None else f"Content-Range {raw[:60]!r}"
        raise wrong(f"the 206 answer has {what}")
    start, end, size = (int(part) for part in found.groups())
    if start != offset or end != total - 1 or size != total:
        raise wrong(f"the 206 answer is for bytes {start}-{end}/{size}")
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise wrong(f"the 206 answer is encoded ({encoding[:40]})")
    length = headers.get("Content-Length")
    if length is not None and length.strip() != str(total - offset):
        raise wrong(f"the 206 answer has Content-Length {length[:40]!r}")


def _healable(exc: BaseException) -> bool:
    """Whether the bytes written before ``exc`` are still good to continue from."""
    if isinstance(exc, TransferError):
        # A broken or cancelled transfer; not malformed framing or an encoding refused.
        return exc.retryable or exc.cancelled
    if isinstance(exc, HTTPStatusError | RedirectError | Cancelled):
        return True
    # KeyboardInterrupt, GeneratorExit (a closed step): the bytes are good. A checksum,
    # a size limit, a storage failure or a bug: they are not.
    return not isinstance(exc, Exception)


class Kept:
    """One download's body as far as its file holds it, kept between its attempts.

    Args:
        partial: the partial file to write into (``resume=True``), or ``None`` for
            a temporary file that lives only as long as the download.

    Attributes:
        tmp: the file, or ``None`` before the first body (or once dropped).
        validator: what ``If-Range`` sends for the body it holds, or ``None``.
        total: the size of the whole body, or ``None`` when unknown (or encoded).
        recorded: a partial file records what it holds (it may outlive the run).
        resumed: an attempt appended to bytes kept from before.
    """

    __slots__ = ("partial", "recorded", "resumed", "tmp", "total", "validator")

    def __init__(self, partial: Path | None) -> None:
        self.partial = partial
        self.tmp: TempFile | None = None
        self.validator: str | None = None
        self.total: int | None = None
        self.recorded = False
        self.resumed = False

    @property
    def offset(self) -> int:
        """The byte to ask for the body from, or 0 (ask for all of it)."""
        tmp, total = self.tmp, self.total
        if tmp is None or self.validator is None or total is None:
            return 0
        return tmp.size if 0 < tmp.size < total else 0

    def start(self, tmp: TempFile, validator: str | None, total: int | None) -> None:
        """Hold ``tmp``, empty, for a body with ``validator`` and size ``total``."""
        self.tmp, self.validator, self.total = tmp, validator, total
        self.recorded = False

    def settle(self, exc: BaseException) -> None:
        """An attempt writing the body failed with ``exc``: keep its bytes or drop them.

        Kept if ``exc`` leaves them good and there are at least :data:`RESUME_MIN` of
        them, with a validator and the total known; the file is then cut back to what
        was written (a direct sink allocates ahead).
        """
        tmp = self.tmp
        if tmp is None:
            return
        if _healable(exc) and self.offset >= RESUME_MIN:
            try:
                tmp.trim()
            except StorageError:
                log.debug("cannot keep the bytes of a broken body", exc_info=True)
            else:
                return
        self.drop()

    def drop(self) -> None:
        """Forget the bytes held: the next attempt starts over (a partial file goes too)."""
        tmp, self.tmp = self.tmp, None
        self.validator = self.total = None
        if tmp is not None:
            tmp.discard()

    def finish(self, shown: str) -> None:
        """The download ended: a partial file worth continuing stays, anything else goes.

        After a commit the file is at its final name: nothing is left to do.
        """
        offset, tmp, self.tmp = self.offset, self.tmp, None
        if tmp is None:
            return
        if tmp.persistent and self.recorded and offset >= RESUME_MIN:
            tmp.keep()
            log.info(
                "kept %d of %d bytes of %s in %s (resume=True continues it)",
                offset,
                self.total,
                shown,
                self.partial,
            )
        else:
            tmp.discard()
