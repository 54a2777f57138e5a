"""TempFile: unnamed (``O_TMPFILE``) and named temporary files, and their commit.

DESIGN rule 1 (nothing partial at a final name, no temporary file behind) and rule 3 (a
symlink at the final path is replaced, not written through), at the storage level.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

import fetchpool.storage
from _support import listing, temp_files, temp_sizes
from fetchpool import StorageError
from fetchpool.storage import TempFile, lock_key, read_origin, store_whole

KEY = lock_key(Path("x.png"))


@pytest.fixture
def unnamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unnamed temporary files on for the test (restored after), where the system has them."""
    if not fetchpool.storage.UNNAMED:
        pytest.skip("no O_TMPFILE here: the named file is the only kind")
    monkeypatch.setattr(fetchpool.storage, "UNNAMED", True)


def _refuse_like_linkat(dst: Any, refusal: int) -> None:
    """Fail as linkat does where it may not link through /proc: EEXIST is checked first."""
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
    raise OSError(refusal, os.strerror(refusal))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_temp_file_has_no_final_name_until_commit(dest: Path, temp_mode: str) -> None:
    tmp = TempFile(dest, KEY, "http://h/x.png")
    tmp.write(b"half")
    assert temp_sizes(dest) == [4]
    if temp_mode == "unnamed":
        assert tmp.path is None
        assert listing(dest) == []  # nothing in the directory at all
    else:
        assert tmp.path is not None
        assert listing(dest) == [tmp.path.name]
        assert tmp.path.name.startswith(f".fetchpool-{KEY}-")
        assert tmp.path.name.endswith(".part")
    tmp.write(memoryview(b" and the rest"))
    assert tmp.size == 17
    assert tmp.commit(dest / "x.png", "http://h/x.png", fsync=False) is True
    assert listing(dest) == ["x.png"]
    assert temp_files(dest) == []
    assert (dest / "x.png").read_bytes() == b"half and the rest"
    assert read_origin(dest / "x.png") == "http://h/x.png"
    mode = stat.S_IMODE(os.stat(dest / "x.png").st_mode)
    assert mode == 0o666 & ~_umask(), oct(mode)


def test_commit_replaces_a_file_and_a_symlink(dest: Path, tmp_path: Path, temp_mode: str) -> None:
    (dest / "x.png").write_bytes(b"old")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not yours")
    (dest / "link.png").symlink_to(outside)
    for name in ("x.png", "link.png"):
        tmp = TempFile(dest, KEY)
        tmp.write(b"new " + name.encode())
        tmp.commit(dest / name, None, fsync=True)
        assert not (dest / name).is_symlink()
        assert (dest / name).read_bytes() == b"new " + name.encode()
    assert outside.read_bytes() == b"not yours"
    assert listing(dest) == ["link.png", "x.png"]
    assert temp_files(dest) == []


def test_commit_onto_a_directory_fails_and_leaves_nothing(dest: Path, temp_mode: str) -> None:
    (dest / "x.png").mkdir()
    tmp = TempFile(dest, KEY, "http://h/x.png")
    tmp.write(b"data")
    with pytest.raises(StorageError) as info:
        tmp.commit(dest / "x.png", None, fsync=False)
    assert info.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert info.value.url == "http://h/x.png"
    assert listing(dest) == ["x.png"]
    assert temp_files(dest) == []


def test_discard_leaves_nothing(dest: Path, temp_mode: str) -> None:
    tmp = TempFile(dest, KEY)
    tmp.write(b"partial")
    tmp.discard()
    tmp.discard()  # idempotent
    assert listing(dest) == []
    assert temp_files(dest) == []


@pytest.mark.usefixtures("unnamed")
def test_falls_back_to_a_named_file_without_o_tmpfile(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    refused: list[str] = []

    def no_tmpfile(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            refused.append(os.fsdecode(path))
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    tmp = TempFile(dest, KEY)
    assert refused == [str(dest)]
    assert tmp.path is not None
    assert listing(dest) == [tmp.path.name]
    tmp.write(b"data")
    tmp.commit(dest / "x.png", None, fsync=False)
    assert listing(dest) == ["x.png"]


def test_other_failures_to_create_are_storage_errors(tmp_path: Path, temp_mode: str) -> None:
    with pytest.raises(StorageError, match="cannot create a file in") as info:
        TempFile(tmp_path / "missing", KEY, "http://h/x.png")
    assert info.value.errno == errno.ENOENT
    assert listing(tmp_path) == []


@pytest.mark.usefixtures("unnamed")
def test_copies_to_a_named_file_where_unnamed_ones_cannot_be_linked(
    dest: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_link = os.link
    refused: list[str] = []

    def no_proc(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fsdecode(src).startswith("/proc/"):
            refused.append(os.fsdecode(dst))
            _refuse_like_linkat(dst, errno.ENOENT)
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", no_proc)
    data = os.urandom(3 * 1024 * 1024 + 17)
    tmp = TempFile(dest, KEY, "http://h/x.png")
    assert tmp.path is None
    tmp.write(data)
    assert tmp.commit(dest / "x.png", "http://h/x.png", fsync=True) is True
    assert refused == [str(dest / "x.png")]
    assert (dest / "x.png").read_bytes() == data
    assert read_origin(dest / "x.png") == "http://h/x.png"
    assert listing(dest) == ["x.png"]
    assert "using named ones" in caplog.text
    # The process has switched to named files.
    assert fetchpool.storage.UNNAMED is False
    tmp = TempFile(dest, KEY)
    assert tmp.path is not None
    tmp.discard()
    assert listing(dest) == ["x.png"]


@pytest.mark.usefixtures("unnamed")
def test_a_storage_error_while_linking_is_not_taken_for_a_missing_proc(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "link", full)
    tmp = TempFile(dest, KEY, "http://h/x.png")
    tmp.write(b"data")
    with pytest.raises(StorageError) as info:
        tmp.commit(dest / "x.png", None, fsync=False)
    assert info.value.errno == errno.ENOSPC
    assert fetchpool.storage.UNNAMED is True
    assert listing(dest) == []


@pytest.mark.usefixtures("unnamed")
def test_a_failed_copy_closes_the_unnamed_file_once(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = TempFile(dest, KEY)
    tmp.write(b"data")
    unnamed = tmp._fd
    real_open, real_close = os.open, os.close
    closed: list[int] = []

    def no_proc(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))

    def no_named(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fsdecode(path).endswith(".part"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, flags, *args, **kwargs)

    def close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "link", no_proc)
    monkeypatch.setattr(os, "open", no_named)
    monkeypatch.setattr(os, "close", close)
    with pytest.raises(StorageError) as info:
        tmp.commit(dest / "x.png", None, fsync=False)
    monkeypatch.setattr(os, "close", real_close)
    assert info.value.errno == errno.EACCES
    assert closed == [unnamed]
    assert listing(dest) == []


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EXDEV, errno.EACCES])
@pytest.mark.usefixtures("unnamed")
def test_the_copy_fallback_also_replaces_a_file(
    dest: Path, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    real_link = os.link

    def sandboxed(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fsdecode(src).startswith("/proc/"):
            _refuse_like_linkat(dst, refusal)
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", sandboxed)
    (dest / "x.png").write_bytes(b"old")
    tmp = TempFile(dest, KEY)
    tmp.write(b"new")
    tmp.commit(dest / "x.png", None, fsync=False)
    assert (dest / "x.png").read_bytes() == b"new"
    assert listing(dest) == ["x.png"]
    assert fetchpool.storage.UNNAMED is False


@pytest.mark.usefixtures("unnamed")
def test_a_vanished_directory_does_not_switch_off_unnamed_files(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = dest / "sub"
    sub.mkdir()
    tmp = TempFile(sub, KEY)
    tmp.write(b"data")
    sub.rmdir()
    with pytest.raises(StorageError) as info:
        tmp.commit(sub / "x.png", None, fsync=False)
    assert info.value.errno == errno.ENOENT
    assert fetchpool.storage.UNNAMED is True
    assert listing(dest) == []


@pytest.mark.usefixtures("unnamed")
def test_named_files_serve_where_unnamed_ones_would_ignore_the_umask(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def old_kernel(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            os.fchmod(fd, 0o666)  # what kernels before 6.0 did on some filesystems
        return fd

    monkeypatch.setattr(os, "open", old_kernel)
    previous = os.umask(0o022)
    try:
        for name in ("a.png", "b.png"):
            tmp = TempFile(dest, KEY)
            assert tmp.path is not None  # a named file, as the check found the fault
            tmp.write(b"data")
            tmp.commit(dest / name, None, fsync=False)
            assert stat.S_IMODE(os.stat(dest / name).st_mode) == 0o644
    finally:
        os.umask(previous)
    assert listing(dest) == ["a.png", "b.png"]  # the check left no file behind


@pytest.mark.usefixtures("unnamed")
def test_the_check_of_unnamed_files_runs_once_per_directory(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    created: list[str] = []

    def count(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            created.append(os.path.basename(os.fsdecode(path)))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", count)
    for name in ("a.png", "b.png", "c.png"):
        tmp = TempFile(dest, KEY)
        assert tmp.path is None
        tmp.write(b"data")
        tmp.commit(dest / name, None, fsync=False)
    assert len(created) == 1, created  # one named probe, for the first file only
    assert created[0].endswith(".part")
    assert listing(dest) == ["a.png", "b.png", "c.png"]


def test_creation_is_judged_slow_on_what_it_took_of_late(tmp_path: Path) -> None:
    directory = tmp_path / "judged"
    directory.mkdir()
    assert not fetchpool.storage.slow_to_create(directory)  # never seen: not slow
    fetchpool.storage._note_creation(directory, 1e-3)
    assert fetchpool.storage.slow_to_create(directory)
    for _ in range(40):  # fast again: the smoothed cost falls back under the mark
        fetchpool.storage._note_creation(directory, 5e-6)
    assert not fetchpool.storage.slow_to_create(directory)
    fetchpool.storage._note_creation(directory, 1.0)  # one stall among fast ones flips it...
    assert fetchpool.storage.slow_to_create(directory)
    for _ in range(20):
        fetchpool.storage._note_creation(directory, 5e-6)
    assert not fetchpool.storage.slow_to_create(directory)  # ...for a while only


def test_a_creation_is_slow_where_it_waits_not_where_the_kernel_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ext4 allocating an inode is CPU: another thread would spend it all the same. A
    # network filesystem waits: another thread overlaps the wait.
    storage = fetchpool.storage
    directory = tmp_path / "judged"
    directory.mkdir()
    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(storage, "_clocks", lambda: (clock["wall"], clock["cpu"]))
    for _ in range(8):  # a millisecond of the kernel's work each
        began = (clock["wall"], clock["cpu"])
        clock["wall"] += 1e-3
        clock["cpu"] += 1e-3
        storage._note_creation(directory, storage._waited(began))
    assert not storage.slow_to_create(directory)
    for _ in range(2):  # a millisecond waiting each
        began = (clock["wall"], clock["cpu"])
        clock["wall"] += 1e-3
        storage._note_creation(directory, storage._waited(began))
    assert storage.slow_to_create(directory)


def test_one_creation_in_eight_is_timed_and_a_directorys_first(tmp_path: Path) -> None:
    storage = fetchpool.storage
    first, second = tmp_path / "first", tmp_path / "second"
    assert storage._creation_clocks(first) is not None  # never seen
    storage._note_creation(first, 0.0)
    storage._note_creation(second, 0.0)
    timed = {first: 0, second: 0}
    for _ in range(64):  # alternating: each directory counts its own
        for directory in (first, second):
            began = storage._creation_clocks(directory)
            if began is not None:
                timed[directory] += 1
                storage._note_creation(directory, storage._waited(began))
    assert timed == {first: 64 // storage._TIMED_EVERY, second: 64 // storage._TIMED_EVERY}


def test_a_slow_directory_is_tried_on_the_drivers_thread_now_and_then(tmp_path: Path) -> None:
    storage = fetchpool.storage
    storage._note_creation(tmp_path, 1e-3)
    said = [storage.slow_to_create(tmp_path) for _ in range(2 * storage._PROBE_EVERY)]
    assert said.count(False) == 2
    assert not said[storage._PROBE_EVERY - 1]


def test_a_temp_file_notes_how_long_its_creation_took(tmp_path: Path) -> None:
    fetchpool.storage._CREATION_COST.pop(str(tmp_path), None)
    tmp = fetchpool.storage.TempFile(tmp_path, fetchpool.storage.lock_key(tmp_path / "x.png"))
    try:
        assert 0 <= fetchpool.storage._CREATION_COST[str(tmp_path)].waited < 5
    finally:
        tmp.discard()


def test_direct_gives_a_descriptor_of_its_own_with_the_space_allocated(
    dest: Path, temp_mode: str
) -> None:
    tmp = TempFile(dest, KEY, "http://h/x.png")
    tmp.write(b"head")
    fd = tmp.direct(1000)
    assert fd is not None
    try:
        assert fd != tmp._fd
        assert os.fstat(fd).st_size == 4 + 1000  # allocated from the offset on
        assert os.write(fd, b"body") == 4  # lands after the head: the offset is shared
        tmp.wrote(4)
        assert tmp.size == 8
        tmp.discard()
        # The writer's descriptor outlives the file's: its writes go to the orphan.
        assert os.write(fd, b"more") == 4
    finally:
        os.close(fd)
    assert listing(dest) == []
    assert temp_files(dest) == []


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS])
def test_direct_gives_nothing_where_space_cannot_be_allocated_ahead(
    dest: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", refuse)
    tmp = TempFile(dest, KEY)
    assert tmp.direct(1000) is None
    tmp.discard()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_direct_says_a_full_disk_as_a_storage_error(
    dest: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", full)
    tmp = TempFile(dest, KEY, "http://h/x.png")
    with pytest.raises(StorageError) as caught:
        tmp.direct(1000)
    assert caught.value.errno == code
    assert caught.value.url == "http://h/x.png"
    tmp.discard()


# -------------------------------------------------------------- store_whole (in memory)


def _warm(directory: Path) -> None:
    """Have the directory's verdict on unnamed files made (the first TempFile makes it)."""
    TempFile(directory, KEY).discard()


def test_store_whole_stores_a_body_with_its_origin(dest: Path, temp_mode: str) -> None:
    _warm(dest)
    assert store_whole(dest, KEY, "http://h/x.png", b"whole", dest / "x.png", "http://h/x.png")
    assert (dest / "x.png").read_bytes() == b"whole"
    assert read_origin(dest / "x.png") == "http://h/x.png"
    assert listing(dest) == ["x.png"]
    assert store_whole(dest, KEY, "", b"", dest / "empty.png", None) is False
    assert (dest / "empty.png").read_bytes() == b""
    assert read_origin(dest / "empty.png") is None


def test_store_whole_replaces_what_stands_at_the_name(
    dest: Path, tmp_path: Path, temp_mode: str
) -> None:
    _warm(dest)
    (dest / "x.png").write_bytes(b"old")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not yours")
    (dest / "link.png").symlink_to(outside)
    for name in ("x.png", "link.png"):
        store_whole(dest, KEY, "", b"new " + name.encode(), dest / name, None)
        assert not (dest / name).is_symlink()
        assert (dest / name).read_bytes() == b"new " + name.encode()
    assert outside.read_bytes() == b"not yours"
    assert listing(dest) == ["link.png", "x.png"]
    assert temp_files(dest) == []


def test_store_whole_says_a_full_disk_and_leaves_nothing(
    dest: Path, monkeypatch: pytest.MonkeyPatch, temp_mode: str
) -> None:
    _warm(dest)

    def full(fd: int, data: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fetchpool.storage, "_write_all", full)
    with pytest.raises(StorageError) as info:
        store_whole(dest, KEY, "http://h/x.png", b"data", dest / "x.png", "http://h/x.png")
    assert info.value.errno == errno.ENOSPC
    assert info.value.url == "http://h/x.png"
    assert "cannot write to" in str(info.value)
    assert listing(dest) == []
    assert temp_files(dest) == []


def test_store_whole_onto_a_directory_fails_and_leaves_nothing(dest: Path, temp_mode: str) -> None:
    _warm(dest)
    (dest / "x.png").mkdir()
    with pytest.raises(StorageError):
        store_whole(dest, KEY, "http://h/x.png", b"data", dest / "x.png", None)
    assert listing(dest) == ["x.png"]
    assert temp_files(dest) == []


@pytest.mark.usefixtures("unnamed")
def test_store_whole_copes_where_unnamed_files_cannot_be_linked(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _warm(dest)
    real_link = os.link

    def no_proc(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fsdecode(src).startswith("/proc/"):
            _refuse_like_linkat(dst, errno.EPERM)
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", no_proc)
    assert store_whole(dest, KEY, "", b"data", dest / "x.png", "http://h/x.png")
    assert (dest / "x.png").read_bytes() == b"data"
    assert read_origin(dest / "x.png") == "http://h/x.png"
    assert listing(dest) == ["x.png"]


@pytest.mark.usefixtures("unnamed")
def test_store_whole_takes_a_few_system_calls_where_it_can(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _warm(dest)
    made: list[object] = []
    real = fetchpool.storage.TempFile

    def spy(*args: Any, **kwargs: Any) -> TempFile:
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(fetchpool.storage, "TempFile", spy)
    store_whole(dest, KEY, "", b"data", dest / "x.png", None)
    assert made == []  # no TempFile: the unnamed file, written and linked at once
    (dest / "y.png").write_bytes(b"old")
    store_whole(dest, KEY, "", b"new", dest / "y.png", None)
    assert len(made) == 1  # the name was taken: the TempFile way, which replaces it
    assert (dest / "y.png").read_bytes() == b"new"


def test_store_whole_tells_once_when_the_data_is_written(dest: Path, temp_mode: str) -> None:
    _warm(dest)
    told: list[int] = []
    store_whole(dest, KEY, "", b"one", dest / "x.png", None, lambda: told.append(1))
    (dest / "y.png").write_bytes(b"old")  # a name taken: the TempFile way goes on
    store_whole(dest, KEY, "", b"two", dest / "y.png", None, lambda: told.append(2))
    assert told == [1, 2]
    assert (dest / "y.png").read_bytes() == b"two"


@pytest.mark.usefixtures("unnamed")
def test_store_whole_in_a_directory_removed_says_so_as_a_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gone(directory: Path) -> str:
        _warm(directory)
        real = fetchpool.storage._write_all

        def write_then_remove(fd: int, data: Any) -> None:
            real(fd, data)
            os.rmdir(directory)

        monkeypatch.setattr(fetchpool.storage, "_write_all", write_then_remove)
        try:
            if directory.name == "store":
                store_whole(directory, KEY, "u", b"data", directory / "x.png", None)
            else:
                tmp = TempFile(directory, KEY, "u")
                tmp.write(b"data")
                tmp.commit(directory / "x.png", None, False)
        except StorageError as exc:
            return f"{exc.errno} {str(exc).replace(str(directory), 'D')}"
        finally:
            monkeypatch.undo()
        raise AssertionError("no error")

    (tmp_path / "store").mkdir()
    (tmp_path / "temp").mkdir()
    assert gone(tmp_path / "store") == gone(tmp_path / "temp")


@pytest.mark.usefixtures("unnamed")
def test_store_whole_says_a_failed_close_as_a_storage_error(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _warm(dest)
    real_close = os.close

    def failing_close(fd: int) -> None:
        real_close(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "close", failing_close)
    with pytest.raises(StorageError) as info:
        store_whole(dest, KEY, "u", b"data", dest / "x.png", None)
    monkeypatch.undo()
    assert info.value.errno == errno.EIO
    assert "cannot store the file in" in str(info.value)
