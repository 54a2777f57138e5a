"""The local side: per-file locks, temporary files and atomic replacement.

DESIGN rules 1 and 2: bytes stream into a temporary file in the target's directory
and reach the final name only through ``os.replace``; one writer at a time per final
path, across threads (an in-process lock) and processes (``flock`` on a lock file).
Lock and temporary files are named ``.fetchpool-<key>.lock`` and
``.fetchpool-<key>-<random>.part`` where ``<key>`` is derived from the final name; a
temporary file only exists while its writer holds the lock of the same key, so
:func:`sweep` can tell a dead writer's leftovers from live ones with no guessing
about process ids or ages.

POSIX only (``fcntl.flock``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .errors import StorageError
from .naming import RESERVED_PREFIX

__all__ = [
    "ORIGIN_XATTR",
    "Existing",
    "PathLock",
    "TempFile",
    "inspect_target",
    "lock_key",
    "supports_xattrs",
    "sweep",
]

#: The freedesktop attribute that records where a file came from (wget --xattr, browsers).
ORIGIN_XATTR: Final = "user.xdg.origin.url"
_LOCK_SUFFIX = ".lock"
_PART_SUFFIX = ".part"
_POLL_MIN = 0.002
_POLL_MAX = 0.05


class Cancelled(Exception):
    """Raised inside a worker when the downloader is cancelled while waiting."""


def lock_key(final: Path) -> str:
    """Return the key naming the lock and temporary files of ``final``."""
    return hashlib.sha256(os.fsencode(final.name)).hexdigest()[:20]


def _lock_path(directory: Path, key: str) -> Path:
    return directory / f"{RESERVED_PREFIX}{key}{_LOCK_SUFFIX}"


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class _ThreadLocks:
    """Refcounted in-process locks by key, so threads queue without polling flock."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start empty: in a forked child, the parent's threads and their locks are gone."""
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def get(self, key: str) -> threading.Lock:
        with self._mutex:
            lock, count = self._locks.get(key, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[key] = (lock, count + 1)
            return lock

    def put(self, key: str) -> None:
        with self._mutex:
            lock, count = self._locks[key]
            if count <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, count - 1)


_THREAD_LOCKS = _ThreadLocks()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_THREAD_LOCKS.reset)


class PathLock:
    """One writer at a time for a final path, across threads and processes.

    The lock file is removed on release; a waiter that locked a file which was
    removed meanwhile notices (it is no longer linked) and starts over, so two
    holders can never coexist.

    Args:
        directory: the directory of the final path.
        key: :func:`lock_key` of the final path.
        cancel: an event that aborts waiting with :class:`Cancelled`.
        url: for error messages.
        timeout: the longest wait for another writer (a stopped process may hold the
            lock forever); ``None`` waits as long as it takes.
    """

    def __init__(
        self,
        directory: Path,
        key: str,
        cancel: threading.Event | None = None,
        url: str = "",
        timeout: float | None = None,
    ) -> None:
        self.directory = directory
        self.key = key
        self._path = _lock_path(directory, key)
        self._tkey = f"{os.path.abspath(directory)}\0{key}"
        self._cancel = cancel
        self._url = url
        self._timeout = timeout
        self._give_up = float("inf")
        self._fd: int | None = None
        self._tlock: threading.Lock | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; return ``False`` only when ``blocking`` is false and it is busy.

        Raises:
            Cancelled: the cancel event was set while waiting.
            StorageError: the lock file cannot be created (read-only directory...), or
                another writer held it longer than ``timeout``.
        """
        if self._timeout is not None:
            self._give_up = time.monotonic() + self._timeout
        tlock = _THREAD_LOCKS.get(self._tkey)
        try:
            if blocking:
                while not tlock.acquire(timeout=0.1):
                    self._check_cancel()
            elif not tlock.acquire(blocking=False):
                _THREAD_LOCKS.put(self._tkey)
                return False
        except BaseException:
            _THREAD_LOCKS.put(self._tkey)
            raise
        try:
            fd = self._acquire_file(blocking)
        except BaseException:
            tlock.release()
            _THREAD_LOCKS.put(self._tkey)
            raise
        if fd is None:
            tlock.release()
            _THREAD_LOCKS.put(self._tkey)
            return False
        self._fd = fd
        self._tlock = tlock
        return True

    def _check_cancel(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled
        if time.monotonic() > self._give_up:
            raise StorageError(
                f"another writer held the lock of {self._url or self.directory} for more "
                f"than {self._timeout:g} s",
                url=self._url,
            )

    def _acquire_file(self, blocking: bool) -> int | None:
        delay = _POLL_MIN
        while True:
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise StorageError(
                    f"cannot create lock file in {self.directory}: {exc}",
                    url=self._url,
                    errno=exc.errno,
                ) from exc
            try:
                locked = _try_flock(fd)
                # Poll while another process holds it, but only as long as the file is
                # still the one at the path: a holder removes it before releasing, and
                # a forked child of that holder may keep the old lock alive.
                while not locked and blocking and self._same_file(fd):
                    self._check_cancel()
                    if self._cancel is not None:
                        self._cancel.wait(delay)
                    else:
                        threading.Event().wait(delay)
                    delay = min(delay * 2, _POLL_MAX)
                    locked = _try_flock(fd)
                # The file we locked must still be the one at the path (an inode
                # comparison; st_nlink would be fooled by NFS's silly-rename).
                if locked and self._same_file(fd):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if not locked and not blocking:
                return None

    def _same_file(self, fd: int) -> bool:
        held = os.fstat(fd)
        try:
            current = os.stat(self._path)
        except FileNotFoundError:
            return False
        return (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        """Release the lock and remove the lock file."""
        fd, tlock = self._fd, self._tlock
        self._fd = self._tlock = None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            os.close(fd)
        if tlock is not None:
            tlock.release()
            _THREAD_LOCKS.put(self._tkey)

    def __enter__(self) -> PathLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class Existing:
    """What stands at a final path.

    Attributes:
        kind: ``"none"`` (nothing, or a symlink, which is replaced rather than
            followed), ``"file"`` (a regular file) or ``"other"`` (a directory...).
        size: the file's size.
        origin: the URL recorded in its ``user.xdg.origin.url``, or ``None``.
    """

    kind: str
    size: int = 0
    origin: str | None = None


def inspect_target(final: Path) -> Existing:
    """Look at ``final`` without following a symlink there."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return Existing("none")
    except NotADirectoryError:
        return Existing("other")
    if stat.S_ISLNK(st.st_mode):
        return Existing("none")
    if not stat.S_ISREG(st.st_mode):
        return Existing("other")
    return Existing("file", st.st_size, read_origin(final))


def read_origin(path: Path) -> str | None:
    """Return the origin URL recorded on ``path``, or ``None`` if there is none."""
    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:
        return None
    try:
        value: bytes = getxattr(path, ORIGIN_XATTR, follow_symlinks=False)
    except OSError:
        return None
    return value.decode("utf-8", "replace")


class TempFile:
    """A temporary file beside a final path, committed with ``os.replace``.

    Create it only while holding the :class:`PathLock` of the same key. It is created
    with mode ``0o666`` so the final file gets the process umask's permissions.

    Raises:
        StorageError: any local failure (disk full, permission...), with the errno.
    """

    def __init__(self, directory: Path, key: str, url: str = "") -> None:
        self._url = url
        self.path = directory / f"{RESERVED_PREFIX}{key}-{secrets.token_hex(6)}{_PART_SUFFIX}"
        self.size = 0
        try:
            self._fd: int | None = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666
            )
        except OSError as exc:
            raise self._error("cannot create a file in", directory, exc) from exc

    def _error(self, what: str, where: Path, exc: OSError) -> StorageError:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return StorageError(f"{what} {where}: {reason}", url=self._url, errno=exc.errno)

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``."""
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            raise self._error("cannot write to", self.path.parent, exc) from exc
        self.size += len(data)

    def commit(self, final: Path, origin: str | None, fsync: bool) -> bool:
        """Move the file to ``final`` atomically.

        Args:
            final: the final path; a symlink there is replaced, not followed.
            origin: the URL to record in ``user.xdg.origin.url``, if any.
            fsync: flush the file and its directory to disk first.

        Returns:
            Whether the origin was recorded (``False`` where xattrs are unsupported).
        """
        assert self._fd is not None
        recorded = False
        try:
            if origin is not None:
                recorded = _set_origin(self._fd, origin)
            if fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.path, final)
            if fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            self.discard()
            raise self._error("cannot store the file in", final.parent, exc) from exc
        return recorded

    def discard(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _set_origin(fd: int, origin: str) -> bool:
    setxattr = getattr(os, "setxattr", None)
    if setxattr is None:
        return False
    try:
        setxattr(fd, ORIGIN_XATTR, origin.encode("utf-8", "surrogatepass"))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.E2BIG, errno.ERANGE):
            return False
        raise
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def supports_xattrs(directory: Path) -> bool:
    """Return whether files in ``directory`` can carry user extended attributes."""
    if getattr(os, "setxattr", None) is None:
        return False
    # A key of its own: nobody else can hold it, and sweepers leave the probe alone.
    key = secrets.token_hex(10)
    lock = PathLock(directory, key)
    try:
        lock.acquire()
    except StorageError:
        return False
    try:
        try:
            tmp = TempFile(directory, key)
        except StorageError:
            return False
        try:
            assert tmp._fd is not None
            return _set_origin(tmp._fd, "probe")
        except OSError:
            return False
        finally:
            tmp.discard()
    finally:
        lock.release()


def _reserved_entries(directory: Path) -> Iterator[tuple[str, str]]:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not name.startswith(RESERVED_PREFIX):
            continue
        body = name[len(RESERVED_PREFIX) :]
        if name.endswith(_LOCK_SUFFIX):
            yield body[: -len(_LOCK_SUFFIX)], name
        elif name.endswith(_PART_SUFFIX):
            yield body[: -len(_PART_SUFFIX)].rpartition("-")[0], name


def sweep(directory: Path) -> int:
    """Remove the temporary and lock files of dead writers in ``directory``.

    A temporary file exists only while its writer holds the lock of its key, so one
    whose lock can be taken belongs to a writer that died (SIGKILL, power loss).

    Returns:
        How many leftover files were removed.
    """
    by_key: dict[str, list[str]] = {}
    for key, name in _reserved_entries(directory):
        if key:
            by_key.setdefault(key, []).append(name)
    removed = 0
    for key, names in by_key.items():
        lock = PathLock(directory, key)
        try:
            if not lock.acquire(blocking=False):
                continue
        except StorageError:
            return removed
        try:
            for name in names:
                if name.endswith(_PART_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(directory / name)
                        removed += 1
        finally:
            # Releasing removes the (stale) lock file too.
            lock.release()
    return removed
