"""Constants and helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from fetchpool.naming import RESERVED_PREFIX
from fetchpool.storage import LOCK_FILE_NAME

#: A small but valid-looking PNG body (the sniffer only needs the signature).
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 20 + b"\xff\xd9"
HTML = b"<!DOCTYPE html><html><body>Not the image you want</body></html>"


def listing(directory: Path) -> list[str]:
    """Every entry below ``directory``, relative, sorted (to spot litter)."""
    return sorted(
        os.path.relpath(os.path.join(root, name), directory)
        for root, dirs, files in os.walk(directory)
        for name in dirs + files
    )


def temp_files(directory: Path, pid: int | None = None) -> list[str]:
    """The temporary files in ``directory``: named ``.part`` files, and unnamed ones.

    An unnamed (``O_TMPFILE``) file has no entry in the directory; it shows only among
    the open files of its writer, process ``pid`` (this one by default), as
    ``<pid>:<fd>``.
    """
    named = sorted(
        n for n in os.listdir(directory) if n.startswith(RESERVED_PREFIX) and n.endswith(".part")
    )
    return named + _unnamed(directory, os.getpid() if pid is None else pid)


def temp_sizes(directory: Path, pid: int | None = None) -> list[int]:
    """Sizes of :func:`temp_files` (a file gone meanwhile is left out)."""
    sizes = []
    for name in temp_files(directory, pid):
        proc, colon, fd = name.partition(":")
        path = f"/proc/{proc}/fd/{fd}" if colon else str(directory / name)
        with contextlib.suppress(FileNotFoundError):
            sizes.append(os.stat(path).st_size)
    return sizes


def _unnamed(directory: Path, pid: int) -> list[str]:
    # The kernel shows an O_TMPFILE file as "<directory>/#<inode> (deleted)".
    # A file open twice (libcurl writing a big body through a descriptor of its own)
    # counts once.
    prefix = os.path.join(os.path.realpath(directory), "#")
    found = []
    seen = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                unnamed = target.startswith(prefix) and target.endswith(" (deleted)")
                if unnamed and target not in seen:
                    seen.add(target)
                    found.append(f"{pid}:{fd}")
    return found


def held_locks(directory: Path) -> int:
    """How many per-file locks any process holds in ``directory`` (from /proc/locks)."""
    try:
        st = os.stat(directory / LOCK_FILE_NAME)
    except FileNotFoundError:
        return 0
    # The kernel prints "<major>:<minor>:<inode>" with the device numbers in hex.
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    count = 0
    with open("/proc/locks", encoding="ascii") as f:
        for line in f:
            # "1: POSIX  ADVISORY  WRITE <pid> <maj>:<min>:<inode> <start> <end>";
            # a blocked waiter's line has "->" after the number. A READ lock is a
            # process's presence, not a held file.
            fields = line.split()
            if fields[1] == "POSIX" and fields[3] == "WRITE" and fields[5] == ident:
                count += 1
    return count


@contextlib.contextmanager
def lock_held_elsewhere(directory: Path, name: str) -> Iterator[Callable[[], None]]:
    """Hold the lock of ``directory / name`` in another process; yield its release."""
    code = (
        "import sys; from pathlib import Path; "
        "from fetchpool.storage import PathLock, lock_key; "
        "d = Path(sys.argv[1]); lock = PathLock(d, lock_key(d / sys.argv[2])); "
        "lock.acquire(); print('held', flush=True); sys.stdin.read(); lock.release()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(directory), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    try:
        if stdout.readline().strip() != "held":  # pragma: no cover - only on breakage
            raise AssertionError("the lock holder did not start")
        yield stdin.close
    finally:
        stdin.close()
        try:
            proc.wait(10)
        finally:
            if proc.poll() is None:  # pragma: no cover - only on breakage
                proc.kill()
                proc.wait()
            stdout.close()
