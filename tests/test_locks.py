"""The shared per-directory lock file: exclusion across processes, and no litter."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from _support import held_locks, listing, lock_held_elsewhere
from fetchpool import Downloader, StorageError
from fetchpool.storage import (
    _THREAD_LOCKS,
    LOCK_FILE_NAME,
    PathLock,
    child_path,
    lock_key,
    sweep,
)
from fetchpool.testing import ImageServer

pytestmark = pytest.mark.usefixtures("each_backend")


def _count_under_lock(
    directory: str, rounds: int, start: multiprocessing.synchronize.Event
) -> None:
    """Increment a counter file ``rounds`` times, each read-modify-write under the lock."""
    d = Path(directory)
    counter = d / "counter"
    key = lock_key(d / "counter")
    start.wait(10)
    for _ in range(rounds):
        # No pin: every release may remove the lock file, racing the other processes'
        # opens, which is the case the inode check after locking must get right.
        with PathLock(d, key, timeout=30):
            value = int(counter.read_text())
            counter.write_text(str(value + 1))


@pytest.mark.timeout(60)
def test_processes_exclude_each_other_while_the_lock_file_comes_and_goes(
    tmp_path: Path,
) -> None:
    (tmp_path / "counter").write_text("0")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    rounds, nprocs = 300, 3
    procs = [
        ctx.Process(target=_count_under_lock, args=(str(tmp_path), rounds, start))
        for _ in range(nprocs)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(50)
    assert [p.exitcode for p in procs] == [0] * nprocs
    # A lost update would mean two holders at once.
    assert int((tmp_path / "counter").read_text()) == rounds * nprocs
    assert listing(tmp_path) == ["counter"]


def test_threads_exclude_each_other_on_one_key(tmp_path: Path) -> None:
    inside = 0
    worst = 0
    mutex = threading.Lock()
    gate = threading.Barrier(8)

    def work() -> None:
        nonlocal inside, worst
        gate.wait(10)
        for _ in range(200):
            with PathLock(tmp_path, "a" * 20):
                with mutex:
                    inside += 1
                    worst = max(worst, inside)
                with mutex:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert worst == 1
    assert listing(tmp_path) == []


def test_a_lone_lock_leaves_nothing_behind(tmp_path: Path) -> None:
    lock = PathLock(tmp_path, lock_key(tmp_path / "x.png"))
    lock.acquire()
    assert listing(tmp_path) == [LOCK_FILE_NAME]
    assert held_locks(tmp_path) == 1
    lock.release()
    assert listing(tmp_path) == []


def test_different_names_do_not_block_each_other_across_processes(tmp_path: Path) -> None:
    with lock_held_elsewhere(tmp_path, "a.png"):
        other = PathLock(tmp_path, lock_key(tmp_path / "b.png"))
        assert other.acquire(blocking=False)
        same = PathLock(tmp_path, lock_key(tmp_path / "a.png"))
        assert not same.acquire(blocking=False)
        assert held_locks(tmp_path) == 2
        other.release()
        # The other process still uses the file: it stays.
        assert listing(tmp_path) == [LOCK_FILE_NAME]
    assert listing(tmp_path) == []


def test_the_lock_file_lives_as_long_as_the_downloader(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with ImageServer(n_images=4) as server, Downloader(dest, workers=2) as dl:
        first = dl.submit(server.url("/any/one.png")).result()
        assert first.ok, first.error
        # Kept open between downloads (no create/unlink per file) ...
        assert LOCK_FILE_NAME in os.listdir(dest)
        assert held_locks(dest) == 0
        assert dl.submit(server.url("/any/two.png")).result().ok
        # ... and removed at close.
    assert listing(dest) == ["one.png", "two.png"]


def test_a_dropped_downloader_still_removes_its_lock_file(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with ImageServer(n_images=4) as server:
        dl = Downloader(dest, workers=1)
        assert dl.submit(server.url("/any/one.png")).result().ok
        dl._runner.shutdown(wait=True)
        del dl
        import gc

        # The thread that completed the future may still be inside its done-callbacks
        # (which hold the Downloader) for a moment after result() returned.
        deadline = time.monotonic() + 5
        while listing(dest) != ["one.png"] and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
    assert listing(dest) == ["one.png"]


def test_a_killed_processes_lock_file_goes_with_the_next_downloader(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / LOCK_FILE_NAME).write_bytes(b"")
    with Downloader(dest, workers=1):
        pass  # nothing downloaded: the stale file is still found and removed
    assert listing(dest) == []


def test_a_lock_file_in_use_by_another_process_is_not_removed(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with lock_held_elsewhere(dest, "busy.png"):
        with Downloader(dest, workers=1):
            pass
        assert listing(dest) == [LOCK_FILE_NAME]
        assert held_locks(dest) == 1
    assert listing(dest) == []


def test_sweep_keeps_a_live_writers_temp_file(tmp_path: Path) -> None:
    live = f".fetchpool-{lock_key(tmp_path / 'live.png')}-0123456789ab.part"
    dead = f".fetchpool-{lock_key(tmp_path / 'dead.png')}-0123456789ab.part"
    (tmp_path / live).write_bytes(b"half")
    (tmp_path / dead).write_bytes(b"half")
    with lock_held_elsewhere(tmp_path, "live.png"):
        assert sweep(tmp_path) == 1
        assert sorted(os.listdir(tmp_path)) == sorted([LOCK_FILE_NAME, live])
    assert sweep(tmp_path) == 1
    assert listing(tmp_path) == []


def test_an_unwritable_directory_is_a_storage_error(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    with pytest.raises(StorageError, match="cannot create or lock") as info:
        PathLock(missing, "a" * 20).acquire()
    assert info.value.errno is not None


def test_a_filesystem_without_record_locks_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    def no_locks(fd: int, cmd: int, length: int = 0, start: int = 0, whence: int = 0) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.raises(StorageError, match="lock") as info:
        PathLock(tmp_path, "a" * 20).acquire()
    assert info.value.errno == errno.ENOLCK
    monkeypatch.undo()
    # Without locks it cannot tell whether another process uses the lock file, so it stays
    # until a lock can be taken again.
    with PathLock(tmp_path, "a" * 20):
        pass
    assert listing(tmp_path) == []


def test_a_lock_says_whether_it_is_held(tmp_path: Path) -> None:
    lock = PathLock(tmp_path, lock_key(tmp_path / "held.png"))
    assert not lock.held
    assert lock.acquire(blocking=False)
    assert lock.held
    other = PathLock(tmp_path, lock_key(tmp_path / "held.png"))
    assert not other.acquire(blocking=False)
    assert not other.held
    lock.release()
    assert not lock.held
    lock.release()  # idempotent
    assert not lock.held


@pytest.mark.parametrize("name", ["plain.png", "café ☕.jpg", "bad-\udcff-byte.gif"])
def test_a_lock_key_is_the_hash_of_the_name_as_the_filesystem_spells_it(
    tmp_path: Path, name: str
) -> None:
    # Other processes (older versions too) name the same lock byte only if the key is
    # computed the same way: from os.fsencode of the file name alone.
    expected = hashlib.sha256(os.fsencode(name)).hexdigest()[:20]
    assert lock_key(tmp_path / name) == expected
    assert lock_key(tmp_path / "sub" / name) == expected
    assert lock_key(child_path(tmp_path, name)) == expected
    # And the byte locked in the directory's lock file is the one they lock.
    byte = 1 + int(hashlib.sha256(expected.encode()).hexdigest()[:15], 16)
    assert PathLock(tmp_path, expected)._offset == byte


def test_a_lock_tried_without_waiting_is_busy_while_a_thread_waits_for_it(
    tmp_path: Path,
) -> None:
    # A thread queued for the key (its in-process lock free for an instant, between
    # the holder's release and the waiter's wake-up) would be next: a try does not
    # jump the queue, and leaves no claim on the key behind.
    key = lock_key(tmp_path / "queued.png")
    tkey = PathLock(tmp_path, key)._tkey
    _THREAD_LOCKS.get(tkey)  # what a waiter holds while it waits
    try:
        for _ in range(3):
            assert not PathLock(tmp_path, key).acquire(blocking=False)
    finally:
        _THREAD_LOCKS.put(tkey)
    again = PathLock(tmp_path, key)
    assert again.acquire(blocking=False)
    again.release()
    assert listing(tmp_path) == []
