"""Expected size and hashes (``Item(url, sha256=, md5=, size=)``), on both backends.

Against the real loopback server, faults included: a match is downloaded with its hash
on the result; a mismatch is a ``ChecksumError`` after retries with nothing left in
``dest``; a corrupted transfer heals on retry; a ``Content-Length`` that contradicts
``size=`` fails before the body; a body longer than ``size=`` is stopped; big bodies are
hashed on the splice path (requests) and the sink path (curl); ``overwrite="skip"``
keeps a file only if it matches. Then ``Item`` itself, the input shapes, and the
``responses``-mocked requests backend.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import pickle
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses

import fetchpool.pipeline
from _support import listing
from fetchpool import (
    ChecksumError,
    Downloader,
    FetchError,
    InvalidURL,
    Item,
    RetryPolicy,
    download_all,
)
from fetchpool.checksums import Digests
from fetchpool.retry import is_retryable
from fetchpool.storage import TempFile
from fetchpool.testing import ImageServer
from fetchpool.transfer import CHUNK_SIZE

MiB = 1024 * 1024
_names = itertools.count()


def quick(attempts: int) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, wait_initial=0, wait_max=0, jitter=0)


def fresh(route: str = "any", ext: str = "png") -> str:
    """A path no other test uses (stateful routes count requests per path)."""
    return f"/{route}/c{next(_names)}.{ext}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=0) as srv:
        yield srv


class TempFiles:
    """Counts the temporary files the pipeline creates."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.created = 0
        real = fetchpool.pipeline.TempFile

        def counting(*args: Any, **kwargs: Any) -> TempFile:
            self.created += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(fetchpool.pipeline, "TempFile", counting)


class FileHashes:
    """Spies on the hashing of files found at the final name (and where it runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[Path, str]] = []
        real = fetchpool.pipeline.hash_file

        def spy(path: Path, *args: Any) -> Any:
            self.calls.append((path, threading.current_thread().name))
            return real(path, *args)

        monkeypatch.setattr(fetchpool.pipeline, "hash_file", spy)


class BodyPaths:
    """Which way big bodies went: spliced from the socket (requests), or sunk (curl)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
        self.socket_splices = 0
        self.sinks = 0
        real_splice = os.splice

        def splice(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
            if stat.S_ISSOCK(os.fstat(src).st_mode):
                self.socket_splices += 1
            moved: int = real_splice(src, dst, count, *args, **kwargs)
            return moved

        monkeypatch.setattr(os, "splice", splice)
        if backend == "curl":
            from fetchpool.backends.curl import _Transfer

            real_start = _Transfer.start_sink

            def start_sink(t: _Transfer, sink: Any) -> tuple[int, bool]:
                self.sinks += 1
                return real_start(t, sink)

            monkeypatch.setattr(_Transfer, "start_sink", start_sink)


# --------------------------------------------------------------------- downloads


def test_matching_hashes_and_size_are_downloaded_with_the_hashes(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    url = server.url(fresh())
    body = server.expected(url)
    item = Item(url, sha256=sha256(body).upper(), md5=md5(body), size=len(body))

    (result,) = download_all([item], dest)

    assert result.status == "downloaded", result.error
    assert (result.sha256, result.md5) == (sha256(body), md5(body))
    assert result.path is not None
    assert result.path.read_bytes() == body
    assert result.attempts == 1


def test_no_hash_asked_none_on_the_result(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    url = server.url(fresh())
    (sized, plain) = download_all(
        [Item(url, size=len(server.expected(url))), server.url(fresh())], dest
    )
    assert sized.status == plain.status == "downloaded"
    assert (sized.sha256, sized.md5, plain.sha256, plain.md5) == (None, None, None, None)


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_a_mismatch_fails_after_retries_and_leaves_nothing(
    server: ImageServer, dest: Path, each_backend: str, algorithm: str, waits: list[float]
) -> None:
    url = server.url(fresh())
    wrong = "0" * (64 if algorithm == "sha256" else 32)
    expectation: dict[str, Any] = {algorithm: wrong}

    (result,) = download_all([Item(url, **expectation)], dest, retry=quick(3))

    assert result.status == "failed"
    error = result.error
    assert isinstance(error, ChecksumError)
    body = server.expected(url)
    actual = sha256(body) if algorithm == "sha256" else md5(body)
    assert (error.algorithm, error.expected, error.actual) == (algorithm, wrong, actual)
    assert error.url == url
    assert algorithm in str(error)
    assert wrong in str(error)
    assert actual in str(error)
    assert result.attempts == 3
    assert server.hits(url) == 3
    assert listing(dest) == []  # nothing at the final name, no temporary file


def test_a_mismatch_keeps_credentials_out_of_its_message(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    url = server.url(fresh()).replace("http://", "http://user:hunter2@")

    (result,) = download_all([Item(url, md5="0" * 32)], dest, retry=1)

    error = result.error
    assert isinstance(error, ChecksumError)
    copy = pickle.loads(pickle.dumps(error))
    for text in (str(error), repr(error), error.url, repr(result), str(copy)):
        assert "hunter2" not in text
    assert "md5 mismatch" in str(copy)


def test_the_result_repr_shows_a_hash_only_when_computed(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    url = server.url(fresh())
    hashed, plain = download_all(
        [Item(url, sha256=sha256(server.expected(url))), server.url(fresh())], dest
    )
    assert f"sha256={hashed.sha256!r}" in repr(hashed)
    assert "md5" not in repr(hashed)
    assert "sha256" not in repr(plain)


def test_a_body_corrupted_once_heals_on_retry(
    server: ImageServer, dest: Path, each_backend: str, waits: list[float]
) -> None:
    url = server.url(fresh("corrupt/1"))
    body = server.expected(url)

    (result,) = download_all([Item(url, sha256=sha256(body))], dest, retry=quick(3))

    assert result.status == "downloaded", result.error
    assert result.attempts == 2
    assert result.sha256 == sha256(body)
    assert result.path is not None
    assert result.path.read_bytes() == body


def test_without_a_hash_the_corrupted_body_is_taken(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    # The fault is real: without an expectation, nothing notices it.
    url = server.url(fresh("corrupt/1"))
    (result,) = download_all([url], dest)
    assert result.status == "downloaded"
    assert result.path is not None
    assert result.path.read_bytes() != server.expected(url)
    assert len(result.path.read_bytes()) == len(server.expected(url))


def test_content_length_against_size_fails_before_the_body(
    server: ImageServer,
    dest: Path,
    each_backend: str,
    monkeypatch: pytest.MonkeyPatch,
    waits: list[float],
) -> None:
    temps = TempFiles(monkeypatch)
    url = server.url(fresh())
    length = len(server.expected(url))

    (result,) = download_all([Item(url, size=length - 1)], dest, retry=quick(3))

    error = result.error
    assert isinstance(error, ChecksumError)
    assert (error.algorithm, error.expected, error.actual) == ("size", length - 1, length)
    assert "Content-Length" in str(error)
    # The server would say the same again: not retried.
    assert not error.retryable
    assert result.attempts == 1
    assert server.hits(url) == 1
    assert temps.created == 0  # no byte of the body was stored
    assert listing(dest) == []


@pytest.mark.parametrize("route", ["endless", "gzip"])
def test_a_body_longer_than_size_is_stopped_as_it_passes(
    server: ImageServer, dest: Path, each_backend: str, route: str
) -> None:
    # Neither announces its decoded size: /endless/ is chunked, /gzip/ counts the
    # compressed bytes. Without size= the endless one would run to max_bytes (2 GiB).
    url = server.url(fresh(route))
    size = 1000

    (result,) = download_all([Item(url, size=size)], dest, retry=1)

    error = result.error
    assert isinstance(error, ChecksumError), error
    assert (error.algorithm, error.expected) == ("size", size)
    assert isinstance(error.actual, int)
    assert size < error.actual <= size + CHUNK_SIZE
    assert "is longer (stopped at" in str(error)  # as it came, not at the body's end
    assert error.retryable
    assert listing(dest) == []


def test_a_body_shorter_than_size_fails_at_its_end(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    url = server.url(fresh("gzip"))  # no decoded length announced
    length = len(server.expected(url))

    (result,) = download_all([Item(url, size=length + 1)], dest, retry=1)

    error = result.error
    assert isinstance(error, ChecksumError), error
    assert (error.algorithm, error.expected, error.actual) == ("size", length + 1, length)
    assert listing(dest) == []


def test_a_big_body_is_hashed_on_its_fast_path(
    server: ImageServer, dest: Path, each_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = BodyPaths(monkeypatch, each_backend)
    hashes = FileHashes(monkeypatch)
    url = server.url(fresh("big") + f"?size={3 * MiB + 12_345}")
    body = server.expected(url)
    assert len(body) > 2 * MiB

    (result,) = download_all([Item(url, sha256=sha256(body), md5=md5(body))], dest)

    assert result.status == "downloaded", result.error
    assert (result.sha256, result.md5) == (sha256(body), md5(body))
    assert result.path is not None
    assert result.path.read_bytes() == body
    assert hashes.calls == []  # hashed as it streamed: the file was not read back
    if each_backend == "requests":
        assert hasattr(os, "splice")
        assert paths.socket_splices > 0  # socket -> pipe, then read, hashed, written
    else:
        assert paths.sinks == 1  # written (and hashed) from libcurl's write callback


def test_a_big_corrupted_body_fails_on_its_fast_path(
    server: ImageServer, dest: Path, each_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = BodyPaths(monkeypatch, each_backend)
    url = server.url(fresh("corrupt/5") + f"?size={3 * MiB}")
    body = server.expected(url)

    (result,) = download_all([Item(url, sha256=sha256(body))], dest, retry=quick(2))

    error = result.error
    assert isinstance(error, ChecksumError), error
    assert error.algorithm == "sha256"
    assert error.actual == sha256(body[:-1] + bytes((body[-1] ^ 0xFF,)))
    assert paths.socket_splices > 0 or paths.sinks == 2
    assert listing(dest) == []


# ------------------------------------------------------------ overwrite="skip"


def test_skip_keeps_a_matching_file_and_reports_its_hash(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    url = server.url(fresh())
    body = server.expected(url)
    item = Item(url, sha256=sha256(body), size=len(body))
    (first,) = download_all([item], dest)
    assert first.status == "downloaded"

    (again,) = download_all([item], dest)

    assert again.status == "skipped"
    assert again.attempts == 0
    assert again.bytes == len(body)
    assert again.sha256 == sha256(body)
    assert server.hits(url) == 1


def test_skip_by_size_alone_reads_nothing(
    server: ImageServer, dest: Path, each_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.url(fresh())
    body = server.expected(url)
    download_all([url], dest)
    hashes = FileHashes(monkeypatch)

    (again,) = download_all([Item(url, size=len(body))], dest)

    assert again.status == "skipped"
    assert again.sha256 is None
    assert hashes.calls == []


def test_skip_downloads_again_a_file_that_does_not_match(
    server: ImageServer,
    dest: Path,
    each_backend: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = server.url(fresh())
    body = server.expected(url)
    target = dest / Path(url).name
    target.write_bytes(b"\x89PNG" + bytes(len(body) - 4))  # the right size, not the bytes
    hashes = FileHashes(monkeypatch)

    with caplog.at_level(logging.INFO, logger="fetchpool"):
        (result,) = download_all([Item(url, sha256=sha256(body), size=len(body))], dest)

    assert result.status == "downloaded", result.error
    assert result.attempts == 1
    assert result.sha256 == sha256(body)
    assert target.read_bytes() == body
    assert [path for path, _ in hashes.calls] == [target]  # read once, to check it
    assert "does not match" in caplog.text
    assert "sha256 mismatch" in caplog.text
    assert listing(dest) == [target.name]


def test_skip_downloads_again_a_file_of_the_wrong_size_without_hashing_it(
    server: ImageServer,
    dest: Path,
    each_backend: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = server.url(fresh())
    body = server.expected(url)
    target = dest / Path(url).name
    target.write_bytes(body[:-10])  # cut short, as by a tool that wrote in place
    hashes = FileHashes(monkeypatch)

    with caplog.at_level(logging.INFO, logger="fetchpool"):
        (result,) = download_all([Item(url, sha256=sha256(body), size=len(body))], dest)

    assert result.status == "downloaded", result.error
    assert target.read_bytes() == body
    assert hashes.calls == []  # the size said it all
    assert "size mismatch" in caplog.text


def test_skip_hashes_a_big_file_off_the_loop(
    server: ImageServer, dest: Path, each_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.url(fresh("big") + f"?size={2 * MiB}")
    body = server.expected(url)
    (dest / "big.png").write_bytes(body)
    hashes = FileHashes(monkeypatch)

    (result,) = download_all([Item(url, filename="big.png", sha256=sha256(body))], dest)

    assert result.status == "skipped"
    assert result.sha256 == sha256(body)
    assert len(hashes.calls) == 1
    # The curl backend's loop thread runs every download: a big read is not for it.
    assert hashes.calls[0][1] != "fetchpool-curl"


def test_without_expectations_a_file_is_skipped_unread(
    server: ImageServer, dest: Path, each_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.url(fresh())
    (dest / Path(url).name).write_bytes(b"anything")
    hashes = FileHashes(monkeypatch)
    (result,) = download_all([url], dest)
    assert (result.status, result.bytes, result.sha256) == ("skipped", 8, None)
    assert hashes.calls == []


# ------------------------------------------------------------------ input shapes


def test_strings_and_items_mixed_in_input_order(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    a, b, c = (server.url(fresh()) for _ in range(3))
    body_b = server.expected(b)
    urls: list[str | Item] = [a, Item(b, "named/b.png", sha256=sha256(body_b)), c, "not a url"]

    results = download_all(urls, dest)

    assert [r.url for r in results] == [a, b, c, "not a url"]
    assert [r.status for r in results] == ["downloaded", "downloaded", "downloaded", "failed"]
    assert results[1].path == dest / "named" / "b.png"
    assert results[1].sha256 == sha256(body_b)
    assert results[0].sha256 is None
    assert isinstance(results[3].error, InvalidURL)


def test_an_item_that_is_not_a_url_is_a_failed_result(dest: Path, each_backend: str) -> None:
    (result,) = download_all([Item("ftp://example.org/x.png", size=3)], dest)
    assert result.status == "failed"
    assert isinstance(result.error, InvalidURL)


def test_repeats_share_the_outcome_only_when_they_ask_the_same(
    server: ImageServer, dest: Path, each_backend: str
) -> None:
    url = server.url(fresh())
    digest = sha256(server.expected(url))
    same = Item(url, sha256=digest.upper())  # the same expectation, spelt otherwise

    results = download_all(
        [Item(url, sha256=digest), same, url, Item(url, "other.png", sha256=digest)], dest
    )

    first, repeat, plain, renamed = results
    assert first.status == repeat.status == "downloaded"
    assert repeat is first
    for result, what in ((plain, "size or hash"), (renamed, "file name")):
        assert result.status == "failed"
        assert type(result.error) is FetchError
        assert what in str(result.error)
        assert "repeated" in str(result.error)
    assert server.hits(url) == 1
    assert listing(dest) == [Path(url).name]


def test_submit_takes_an_item(server: ImageServer, dest: Path, each_backend: str) -> None:
    url = server.url(fresh())
    body = server.expected(url)
    with Downloader(dest) as dl:
        named = dl.submit(Item(url, "x/y.png", md5=md5(body))).result()
        again = dl.submit(Item(url, md5=md5(body)), filename="x/y.png").result()
        with pytest.raises(TypeError, match="filename given twice"):
            dl.submit(Item(url, "a.png"), filename="b.png")
    assert (named.status, named.path, named.md5) == ("downloaded", dest / "x" / "y.png", md5(body))
    assert (again.status, again.md5) == ("skipped", md5(body))


def test_map_takes_items(server: ImageServer, dest: Path, each_backend: str) -> None:
    urls = [server.url(fresh()) for _ in range(5)]
    items = [
        Item(u, sha256=sha256(server.expected(u))) if i % 2 else Item(u, size=1)
        for i, u in enumerate(urls)
    ]
    with Downloader(dest, workers=2, retry=1) as dl:
        results = list(dl.map(itertools.chain(items, [urls[0]])))
    assert [r.url for r in results] == [*urls, urls[0]]
    assert [r.status for r in results] == ["failed", "downloaded"] * 2 + ["failed", "downloaded"]
    assert all(isinstance(r.error, ChecksumError) for r in results[0:5:2])
    assert [r.sha256 for r in results[1:5:2]] == [sha256(server.expected(u)) for u in urls[1:5:2]]


# ------------------------------------------------------------------------ Item


def test_item_normalises_and_keeps_the_url_as_given() -> None:
    item = Item("not even a URL", sha256="AB" * 32, md5="Cd" * 16, size=0)
    assert item.url == "not even a URL"
    assert (item.sha256, item.md5, item.size) == ("ab" * 32, "cd" * 16, 0)
    assert Item("u", sha256="AB" * 32) == Item("u", sha256="ab" * 32)
    assert Item("u").filename is None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"sha256": "ab" * 31}, ValueError),
        ({"sha256": "zz" * 32}, ValueError),
        ({"sha256": "ab" * 32 + "\n"}, ValueError),
        ({"sha256": b"ab" * 32}, TypeError),
        ({"md5": "ab" * 32}, ValueError),
        ({"md5": 0}, TypeError),
        ({"size": -1}, ValueError),
        ({"size": 1.0}, TypeError),
        ({"size": True}, TypeError),
        ({"size": "10"}, TypeError),
        ({"filename": 3}, TypeError),
    ],
)
def test_item_refuses_bad_values_at_once(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Item("https://example.org/x.png", **kwargs)


def test_item_is_frozen_picklable_and_its_repr_hides_credentials() -> None:
    item = Item("https://user:hunter2@h/x.png", Path("a/b.png"), sha256="ab" * 32, size=5)
    assert pickle.loads(pickle.dumps(item)) == item
    with pytest.raises(AttributeError):
        item.size = 6  # type: ignore[misc]
    text = repr(item)
    assert "hunter2" not in text
    assert "h/x.png" in text
    assert "size=5" in text
    assert "md5" not in text
    with pytest.raises(TypeError):
        Item("u", "f", "ab" * 32)  # type: ignore[call-arg]  # the expectations are keywords


def test_checksum_error_pickles_with_its_attributes() -> None:
    error = ChecksumError(
        "sha256 mismatch for u", url="u", algorithm="sha256", expected="a", actual="b"
    )
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ChecksumError)
    assert isinstance(copy, FetchError)
    assert (copy.url, copy.algorithm, copy.expected, copy.actual, copy.retryable) == (
        "u",
        "sha256",
        "a",
        "b",
        True,
    )
    assert str(copy) == str(error)
    assert is_retryable(copy)
    stop = ChecksumError("m", url="u", algorithm="size", expected=1, actual=2, retryable=False)
    assert not is_retryable(pickle.loads(pickle.dumps(stop)))


def test_temp_file_hashes_what_is_written_and_spliced(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 7)
    plain = TempFile(tmp_path, "k0")
    assert not plain.hashing
    plain.discard()
    tmp = TempFile(tmp_path, "k1", digests=Digests(("sha256", "md5")))
    assert tmp.hashing
    tmp.write(data[:100])
    read_end, write_end = os.pipe()
    try:
        done = 100
        while done < len(data):
            piece = data[done : done + 60_000]
            os.write(write_end, piece)
            tmp.splice_from(read_end, len(piece))
            done += len(piece)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert tmp.size == len(data)
    assert tmp.digests is not None
    assert tmp.digests.hexdigests() == {"sha256": sha256(data), "md5": md5(data)}
    tmp.commit(tmp_path / "out.bin", None, False)
    assert (tmp_path / "out.bin").read_bytes() == data


# ------------------------------------------------------------ responses (requests)


@pytest.mark.requests_only
def test_responses_mismatch_is_retried_then_fails(
    rs: responses.RequestsMock, dest: Path, waits: list[float]
) -> None:
    body = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    call = rs.get("https://cdn.test/a.png", body=body, content_type="image/png")

    (result,) = download_all(
        [Item("https://cdn.test/a.png", sha256="0" * 64)], dest, retry=quick(4)
    )

    assert isinstance(result.error, ChecksumError)
    assert result.error.actual == sha256(body)
    assert call.call_count == 4
    assert len(waits) == 3
    assert listing(dest) == []


@pytest.mark.requests_only
def test_responses_match_and_content_length_mismatch(
    rs: responses.RequestsMock, dest: Path
) -> None:
    body = b"\x89PNG\r\n\x1a\n" + bytes(300)
    rs.get("https://cdn.test/ok.png", body=body, content_type="image/png")
    short = rs.get(
        "https://cdn.test/short.png",
        body=body,
        content_type="image/png",
        auto_calculate_content_length=True,
    )

    ok, wrong = download_all(
        [
            Item("https://cdn.test/ok.png", md5=md5(body), size=len(body)),
            Item("https://cdn.test/short.png", size=len(body) + 1),
        ],
        dest,
    )

    assert (ok.status, ok.md5, ok.sha256) == ("downloaded", md5(body), None)
    assert isinstance(wrong.error, ChecksumError)
    assert (wrong.error.expected, wrong.error.actual) == (len(body) + 1, len(body))
    assert "Content-Length" in str(wrong.error)
    assert short.call_count == 1
    assert listing(dest) == ["ok.png"]
