"""Resume with Range and If-Range: within a run, and across runs with ``resume=True``.

Against the real loopback server (its ranged routes: /big/, /cut/, /no-range/,
/bad-range/), on both backends.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _support import listing
from fetchpool import (
    ChecksumError,
    Downloader,
    Item,
    ProgressEvent,
    TransferError,
    UnsafeFilenameError,
    download_all,
)
from fetchpool.cli import main
from fetchpool.resume import RESUME_MIN
from fetchpool.storage import LOCK_FILE_NAME
from fetchpool.testing import ImageServer

TESTS = Path(__file__).resolve().parent
PROC_FETCH = TESTS / "_proc_fetch.py"
SIZE = 6_000_000

pytestmark = [pytest.mark.usefixtures("each_backend", "waits"), pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=0) as srv:
        yield srv


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A name of the test's own: the server keeps per-URL state (its cuts) for good."""
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    return f"r{digest}.png"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def starts(ranges: list[str | None]) -> list[int]:
    """The first bytes asked for (0 for a request without Range)."""
    return [0 if r is None else int(r.removeprefix("bytes=").rstrip("-")) for r in ranges]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        threading.Event().wait(0.01)


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- within a run


def test_cut_bodies_resume_to_one_exact_body(server: ImageServer, dest: Path, name: str) -> None:
    path = f"/cut/{name}?size={SIZE}&cuts=3"
    events: list[ProgressEvent] = []
    result = download_all([server.url(path)], dest, retry=5, progress=events.append)[0]

    assert result.ok, result.error
    assert result.path is not None
    body = server.expected(path)
    assert sha256(result.path.read_bytes()) == sha256(body)
    assert result.bytes == len(body)
    assert result.attempts == 4
    ranges = server.ranges(path)
    # The first asks for all, each retry for the rest from where the last answer was cut
    # (a clean close: every byte sent arrived), and no byte is sent twice.
    assert ranges[0] is None
    assert all(r is not None for r in ranges[1:]), ranges
    offsets = starts(ranges)
    assert offsets == sorted(offsets)
    assert offsets[1] >= RESUME_MIN
    assert len(set(offsets)) == 4
    assert server.bytes_served(path) == len(body)
    assert listing(dest) == [name]
    # Progress counts on from the bytes kept: it never goes back.
    counts = [e.bytes for e in events if e.state == "progress"]
    assert counts == sorted(counts), counts
    assert counts[-1] == len(body)


def test_reset_bodies_resume_from_what_arrived(server: ImageServer, dest: Path, name: str) -> None:
    path = f"/cut/{name}?size={SIZE}&cuts=3&reset=1"
    result = download_all([server.url(path)], dest, retry=5)[0]

    assert result.ok, result.error
    assert result.path is not None
    assert sha256(result.path.read_bytes()) == server.expected_sha256(path)
    offsets = starts(server.ranges(path))
    # A reset may lose what the socket held: each retry asks from what reached the file.
    assert offsets[0] == 0
    assert all(o == 0 or o >= RESUME_MIN for o in offsets), offsets


def test_a_small_body_starts_over(server: ImageServer, dest: Path, name: str) -> None:
    path = f"/cut/{name}?size=2000000&cuts=1&at=0.3"  # cut at 600 kB: under 1 MiB
    result = download_all([server.url(path)], dest, retry=3)[0]

    assert result.ok, result.error
    assert server.ranges(path) == [None, None]
    assert result.path is not None
    assert result.path.read_bytes() == server.expected(path)


@pytest.mark.parametrize(
    ("query", "validator"),
    [("", "etag"), ("&etag=weak", "date"), ("&etag=none", "date"), ("&etag=none&modified=0", None)],
)
def test_if_range_sends_a_strong_etag_else_last_modified(
    server: ImageServer, dest: Path, name: str, query: str, validator: str | None
) -> None:
    path = f"/cut/{name}?size={SIZE}&cuts=1&at=0.5{query}"
    result = download_all([server.url(path)], dest, retry=3)[0]

    assert result.ok, result.error
    assert result.path is not None
    assert result.path.read_bytes() == server.expected(path)
    headers = server.last_headers(path)
    assert headers is not None
    if validator is None:
        # Nothing to tell a changed file by: no resume, the whole body again.
        assert server.ranges(path) == [None, None]
        assert "If-Range" not in headers
        return
    assert starts(server.ranges(path)) == [0, len(server.expected(path)) // 2]
    if validator == "etag":
        assert headers["If-Range"].startswith('"')
    else:
        assert headers["If-Range"].endswith("GMT")


def test_the_rest_is_asked_for_unencoded(server: ImageServer, dest: Path, name: str) -> None:
    path = f"/cut/{name}?size={SIZE}&cuts=1&at=0.5"
    result = download_all([server.url(path)], dest, retry=3, headers={"Accept-Encoding": "gzip"})[0]

    assert result.ok, result.error
    assert server.ranges(path)[1] is not None
    headers = server.last_headers(path)
    assert headers is not None
    assert headers["Accept-Encoding"] == "identity"


def test_a_server_that_ignores_range_gives_the_body_once(
    server: ImageServer, dest: Path, name: str
) -> None:
    path = f"/no-range/{name}?size={SIZE}&cuts=1&at=0.5"
    result = download_all([server.url(path)], dest, retry=3)[0]

    assert result.ok, result.error
    body = server.expected(path)
    assert result.path is not None
    # The 200 to the Range request starts the file over: not appended to the half.
    assert result.path.read_bytes() == body
    assert result.bytes == len(body)
    assert starts(server.ranges(path)) == [0, len(body) // 2]


@pytest.mark.parametrize("wrong", ["start", "total", "garbage", "none", "416"])
def test_a_wrong_answer_to_a_range_fails_the_attempt_and_the_next_starts_over(
    server: ImageServer, dest: Path, name: str, wrong: str
) -> None:
    failing = f"/bad-range/a{name}?wrong={wrong}"
    healing = f"/bad-range/b{name}?wrong={wrong}"
    failed = download_all([server.url(failing)], dest / "a", retry=2)[0]
    healed = download_all([server.url(healing)], dest / "b", retry=3)[0]

    assert isinstance(failed.error, TransferError)
    assert "cannot resume" in str(failed.error)
    assert listing(dest / "a") == []
    assert healed.ok, healed.error
    body = server.expected(healing)
    assert healed.path is not None
    assert healed.path.read_bytes() == body
    assert starts(server.ranges(healing)) == [0, len(body) // 2, 0]


def test_a_206_to_a_request_for_the_whole_body_is_refused(
    server: ImageServer, dest: Path, name: str
) -> None:
    path = f"/bad-range/{name}?wrong=first"
    result = download_all([server.url(path)], dest, retry=2)[0]

    assert result.ok, result.error
    assert result.attempts == 2
    assert server.ranges(path) == [None, None]
    assert result.path is not None
    assert result.path.read_bytes() == server.expected(path)


def test_checksums_cover_the_bytes_kept(server: ImageServer, dest: Path, name: str) -> None:
    good = f"/cut/a{name}?size={SIZE}&cuts=2"
    bad = f"/cut/b{name}?size={SIZE}&cuts=1&at=0.5"
    size = len(server.expected(good))
    results = download_all(
        [
            Item(server.url(good), sha256=server.expected_sha256(good), size=size),
            Item(server.url(bad), sha256="0" * 64),
        ],
        dest,
        retry=3,
    )

    assert results[0].ok, results[0].error
    assert results[0].sha256 == server.expected_sha256(good)
    assert starts(server.ranges(good))[1] > 0
    # A body whose hash is wrong is not resumed: the retry asks for all of it.
    assert isinstance(results[1].error, ChecksumError)
    assert starts(server.ranges(bad)) == [0, len(server.expected(bad)) // 2, 0]


# --------------------------------------------------------------------------- across runs


def partial_of(dest: Path, name: str) -> Path:
    return dest / f".{name}.fetchpool-partial"


def test_a_failed_download_keeps_its_partial_file_and_the_next_run_continues_it(
    server: ImageServer, dest: Path, name: str
) -> None:
    path = f"/cut/{name}?size={SIZE}&cuts=1&at=0.5"
    url = server.url(path)
    body = server.expected(path)
    half = len(body) // 2
    first = download_all([url], dest, retry=1, resume=True)[0]

    assert isinstance(first.error, TransferError)
    assert listing(dest) == [partial_of(dest, name).name]
    partial = partial_of(dest, name)
    assert partial.read_bytes() == body[:half]
    assert os.getxattr(partial, "user.xdg.origin.url") == url.encode()
    assert os.getxattr(partial, "user.fetchpool.total") == str(len(body)).encode()
    served = server.bytes_served(path)

    # The hash asked for covers the bytes kept from the first run too.
    second = download_all([Item(url, sha256=sha256(body))], dest, retry=1, resume=True)[0]

    assert second.ok, second.error
    assert second.sha256 == sha256(body)
    assert second.bytes == len(body)
    assert server.bytes_served(path) - served == len(body) - half
    assert server.ranges(path)[-1] == f"bytes={half}-"
    assert listing(dest) == [name]
    assert (dest / name).read_bytes() == body
    # The final file records its origin, not the partial file's record.
    assert sorted(os.listxattr(dest / name)) == ["user.xdg.origin.url"]


def test_without_resume_nothing_is_left_and_a_partial_file_is_left_alone(
    server: ImageServer, dest: Path, name: str
) -> None:
    plain = f"/cut/a{name}?size={SIZE}&cuts=1&at=0.5"
    failed = download_all([server.url(plain)], dest, retry=1)[0]
    assert failed.error is not None
    assert listing(dest) == []

    path = f"/cut/b{name}?size={SIZE}&cuts=1&at=0.5"
    download_all([server.url(path)], dest, retry=1, resume=True)
    partial = partial_of(dest, f"b{name}")
    kept = partial.read_bytes()
    # A run without resume=True does as it always did, and leaves the partial file be.
    plain_run = download_all([server.url(path)], dest, retry=1)[0]
    assert plain_run.ok, plain_run.error
    assert server.ranges(path)[-1] is None
    assert partial.read_bytes() == kept
    # One with resume=True finds the file complete: skipped, the partial file removed.
    again = download_all([server.url(path)], dest, retry=1, resume=True)[0]
    assert again.status == "skipped"
    assert listing(dest) == [f"b{name}"]


def test_a_changed_validator_starts_over(server: ImageServer, dest: Path, name: str) -> None:
    path = f"/cut/{name}?size={SIZE}&cuts=1&at=0.5"
    url = server.url(path)
    body = server.expected(path)
    download_all([url], dest, retry=1, resume=True)
    old_etag = os.getxattr(partial_of(dest, name), "user.fetchpool.validator").decode()
    served = server.bytes_served(path)
    server.generation += 1
    try:
        result = download_all([url], dest, retry=1, resume=True)[0]
    finally:
        server.generation -= 1

    assert result.ok, result.error
    headers = server.last_headers(path)
    assert headers is not None
    assert headers["If-Range"] == old_etag
    assert server.bytes_served(path) - served == len(body)
    assert (dest / name).read_bytes() == body
    assert listing(dest) == [name]


def test_another_urls_partial_file_starts_over(server: ImageServer, dest: Path, name: str) -> None:
    first = f"/cut/a{name}?size={SIZE}&cuts=1&at=0.5"
    second = f"/cut/b{name}?size={SIZE}&cuts=0"
    download_all({server.url(first): "same.png"}, dest, retry=1, resume=True)
    assert partial_of(dest, "same.png").exists()

    result = download_all({server.url(second): "same.png"}, dest, retry=1, resume=True)[0]

    assert result.ok, result.error
    assert server.ranges(second) == [None]
    assert (dest / "same.png").read_bytes() == server.expected(second)
    assert listing(dest) == ["same.png"]


def test_a_cancelled_download_keeps_its_partial_file(
    server: ImageServer, dest: Path, name: str
) -> None:
    path = f"/cut/{name}?size={SIZE}&cuts=1&at=0.5&stall=1"
    body = server.expected(path)
    partial = partial_of(dest, name)
    dl = Downloader(dest, resume=True)
    try:
        future = dl.submit(server.url(path))
        # (The curl backend writes what it gathered 256 KiB at a time: not all of it.)
        wait_for(lambda: size_of(partial) >= RESUME_MIN, 30, "1 MiB in the partial file")
        dl.close(cancel=True)
    finally:
        dl.close(cancel=True)
    result = future.result()
    assert isinstance(result.error, TransferError)
    assert result.error.cancelled
    assert listing(dest) == [partial.name]
    kept = partial.read_bytes()
    assert kept == body[: len(kept)]
    served = server.bytes_served(path)

    again = download_all([server.url(path)], dest, resume=True)[0]

    assert again.ok, again.error
    assert server.ranges(path)[-1] == f"bytes={len(kept)}-"
    assert server.bytes_served(path) - served == len(body) - len(kept)
    assert (dest / name).read_bytes() == body


def test_a_killed_process_leaves_a_partial_file_the_next_run_continues(
    server: ImageServer, dest: Path, tmp_path: Path, name: str, each_backend: str
) -> None:
    path = f"/cut/{name}?size={SIZE}&cuts=1&at=0.5&stall=1"
    url = server.url(path)
    body = server.expected(path)
    partial = partial_of(dest, name)
    config = tmp_path / "child.json"
    config.write_text(
        json.dumps(
            {
                "urls": [url],
                "dest": str(dest),
                "workers": 1,
                "out": None,
                "backend": each_backend,
                "resume": True,
            }
        ),
        encoding="utf-8",
    )
    proc = subprocess.Popen([sys.executable, str(PROC_FETCH), str(config)])
    try:
        wait_for(
            lambda: size_of(partial) >= RESUME_MIN or proc.poll() is not None,
            60,
            "1 MiB in the partial file",
        )
        assert proc.poll() is None, "the child ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # The dead writer's lock file is left (as without resume), and its partial file.
    assert listing(dest) == sorted([LOCK_FILE_NAME, partial.name])
    kept = partial.read_bytes()
    assert kept == body[: len(kept)]
    served = server.bytes_served(path)

    result = download_all([url], dest, resume=True)[0]

    assert result.ok, result.error
    assert server.ranges(path)[-1] == f"bytes={len(kept)}-"
    assert server.bytes_served(path) - served == len(body) - len(kept)
    assert (dest / name).read_bytes() == body
    assert listing(dest) == [name]


def test_partial_file_names_are_reserved(server: ImageServer, dest: Path) -> None:
    url = server.url("/big/x.png?size=2000")
    result = download_all({url: ".x.png.fetchpool-partial"}, dest)[0]
    assert isinstance(result.error, UnsafeFilenameError)


def test_cli_resume(server: ImageServer, tmp_path: Path, name: str) -> None:
    path = f"/cut/{name}?size={SIZE}&cuts=1&at=0.5"
    out = tmp_path / "out"
    args = ["-q", "-d", str(out), "--retries", "0", "--resume", server.url(path)]
    assert main(args) == 1
    assert listing(out) == [f".{name}.fetchpool-partial"]
    assert main(args) == 0
    assert starts(server.ranges(path)) == [0, len(server.expected(path)) // 2]
    assert (out / name).read_bytes() == server.expected(path)
