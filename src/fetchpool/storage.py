"""The local side: per-file locks, temporary files and atomic replacement.

DESIGN rules 1 and 2: bytes stream into a temporary file in the target's directory
and reach the final name only when complete, atomically (``linkat`` of an unnamed
file, or ``os.replace``); one writer at a time per final path, across threads (an
in-process lock) and processes (a POSIX record lock).

Every key (derived from the final name) has one byte of ``.fetchpool-locks``, the
directory's shared lock file, at an offset given by the key. One file per directory,
kept open while the process uses it, instead of a lock file created and removed per
download: those were journaled directory operations that concurrent writers contend
for, and they cost more than everything else fetchpool adds to a transfer. Each process
that has the file open holds a shared lock on its byte 0 (its presence), so the file is
removed only by the last process to leave it (see :class:`Pins`), and a key lock never
needs to check that its file is still the one in the directory.

Temporary files are unnamed where the filesystem allows (``O_TMPFILE``): the kernel
frees them with their writer. Named ones (the fallback, and the moment before a file
replaces another) are ``.fetchpool-<key>-<random>.part`` and only exist while their
writer holds the key's lock, so :func:`sweep` can tell a dead writer's leftovers from
live ones with no guessing about process ids or ages.

POSIX only (``fcntl.lockf``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import logging
import os
import random
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from .checksums import Digests, feed_file
from .errors import StorageError
from .naming import PARTIAL_SUFFIX, RESERVED_PREFIX

__all__ = [
    "LOCK_FILE_NAME",
    "ORIGIN_XATTR",
    "PARTIAL_SUFFIX",
    "Existing",
    "PartialRecord",
    "PathLock",
    "Pins",
    "TempFile",
    "child_path",
    "inspect_target",
    "lock_key",
    "partial_path",
    "read_partial",
    "supports_xattrs",
    "sweep",
]

log = logging.getLogger("fetchpool")

#: The freedesktop attribute that records where a file came from (wget --xattr, browsers).
ORIGIN_XATTR: Final = "user.xdg.origin.url"
#: The shared lock file of a directory (a reserved name: no download can take it).
LOCK_FILE_NAME: Final = f"{RESERVED_PREFIX}locks"
_PART_SUFFIX = ".part"
# A partial file (resume=True) is ".<final name>" and PARTIAL_SUFFIX, beside the final
# file. The sweep leaves these alone: they outlive their writer on purpose.
#: What a partial file records, beside its origin URL: the validator to send in
#: ``If-Range``, and the size of the whole body.
VALIDATOR_XATTR: Final = "user.fetchpool.validator"
TOTAL_XATTR: Final = "user.fetchpool.total"
_NAME_MAX = 255
_POLL_MIN = 0.002
_POLL_MAX = 0.05
_PRESENCE_TRIES = 1000


class _Digest(Protocol):
    def hexdigest(self) -> str: ...


def _builtin_sha256() -> Callable[[bytes], _Digest]:
    # Python's own SHA-256 where it has one: the same digests as OpenSSL's, without
    # OpenSSL 3 fetching the algorithm anew for each of the two hashes a file takes.
    # CPython's are C; PyPy's are Python, slower than its hashlib.
    names = ("_sha2", "_sha256") if sys.implementation.name == "cpython" else ()
    for name in names:  # 3.12+, then 3.10 and 3.11
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        sha256: Callable[[bytes], _Digest] = module.sha256
        return sha256
    return hashlib.sha256  # a build without them


_sha256 = _builtin_sha256()
_STR_ON_FIRST_USE = sys.version_info < (3, 12)
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


class Cancelled(Exception):
    """Raised inside a worker when the downloader is cancelled while waiting."""


def child_path(directory: Path, name: str) -> Path:
    """Return ``directory / name`` without interning ``name``.

    pathlib before 3.14 passes every part it parses to ``sys.intern``. A download makes
    names that are never seen again (a file name, a temporary name), so each one went
    through the interpreter's table of interned strings: on 3.12 interned strings are
    immortal, so every name leaked (python/cpython#113993, #121780); on 3.10, 3.11 and
    3.13 they are freed, but the table is reallocated (about 1 MiB) every few tens of
    thousands of names, in whichever thread's malloc arena, and the freed tables
    fragment the arenas: peak RSS crept up with the number of URLs ``map()`` saw.

    Args:
        directory: the parent directory.
        name: one path component (no separator), already sanitised.

    Returns:
        A path equal to ``directory / name``.
    """
    # 3.10-3.12: the helper iterdir() uses to make children from parsed parts. Private,
    # but those lines are frozen; on 3.13+ it is gone and with_name() no longer interns.
    make_child = getattr(directory, "_make_child_relpath", None)
    if make_child is not None:
        child: Path = make_child(name)
        if _STR_ON_FIRST_USE:
            # 3.10 and 3.11 make a path's string when first asked, by raising and
            # catching an AttributeError (a microsecond and more, once a file): given
            # here, as 3.12's helper gives it, it is the string they would make.
            where = str(directory)
            if where == ".":
                where = name
            elif where[-1:] == "/":
                where += name
            else:
                where = f"{where}/{name}"
            child._str = where  # type: ignore[attr-defined]
        return child
    # "_" is interned already (a constant) and stays so: no table churn.
    return directory.joinpath("_").with_name(name)


def lock_key(final: Path) -> str:
    """Return the key naming the lock and temporary files of ``final``."""
    # os.fsencode(final.name), without its two Python calls (one a file): str(final) is
    # made once and kept, and a path's name is what follows its last separator.
    name = str(final).rpartition(os.sep)[2]
    return _sha256(name.encode(_FS_ENCODING, _FS_ERRORS)).hexdigest()[:20]


def _offset(key: str) -> int:
    # 60 bits of a hash of the key: two names sharing a byte is as unlikely as a hash
    # collision, and the offset stays far inside off_t. Byte 0 is the presence lock.
    return 1 + int(_sha256(key.encode()).hexdigest()[:15], 16)


def _try_lock(fd: int, offset: int, length: int = 1, mode: int = fcntl.LOCK_EX) -> bool:
    try:
        fcntl.lockf(fd, mode | fcntl.LOCK_NB, length, offset)
    except OSError as exc:
        # EACCES is what some systems return instead of EAGAIN for a held lock.
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _unlock(fd: int, offset: int, length: int = 1) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN, length, offset)


def _same_file(fd: int, path: str) -> bool:
    """Whether ``fd`` is still the file at ``path`` (inodes; st_nlink lies on NFS)."""
    held = os.fstat(fd)
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)


class _ThreadLocks:
    """Refcounted in-process locks by key, so threads queue without polling the file."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start empty: in a forked child, the parent's threads and their locks are gone."""
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def take(self, key: str) -> threading.Lock | None:
        """The key's lock, taken, if no thread has it or waits for it; else ``None``."""
        with self._mutex:
            if key in self._locks:
                return None
            lock = threading.Lock()
            lock.acquire()
            self._locks[key] = (lock, 1)
            return lock

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


class _LockFile:
    """A directory's lock file as this process has it open."""

    __slots__ = ("fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0


class _LockFiles:
    """The process's open lock files, one per directory, shared by all its key locks.

    POSIX record locks belong to the process, and closing *any* descriptor of a file
    drops all of the process's locks on it: so a directory's file is opened once and
    closed only when no thread uses it. While open, the process holds a shared lock on
    byte 0. The file is removed from the directory when its last user here leaves,
    nobody pins the directory, and a whole-file lock proves that no other process has
    it open; one that opens it just then finds it unlinked once it has its presence
    lock, and opens the new one.
    """

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        self._mutex = threading.Lock()
        self._open: dict[str, _LockFile] = {}
        self._pins: dict[str, int] = {}

    def reset(self) -> None:
        """Forget the parent's files in a forked child (its locks were not inherited)."""
        for entry in self._open.values():
            with contextlib.suppress(OSError):
                os.close(entry.fd)
        self._start()

    def checkout(self, path: str) -> _LockFile:
        """Return the open lock file at ``path``, opening (creating) it if needed.

        Raises:
            OSError: it cannot be created, or locked.
        """
        with self._mutex:
            entry = self._open.get(path)
            if entry is None:
                entry = _LockFile(_open_present(path))
                self._open[path] = entry
            entry.users += 1
            return entry

    def checkin(self, path: str, entry: _LockFile) -> None:
        """Stop using ``entry``; the last user closes it, and removes it if unused."""
        with self._mutex:
            entry.users -= 1
            if entry.users > 0 or self._pins.get(path, 0) > 0:
                return
            del self._open[path]
            _close_and_remove_if_unused(path, entry.fd)

    def pin(self, path: str) -> None:
        with self._mutex:
            self._pins[path] = self._pins.get(path, 0) + 1

    def unpin(self, path: str) -> None:
        with self._mutex:
            count = self._pins.pop(path, 0) - 1
            if count > 0:
                self._pins[path] = count
                return
            entry = self._open.get(path)
            if entry is not None and entry.users > 0:
                return
            if entry is not None:
                del self._open[path]
                fd = entry.fd
            else:
                # A file left by a killed process: opening a second descriptor is safe
                # here only because this process has no lock in it.
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except OSError:
                    return
            _close_and_remove_if_unused(path, fd)


def _open_present(path: str) -> int:
    """Open (create) the lock file at ``path`` and take this process's presence lock."""
    for _ in range(_PRESENCE_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            # Fails only while another process is removing the file.
            if _try_lock(fd, 0, 1, fcntl.LOCK_SH) and _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        time.sleep(0.001)
    raise OSError(errno.EAGAIN, f"{path} kept being removed while being opened")


def _close_and_remove_if_unused(path: str, fd: int) -> None:
    # Called with no key lock of this process in the file (its own presence lock does
    # not conflict): a whole-file lock succeeds only if no other process has it open.
    # Unlinked before the close, which drops that lock.
    with contextlib.suppress(OSError):
        if _try_lock(fd, 0, 0) and _same_file(fd, path):
            os.unlink(path)
    os.close(fd)


_THREAD_LOCKS = _ThreadLocks()
_LOCK_FILES = _LockFiles()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_THREAD_LOCKS.reset)
    os.register_at_fork(after_in_child=_LOCK_FILES.reset)


#: Directory -> the path of its lock file, for absolute directories (a relative one's
#: follows the working directory). Every download asks (abspath costs more than the
#: lock itself); bounded like :data:`_UNNAMED_OK`: past the limit it starts again.
_LOCK_PATHS: dict[str, str] = {}
_LOCK_PATHS_MAX = 1024


def _lock_file_path(directory: Path) -> str:
    where = str(directory)
    path = _LOCK_PATHS.get(where)
    if path is None:
        path = os.path.join(os.path.abspath(where), LOCK_FILE_NAME)
        if os.path.isabs(where):
            if len(_LOCK_PATHS) >= _LOCK_PATHS_MAX:
                _LOCK_PATHS.clear()
            _LOCK_PATHS[where] = path
    return path


class Pins:
    """Directories whose lock files stay open until :meth:`release` (a Downloader's).

    Without a pin, a directory's lock file is removed whenever its last lock is
    released, to be created again by the next one.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._paths: list[str] = []

    def add(self, directory: Path) -> None:
        """Pin ``directory`` until :meth:`release`."""
        path = _lock_file_path(directory)
        with self._mutex:
            _LOCK_FILES.pin(path)
            self._paths.append(path)

    def release(self) -> None:
        """Unpin everything (idempotent); lock files nobody uses any more are removed."""
        with self._mutex:
            paths, self._paths = self._paths, []
        for path in paths:
            _LOCK_FILES.unpin(path)


class PathLock:
    """One writer at a time for a final path, across threads and processes.

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
        self._path = _lock_file_path(directory)
        self._offset = _offset(key)
        self._tkey = f"{self._path}\0{key}"
        self._cancel = cancel
        self._url = url
        self._timeout = timeout
        self._give_up = float("inf")
        self._entry: _LockFile | None = None
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
        if blocking:
            tlock = _THREAD_LOCKS.get(self._tkey)
            try:
                while not tlock.acquire(timeout=0.1):
                    self._check_cancel()
            except BaseException:
                _THREAD_LOCKS.put(self._tkey)
                raise
        else:
            # Busy also where another thread only waits for it: it would be next.
            taken = _THREAD_LOCKS.take(self._tkey)
            if taken is None:
                return False
            tlock = taken
        try:
            entry = self._acquire_file(blocking)
        except BaseException:
            tlock.release()
            _THREAD_LOCKS.put(self._tkey)
            raise
        if entry is None:
            tlock.release()
            _THREAD_LOCKS.put(self._tkey)
            return False
        self._entry = entry
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

    def _wait(self, delay: float) -> None:
        self._check_cancel()
        if self._cancel is not None:
            self._cancel.wait(delay)
        else:
            threading.Event().wait(delay)

    def _acquire_file(self, blocking: bool) -> _LockFile | None:
        try:
            entry = _LOCK_FILES.checkout(self._path)
        except OSError as exc:
            raise StorageError(
                f"cannot create or lock the lock file in {self.directory}: {exc}",
                url=self._url,
                errno=exc.errno,
            ) from exc
        try:
            locked = _try_lock(entry.fd, self._offset)
            delay = _POLL_MIN
            # Another process holds it: poll, as a blocking lock could not be cancelled.
            while not locked and blocking:
                self._wait(delay)
                delay = min(delay * 2, _POLL_MAX)
                locked = _try_lock(entry.fd, self._offset)
        except BaseException as exc:
            # Nothing here raises once the lock is taken: there is none to undo.
            _LOCK_FILES.checkin(self._path, entry)
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                # A filesystem without record locks (ENOLCK on some network mounts).
                raise StorageError(
                    f"cannot lock a file in {self.directory}: {exc}",
                    url=self._url,
                    errno=exc.errno,
                ) from exc
            raise
        if not locked:
            _LOCK_FILES.checkin(self._path, entry)
            return None
        return entry

    @property
    def held(self) -> bool:
        """Whether the lock is held (acquired, and not released since)."""
        return self._tlock is not None

    def release(self) -> None:
        """Release the lock."""
        entry, tlock = self._entry, self._tlock
        self._entry = self._tlock = None
        if entry is not None:
            try:
                _unlock(entry.fd, self._offset)
            except OSError:  # not contextlib.suppress: three Python calls, every file
                pass
            _LOCK_FILES.checkin(self._path, entry)
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


_NOTHING = Existing("none")
_OTHER = Existing("other")


def inspect_target(final: Path | str) -> Existing:
    """Look at ``final`` without following a symlink there."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return _NOTHING
    except NotADirectoryError:
        return _OTHER
    if stat.S_ISLNK(st.st_mode):
        return _NOTHING
    if not stat.S_ISREG(st.st_mode):
        return _OTHER
    return Existing("file", st.st_size, read_origin(final))


def read_origin(path: Path | str) -> str | None:
    """Return the origin URL recorded on ``path``, or ``None`` if there is none."""
    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:
        return None
    try:
        value: bytes = getxattr(path, ORIGIN_XATTR, follow_symlinks=False)
    except OSError:
        return None
    return value.decode("utf-8", "replace")


class _Creations:
    """What creating a file in one directory kept its thread waiting, of late."""

    __slots__ = ("asked", "untimed", "waited")

    def __init__(self, waited: float) -> None:
        self.waited = waited  # seconds off the CPU, smoothed: not the kernel's work
        self.untimed = 0  # creations since the last one timed
        self.asked = 0  # times it was judged slow


#: Directory -> what creating a file there cost of late.
_CREATION_COST: dict[str, _Creations] = {}
_CREATION_COST_MAX = 1024
#: Creating a file waits this long or more: it is worth a thread of its own.
SLOW_CREATION = 150e-6
_CREATION_SAMPLE_MAX = 2e-3
#: One creation in this many is timed in a directory (and its first): the estimate is
#: smoothed anyway, and a thread's CPU clock costs a system call.
_TIMED_EVERY = 8
#: Judged slow, a directory is said not to be one time in this many: a creation on the
#: driver's own thread is timed then, where the helper's (which waits for the GIL back
#: after its system call) could keep the directory judged slow for good.
_PROBE_EVERY = 16
_thread_time: Callable[[], float] = getattr(time, "thread_time", lambda: 0.0)


def _clocks() -> tuple[float, float]:
    """The wall clock, and this thread's CPU clock (0 where there is none)."""
    return time.perf_counter(), _thread_time()


def _creation_clocks(directory: Path) -> tuple[float, float] | None:
    """:func:`_clocks` before a creation in ``directory`` that is timed, else ``None``."""
    seen = _CREATION_COST.get(str(directory))
    if seen is not None and seen.untimed < _TIMED_EVERY - 1:
        seen.untimed += 1
        return None
    return _clocks()


def _waited(began: tuple[float, float]) -> float:
    """Seconds since ``began`` (:func:`_clocks`) this thread spent off the CPU."""
    wall, cpu = _clocks()
    return max(0.0, (wall - began[0]) - (cpu - began[1]))


def _note_creation(directory: Path, seconds: float) -> None:
    """Count a creation in ``directory`` that waited ``seconds``."""
    where = str(directory)
    # Smoothed over the last eight or so, each capped: a stall (the disk, a GIL wait)
    # counts as a slow creation, not as a hundred.
    seconds = min(seconds, _CREATION_SAMPLE_MAX)
    seen = _CREATION_COST.get(where)
    if seen is None:
        if len(_CREATION_COST) >= _CREATION_COST_MAX:
            _CREATION_COST.clear()
        _CREATION_COST[where] = _Creations(seconds)
        return
    seen.waited += (seconds - seen.waited) / 8
    seen.untimed = 0


def slow_to_create(directory: Path) -> bool:
    """Whether creating a file in ``directory`` kept the thread waiting of late (see
    :class:`TempFile`).

    Where creating a file waits (a network filesystem, a disk busy with other work), a
    driver running many downloads on one thread has it done on another, and goes on with
    the others meanwhile. Where it is the kernel's work instead (ext4 allocating an inode
    in a big directory: over half a millisecond of CPU on the test VM, against a few
    microseconds on tmpfs), it is not: another thread would take the same CPU, and the
    hand-offs cost more than they overlap (measured: 4.2-4.7 s against 3.5-4.3 s for 5,000
    images written to ext4 by the curl backend).
    """
    seen = _CREATION_COST.get(str(directory))
    if seen is None:
        return SLOW_CREATION <= 0.0  # never seen: as if it took no time
    if seen.waited < SLOW_CREATION:
        return False
    seen.asked += 1
    return seen.asked % _PROBE_EVERY != 0


class TempFile:
    """A temporary file beside a final path, committed atomically.

    Create it only while holding the :class:`PathLock` of the same key. Where the
    filesystem allows (Linux ``O_TMPFILE``), the file has no name until :meth:`commit`
    links it at the final one: a writer that dies leaves nothing behind, and the commit
    is one ``linkat`` instead of a create and a rename, the two directory operations that
    concurrent writers in one directory contend for. Where a file already stands at the
    final name, or ``O_TMPFILE`` is unsupported, the file is named
    ``.fetchpool-<key>-<random>.part`` and moved with ``os.replace``. It is created with
    mode ``0o666`` so the final file gets the process umask's permissions.

    A *partial* file (``partial=``, for ``resume=True``) is the named file
    ``.<final name>.fetchpool-partial`` instead, opened as it stands (created if
    missing): it outlives a failed download or a killed process, with what it holds
    recorded in extended attributes (:meth:`record`), so that a later run continues it.

    Args:
        directory: where to create it (the final path's directory).
        key: the :func:`lock_key` of the final path.
        url: the URL as messages show it.
        digests: hashers to feed every byte written, if the body's hash is wanted.
        partial: the partial file's path (:func:`partial_path`), or ``None``.
        unnamed: the descriptor of an unnamed file open already, to go on with
            (:func:`store_whole`'s; the caller sets :attr:`size`).

    Attributes:
        key: the key it was created for.
        path: its name, or ``None`` while it has none.
        persistent: it is a partial file, kept when a download fails.
        size: the bytes written so far (from its start, also for a body resumed).
        digests: the hashers fed by :meth:`write` and :meth:`splice_from`, or ``None``.
        hashing: whether this sink must see every byte of the body (``digests`` is
            set): a writer that would put bytes into the file some other way, not
            through :meth:`write` or :meth:`splice_from`, must not while it is true.

    Raises:
        StorageError: any local failure (disk full, permission...), with the errno.
    """

    def __init__(
        self,
        directory: Path,
        key: str,
        url: str = "",
        digests: Digests | None = None,
        partial: Path | None = None,
        *,
        unnamed: int | None = None,
    ) -> None:
        self._url = url
        self._directory = directory
        self.key = key
        self.path: Path | None = None
        self.persistent = partial is not None
        self.size = 0
        self.digests = digests
        self.hashing = digests is not None
        self._buffer: bytearray | None = None  # splice_from's, while hashing
        self._fd: int | None = unnamed
        if unnamed is not None:  # an unnamed file open already (store_whole's), taken on
            return
        began = _creation_clocks(directory)
        try:
            if partial is not None:
                self._fd = _open_partial(partial)
                self.path = partial
                return
            self._fd = _open_unnamed(directory) if UNNAMED else None
            if self._fd is None:
                self.path = self._new_name()
                self._fd = _create_named(self.path)
        except OSError as exc:
            raise self._error("cannot create a file in", directory, exc) from exc
        if began is not None:
            _note_creation(directory, _waited(began))

    def _new_name(self) -> Path:
        return _part_name(self._directory, self.key)

    def _error(self, what: str, where: Path, exc: OSError) -> StorageError:
        return _storage_error(what, where, self._url, exc)

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``."""
        assert self._fd is not None
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            raise self._error("cannot write to", self._directory, exc) from exc
        self.size += len(data)
        if self.digests is not None:
            self.digests.update(data)

    def splice_from(self, pipe_fd: int, count: int) -> None:
        """Append the next ``count`` bytes waiting in the pipe ``pipe_fd``.

        The pipe must already hold them: the caller moved them there. Where the
        filesystem cannot take a splice (``EINVAL``), they are read and written instead,
        and so they are while :attr:`hashing` (read, hashed, written: one copy through
        user memory, as cheap as a ``tee(2)`` into a second pipe read back for the hash).

        Args:
            pipe_fd: the read end of a pipe holding at least ``count`` bytes.
            count: how many bytes to move.

        Raises:
            StorageError: the file could not take them (disk full, I/O error...).
        """
        assert self._fd is not None
        if self.digests is not None:
            self._read_hash_write(pipe_fd, count, self.digests)
            return
        left = count
        try:
            while left:
                try:
                    moved = os.splice(pipe_fd, self._fd, left, flags=os.SPLICE_F_MOVE)
                except OSError as exc:
                    # Some filesystems (FUSE, old kernels) have no splice_write: the bytes
                    # are still in the pipe, so copy them through user memory.
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    data = os.read(pipe_fd, min(left, 1 << 20))
                    _write_all(self._fd, data)
                    moved = len(data)
                if moved == 0:
                    raise OSError(errno.EIO, "the pipe ran dry before the bytes it held")
                left -= moved
                self.size += moved
        except OSError as exc:
            raise self._error("cannot write to", self._directory, exc) from exc

    def trim(self, size: int | None = None) -> None:
        """Make the file hold its first ``size`` bytes (:attr:`size` by default), and
        write on from there.

        After a body broke, to keep what it wrote: a direct sink allocated the file
        beyond its last byte (:meth:`direct`). A partial file found from an earlier run
        is taken with its own size.

        Raises:
            StorageError: the file cannot be cut (an I/O error...).
        """
        assert self._fd is not None
        size = self.size if size is None else size
        try:
            os.ftruncate(self._fd, size)
            os.lseek(self._fd, size, os.SEEK_SET)
        except OSError as exc:
            raise self._error("cannot write to", self._directory, exc) from exc
        self.size = size

    def rehash(self) -> None:
        """Feed the hashers the :attr:`size` bytes the file holds (a partial file taken
        from an earlier run: its hashes must cover them before the rest comes).

        Raises:
            StorageError: the file cannot be read.
        """
        assert self._fd is not None
        if self.digests is None:
            return
        try:
            feed_file(self._fd, self.digests, self.size)
        except OSError as exc:
            raise self._error("cannot read", self._directory, exc) from exc

    def restart(self) -> None:
        """Empty the file (and its hashers) for a body that starts over from its first byte.

        Raises:
            StorageError: the file cannot be cut.
        """
        self.trim(0)
        if self.digests is not None:
            self.digests = self.digests.fresh()

    def record(self, origin: str, validator: str | None, total: int | None) -> bool:
        """Record on a partial file what it holds: the body of ``origin`` whose
        validator is ``validator`` and whole size ``total``.

        Without a validator or a size the file cannot be resumed: it records none, and
        :func:`read_partial` then ignores it (a file killed meanwhile is never taken).
        Call it on an empty file, before writing: the record never describes bytes that
        came before it.

        Returns:
            Whether it was recorded (``False`` where xattrs are unsupported).
        """
        assert self._fd is not None
        fd = self._fd
        try:
            _remove_xattr(fd, VALIDATOR_XATTR)
            if validator is None or total is None:
                return False
            return (
                _set_xattr(fd, ORIGIN_XATTR, origin)
                and _set_xattr(fd, TOTAL_XATTR, str(total))
                and _set_xattr(fd, VALIDATOR_XATTR, validator)
            )
        except OSError:
            return False

    def keep(self) -> None:
        """Close the file and leave it where it is (idempotent): a partial file, for a
        later run."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.path = None

    def direct(self, length: int) -> int | None:
        """Return a new descriptor of the file, its next ``length`` bytes allocated.

        The caller writes the body through it (a C-level writer, libcurl's, with no
        Python code per block), tells :meth:`wrote` what it wrote, and closes it. The
        bytes are allocated first so that the writer cannot fail on a full disk (it
        would have no way to say so but a traceback): the disk full is raised here. A
        descriptor of its own, not this one: the file may be discarded (this one closed,
        and its number given to another file) while the writer still holds it; its
        writes then land in the orphaned file. The file's size is ``length`` bytes past
        the current offset from here on, whatever is written.

        Returns:
            The descriptor (sharing this one's offset), or ``None`` while :attr:`hashing`
            (the hash must see every byte), where the filesystem cannot allocate ahead,
            or when no descriptor is left: :meth:`write` then serves.

        Raises:
            StorageError: no room for ``length`` more bytes (disk full, quota, file too
                large...), with the errno.
        """
        assert self._fd is not None
        if self.hashing or self.persistent:
            # A partial file must never be longer than what was written: a process killed
            # with it allocated ahead would leave zeros taken for the body's bytes.
            return None
        try:
            os.posix_fallocate(self._fd, os.lseek(self._fd, 0, os.SEEK_CUR), length)
        except OSError as exc:
            if exc.errno in _NO_FALLOCATE:
                return None
            raise self._error("cannot write to", self._directory, exc) from exc
        try:
            return os.dup(self._fd)
        except OSError:  # EMFILE, ENFILE: the caller writes through this one instead
            return None

    def wrote(self, count: int) -> None:
        """Count ``count`` bytes written through a descriptor :meth:`direct` gave."""
        self.size += count

    def _read_hash_write(self, pipe_fd: int, count: int, digests: Digests) -> None:
        """:meth:`splice_from` while hashing: the bytes pass through one reused buffer."""
        assert self._fd is not None
        if self._buffer is None:
            self._buffer = bytearray(_HASH_BLOCK)
        view = memoryview(self._buffer)
        left = count
        try:
            while left:
                got = os.readv(pipe_fd, [view[: min(left, _HASH_BLOCK)]])
                if got == 0:
                    raise OSError(errno.EIO, "the pipe ran dry before the bytes it held")
                # hashlib and write() both let go of the GIL for a block this big.
                digests.update(view[:got])
                _write_all(self._fd, view[:got])
                left -= got
                self.size += got
        except OSError as exc:
            raise self._error("cannot write to", self._directory, exc) from exc

    def commit(self, final: Path, origin: str | None, fsync: bool) -> bool:
        """Move the file to ``final`` atomically.

        Args:
            final: the final path, in the same directory; whatever stands there (a
                file, a symlink) is replaced, never written through.
            origin: the URL to record in ``user.xdg.origin.url``, if any.
            fsync: flush the file and its directory to disk first.

        Returns:
            Whether the origin was recorded (``False`` where xattrs are unsupported).
        """
        fd = self._fd
        assert fd is not None
        try:
            if self.persistent:
                _remove_xattr(fd, VALIDATOR_XATTR)
                _remove_xattr(fd, TOTAL_XATTR)
            recorded = _finish(fd, origin, fsync)
            if self.path is None:
                try:
                    if not _link_unnamed(fd, final):
                        # Something stands at the final name. Name the file, then replace.
                        # (linkat reports EEXIST before EXDEV/EPERM/EACCES: a refusal to
                        # link through /proc shows only here when the final name is taken.)
                        while self.path is None:
                            name = self._new_name()
                            if _link_unnamed(fd, name):
                                self.path = name
                except OSError as exc:
                    if exc.errno not in _CANNOT_LINK:
                        raise
                    fd = self._copy_to_named(fd)
                    recorded = _finish(fd, origin, fsync)
                    # Only now: a directory removed or made unwritable meanwhile fails
                    # the copy too, and must not switch the whole process to named files.
                    _stop_unnamed(self._directory, exc)
            self._fd = None
            os.close(fd)
            if self.path is not None:
                os.replace(self.path, final)
                self.path = None
            if fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            self.discard()
            raise self._error("cannot store the file in", final.parent, exc) from exc
        return recorded

    def _copy_to_named(self, fd: int) -> int:
        """Copy the unnamed file open as ``fd`` to a named one; return the new descriptor."""
        path = self._new_name()
        # fd is closed below whatever happens: discard() must not close its number again
        # (another thread may have been given it by then).
        self._fd = None
        try:
            named = _create_named(path)
            # discard() cleans up the named file from here on.
            self._fd, self.path = named, path
            offset = 0
            while offset < self.size:
                copied = os.sendfile(named, fd, offset, self.size - offset)
                if copied == 0:
                    raise OSError(errno.EIO, "the temporary file shrank while copied")
                offset += copied
        finally:
            os.close(fd)
        return named

    def discard(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        path = self.path
        self.keep()
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def store_whole(
    directory: Path,
    key: str,
    url: str,
    data: bytes,
    final: Path,
    origin: str | None,
    written: Callable[[], object] | None = None,
) -> bool:
    """Store ``data`` at ``final`` atomically, as a :class:`TempFile` written with it and
    committed (no fsync, no hashes); return whether ``origin`` was recorded.

    For a body whole in memory, in a few system calls and no object: an unnamed file,
    written, its origin set, linked at ``final``. Where the directory takes no unnamed
    files, the name is taken meanwhile or links through ``/proc`` are refused, the
    :class:`TempFile` way goes on from where this got (and says the same errors).

    Args:
        directory: ``final``'s directory.
        key: the :func:`lock_key` of ``final`` (its lock held).
        url: the URL as messages show it.
        data: the whole file.
        final: where it goes; whatever stands there is replaced, never written through.
        origin: the URL to record in ``user.xdg.origin.url``, if any.
        written: called once the data is written, before the file is stored (as the
            progress event of a body written comes before its commit).

    Raises:
        StorageError: the file could not be written or stored (disk full...).
    """
    where = str(directory)
    fd = -1
    if UNNAMED and _UNNAMED_OK.get(where):
        began = _creation_clocks(directory)
        try:
            fd = os.open(where, _UNNAMED_FLAGS, 0o666)
        except OSError:
            pass  # the TempFile way meets it again, and says what it is
        else:
            if began is not None:
                _note_creation(directory, _waited(began))
    if fd < 0:
        tmp = TempFile(directory, key, url)
        try:
            tmp.write(data)
            if written is not None:
                written()
            return tmp.commit(final, origin, False)
        except BaseException:
            tmp.discard()
            raise
    # Nothing of the unnamed file is left once it is closed, whatever fails here.
    try:
        try:
            _write_all(fd, data)
        except OSError as exc:
            raise _storage_error("cannot write to", directory, url, exc) from exc
        if written is not None:
            written()
        try:
            recorded = _set_origin(fd, origin) if origin is not None else False
            linked = _link_unnamed(fd, final)
        except OSError as exc:
            if exc.errno not in _CANNOT_LINK:
                raise _storage_error("cannot store the file in", final.parent, url, exc) from exc
            linked = False
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    if not linked:
        # The name is taken, or links through /proc are refused: the TempFile way goes
        # on with this file (it names it and replaces, or copies it to a named one).
        tmp = TempFile(directory, key, url, unnamed=fd)
        tmp.size = len(data)
        try:
            return tmp.commit(final, origin, False)
        except BaseException:
            tmp.discard()
            raise
    try:
        os.close(fd)
    except OSError as exc:
        raise _storage_error("cannot store the file in", final.parent, url, exc) from exc
    return recorded


def _storage_error(what: str, where: Path, url: str, exc: OSError) -> StorageError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return StorageError(f"{what} {where}: {reason}", url=url, errno=exc.errno)


#: The buffer of :meth:`TempFile.splice_from` while hashing (a pipe holds up to 1 MiB).
_HASH_BLOCK = 1024 * 1024

#: Whether :class:`TempFile` tries ``O_TMPFILE`` first (tests turn it off to exercise
#: the named files that remain the fallback).
UNNAMED: bool = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
#: How an unnamed file is opened: readable too, for the copy in TempFile._copy_to_named.
_UNNAMED_FLAGS: Final = os.O_RDWR | getattr(os, "O_TMPFILE", 0) | os.O_CLOEXEC
# What open(O_TMPFILE) fails with where the filesystem (or an old kernel) lacks it.
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL)
# What posix_fallocate() fails with where the filesystem cannot allocate ahead (glibc
# writes the blocks itself where the kernel lacks fallocate, but not into O_APPEND files).
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


# What linkat through /proc fails with where it cannot work (no /proc, a sandbox, an
# LSM); storage errors (ENOSPC, EROFS, EIO...) are not among them.
_CANNOT_LINK = (
    errno.ENOENT,
    errno.EXDEV,
    errno.EPERM,
    errno.EACCES,
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.EINVAL,
    errno.ELOOP,
)


def _stop_unnamed(directory: Path, why: OSError) -> None:
    """From now on use named files: linking through ``/proc`` does not work here."""
    global UNNAMED
    if UNNAMED:
        UNNAMED = False
        log.warning(
            "cannot link unnamed temporary files in %s (%s); using named ones",
            directory,
            os.strerror(why.errno) if why.errno else why,
        )


def _finish(fd: int, origin: str | None, fsync: bool) -> bool:
    """Record ``origin`` on the file, and flush it if asked; return whether recorded."""
    recorded = _set_origin(fd, origin) if origin is not None else False
    if fsync:
        os.fsync(fd)
    return recorded


def _open_unnamed(directory: Path) -> int | None:
    """Open an unnamed file in ``directory``; ``None`` where named files must serve.

    The first unnamed file in a directory is checked against a named one (see
    :func:`_behaves_as_named`); the verdict is kept for the process.

    Raises:
        OSError: any other failure (permission, a missing directory...).
    """
    where = os.fspath(directory)
    verdict = _UNNAMED_OK.get(where)
    if verdict is False:
        return None
    try:
        fd = os.open(where, _UNNAMED_FLAGS, 0o666)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            _remember(where, False)
            return None
        raise
    if verdict is None:
        try:
            verdict = _behaves_as_named(fd, directory)
        except BaseException:
            os.close(fd)
            raise
        _remember(where, verdict)
        if not verdict:
            os.close(fd)
            return None
    return fd


#: Directory -> whether its unnamed files get the mode named ones get. Bounded: past
#: the limit it starts again, which only costs a new check per directory.
_UNNAMED_OK: dict[str, bool] = {}
_UNNAMED_OK_MAX = 1024


def _remember(where: str, verdict: bool) -> None:
    if len(_UNNAMED_OK) >= _UNNAMED_OK_MAX:
        _UNNAMED_OK.clear()
    _UNNAMED_OK[where] = verdict


def _behaves_as_named(fd: int, directory: Path) -> bool:
    """Whether the unnamed file ``fd`` got the permissions a named file gets here.

    Kernels before the fix "fs: Add missing umask strip in vfs_tmpfile" (6.0, and
    stable backports) ignored the umask for ``O_TMPFILE`` on filesystems without POSIX
    ACLs: files would come out 0666 where the umask asks for 0644 (DESIGN rule 2).
    Comparing with a named file created the usual way also respects default ACLs.
    """
    # Under a key nobody locks: sweep() removes it if this process dies first.
    probe = _part_name(directory, secrets.token_hex(10))
    try:
        named = _create_named(probe)
    except OSError:
        # Named files cannot be created here either: the download fails the same way
        # whichever kind it uses.
        return True
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode) == stat.S_IMODE(os.fstat(named).st_mode)
    finally:
        os.close(named)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _part_name(directory: Path, key: str) -> Path:
    """Return a fresh name for a named temporary file of ``key`` in ``directory``."""
    # Unique enough beside a dead writer's leftovers; unlike secrets, random needs no
    # system call (each one lets 15 other threads take the GIL), and it is reseeded
    # in a forked child.
    suffix = f"{random.getrandbits(48):012x}"
    return child_path(directory, f"{RESERVED_PREFIX}{key}-{suffix}{_PART_SUFFIX}")


def _create_named(path: Path) -> int:
    """Create the named temporary file ``path`` (mode 0o666: the umask decides)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    written = os.write(fd, data)
    if written == len(data):
        return  # nearly always, into a regular file: no view to make
    view = memoryview(data)[written:]
    while view:
        view = view[os.write(fd, view) :]


def _link_unnamed(fd: int, path: Path) -> bool:
    """Give the file open as ``fd`` the name ``path``; ``False`` if the name is taken.

    ``linkat`` through ``/proc`` with ``AT_SYMLINK_FOLLOW`` is the unprivileged way to
    name an ``O_TMPFILE`` file (``AT_EMPTY_PATH`` needs CAP_DAC_READ_SEARCH). Python
    calls ``linkat`` only when given a directory descriptor: ``fd`` serves, as the
    absolute paths make ``linkat`` ignore it.
    """
    try:
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd, follow_symlinks=True)
    except FileExistsError:
        return False
    return True


def _set_origin(fd: int, origin: str) -> bool:
    return _set_xattr(fd, ORIGIN_XATTR, origin)


def _set_xattr(fd: int, name: str, value: str) -> bool:
    setxattr = _SETXATTR
    if setxattr is None:
        return False
    try:
        setxattr(fd, name, value.encode("utf-8", "surrogatepass"))
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return False
        raise
    return True


def _remove_xattr(fd: int, name: str) -> None:
    removexattr = getattr(os, "removexattr", None)
    if removexattr is None:
        return
    try:
        removexattr(fd, name)
    except OSError as exc:
        if exc.errno not in (*_NO_XATTR, errno.ENODATA):
            raise


_SETXATTR = getattr(os, "setxattr", None)
# What setting an xattr fails with where the filesystem (or the value) does not allow it.
_NO_XATTR = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.E2BIG, errno.ERANGE)


def partial_path(final: Path) -> Path | None:
    """Return the partial file of ``final`` (``resume=True``), or ``None`` if the name
    would be too long for the filesystem (that file is then not resumed across runs)."""
    name = f".{final.name}{PARTIAL_SUFFIX}"
    if len(os.fsencode(name)) > _NAME_MAX:
        return None
    return child_path(final.parent, name)


def _open_partial(path: Path) -> int:
    """Open (create) the partial file ``path`` for reading and writing, not truncated.

    A symlink there is replaced by a file, never written through.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
    os.unlink(path)
    return os.open(path, flags | os.O_EXCL, 0o666)


@dataclass(frozen=True)
class PartialRecord:
    """What a partial file holds, as recorded on it (see :meth:`TempFile.record`).

    Attributes:
        size: the bytes it holds.
        origin: the URL its bytes came from.
        validator: the ``ETag`` or ``Last-Modified`` of that body.
        total: the size of the whole body.
    """

    size: int
    origin: str
    validator: str
    total: int


def read_partial(path: Path) -> PartialRecord | None:
    """Return the record of the partial file at ``path``, or ``None`` if there is no
    such file (a symlink is not one), or it records no complete validator."""
    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:
        return None
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        values = [
            getxattr(path, name, follow_symlinks=False).decode("utf-8", "surrogateescape")
            for name in (ORIGIN_XATTR, VALIDATOR_XATTR, TOTAL_XATTR)
        ]
    except OSError:
        return None
    origin, validator, total = values
    if not total.isascii() or not total.isdigit():
        return None
    return PartialRecord(st.st_size, origin, validator, int(total))


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
        if name.endswith(_PART_SUFFIX):
            yield body[: -len(_PART_SUFFIX)].rpartition("-")[0], name


def sweep(directory: Path) -> int:
    """Remove the temporary files of dead writers in ``directory``.

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
            lock.release()
    return removed
