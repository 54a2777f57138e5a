"""What a file must be: its expected size and hashes, and checking a body against them.

The hashes are computed while the body streams into its temporary file
(:class:`~fetchpool.storage.TempFile` feeds a :class:`Digests`), never by reading the
file again; a file found at the final name with ``overwrite="skip"`` is read once
(:func:`hash_file`), and only if its size is right.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from .errors import ChecksumError, StorageError

__all__ = [
    "ALGORITHMS",
    "Digests",
    "Expected",
    "check_hex",
    "check_size",
    "feed_file",
    "hash_file",
]

Algorithm = Literal["sha256", "md5"]
#: The hashes a caller may give, with the length of their hex digests.
ALGORITHMS: Final[dict[Algorithm, int]] = {"sha256": 64, "md5": 32}
_HEX: Final = re.compile(r"[0-9a-fA-F]*")
#: How much of a file :func:`hash_file` reads at a time.
_READ_BLOCK: Final = 1024 * 1024


def check_hex(algorithm: Algorithm, value: object) -> str:
    """Return ``value`` as a lower-case hex digest of ``algorithm``.

    Raises:
        TypeError: not a string.
        ValueError: not ``ALGORITHMS[algorithm]`` hex digits.
    """
    if not isinstance(value, str):
        raise TypeError(f"{algorithm} must be a hex string, not {type(value).__name__}")
    length = ALGORITHMS[algorithm]
    if len(value) != length or not _HEX.fullmatch(value):
        raise ValueError(f"{algorithm} must be {length} hex digits, not {value[:80]!r}")
    return value.lower()


def check_size(value: object) -> int:
    """Return ``value`` as an expected size in bytes.

    Raises:
        TypeError: not an int (``bool`` is refused too).
        ValueError: negative.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"size must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"size must be >= 0, not {value}")
    return value


class Digests:
    """The hashes of a body, fed as it is written.

    Args:
        algorithms: the hashes to compute (``"sha256"``, ``"md5"``).
    """

    __slots__ = ("_hashes",)

    def __init__(self, algorithms: tuple[Algorithm, ...]) -> None:
        # usedforsecurity=False: md5 here checks integrity, and FIPS builds allow that.
        self._hashes = [(name, hashlib.new(name, usedforsecurity=False)) for name in algorithms]

    def update(self, data: bytes | memoryview | bytearray) -> None:
        """Feed the next bytes of the body."""
        for _, hasher in self._hashes:
            hasher.update(data)

    def fresh(self) -> Digests:
        """Return new hashers of the same algorithms, fed nothing yet."""
        return Digests(tuple(name for name, _ in self._hashes))

    def hexdigests(self) -> dict[Algorithm, str]:
        """Return ``{algorithm: hex digest}`` of everything fed so far."""
        return {name: hasher.hexdigest() for name, hasher in self._hashes}


@dataclass(frozen=True)
class Expected:
    """What a caller said a file must be (from :class:`~fetchpool.Item`).

    Build it with :meth:`of`, which gives ``None`` when nothing is expected: a download
    without expectations then costs nothing more than before.

    Attributes:
        sha256, md5: lower-case hex digests, or ``None``.
        size: the size in bytes, or ``None``.
        algorithms: the hashes to compute, in a stable order.
    """

    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    @property
    def algorithms(self) -> tuple[Algorithm, ...]:
        """The hashes to compute, ``()`` if only the size is expected."""
        found: list[Algorithm] = []
        if self.sha256 is not None:
            found.append("sha256")
        if self.md5 is not None:
            found.append("md5")
        return tuple(found)

    @classmethod
    def of(cls, sha256: str | None, md5: str | None, size: int | None) -> Expected | None:
        """Return the expectations, or ``None`` if all three are ``None`` (already checked)."""
        if sha256 is None and md5 is None and size is None:
            return None
        return cls(sha256, md5, size)

    def digests(self) -> Digests | None:
        """Return fresh hashers for a body, or ``None`` when no hash is expected."""
        algorithms = self.algorithms
        return Digests(algorithms) if algorithms else None

    def size_error(self, actual: int, shown: str, what: str) -> ChecksumError | None:
        """Return the error of a wrong size, or ``None`` if ``actual`` is right.

        Args:
            actual: the size found.
            shown: the URL as messages show it.
            what: the words before the size found in the message (``"got"``...).
        """
        if self.size is None or actual == self.size:
            return None
        return ChecksumError(
            f"size mismatch for {shown}: expected {self.size} bytes, {what} {actual}",
            url=shown,
            algorithm="size",
            expected=self.size,
            actual=actual,
        )

    def digest_error(
        self, found: Mapping[Algorithm, str], shown: str, what: str
    ) -> ChecksumError | None:
        """Return the error of the first hash in ``found`` that differs, or ``None``."""
        for algorithm, actual in found.items():
            expected = getattr(self, algorithm)
            if expected is not None and actual != expected:
                return ChecksumError(
                    f"{algorithm} mismatch for {shown}: expected {expected}, {what} {actual}",
                    url=shown,
                    algorithm=algorithm,
                    expected=expected,
                    actual=actual,
                )
        return None


def hash_file(path: Path, algorithms: tuple[Algorithm, ...], shown: str) -> dict[Algorithm, str]:
    """Hash the regular file at ``path`` (a symlink there is not followed).

    It may take long for a big file: a driver runs it off its loop (a ``Block`` step).

    Raises:
        StorageError: the file cannot be read.
    """
    digests = Digests(algorithms)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            feed_file(fd, digests)
        finally:
            os.close(fd)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StorageError(
            f"cannot read {path} to check it ({shown}): {reason}", url=shown, errno=exc.errno
        ) from exc
    return digests.hexdigests()


def feed_file(fd: int, digests: Digests, size: int | None = None) -> None:
    """Feed ``digests`` the file open as ``fd``, from its start: ``size`` bytes, or all.

    Reads at offsets (``pread``): the descriptor's own offset is left as it is.

    Raises:
        OSError: the file cannot be read, or holds fewer than ``size`` bytes.
    """
    buffer = bytearray(_READ_BLOCK)
    view = memoryview(buffer)
    offset = 0
    while size is None or offset < size:
        want = _READ_BLOCK if size is None else min(_READ_BLOCK, size - offset)
        count = os.preadv(fd, [view[:want]], offset)
        if count == 0:
            if size is None:
                return
            raise OSError(errno.EIO, f"the file ended at byte {offset} of {size}")
        digests.update(view[:count])
        offset += count
