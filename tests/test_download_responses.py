"""download_all and Downloader with HTTP mocked by ``responses`` (a documented use)."""

from __future__ import annotations

import email.utils
import gzip
import logging
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import as_completed
from pathlib import Path

import pytest
import requests
import responses

from _support import HTML, JPEG, PNG, listing
from fetchpool import (
    Downloader,
    DownloadResult,
    FetchError,
    HTTPStatusError,
    InvalidURL,
    NotAnImageError,
    ProgressEvent,
    RedirectError,
    RetryPolicy,
    StorageError,
    TooLargeError,
    TransferError,
    UnsafeFilenameError,
    download_all,
)

B = "http://img.test"


def calls_to(rs: responses.RequestsMock, url: str) -> int:
    return sum(1 for c in rs.calls if c.request.url == url)


def test_many_urls_on_many_threads(rs: responses.RequestsMock, dest: Path) -> None:
    urls = [f"{B}/img/{i}.png" for i in range(60)]
    bodies = {u: PNG + str(i).encode() for i, u in enumerate(urls)}
    for u, body in bodies.items():
        rs.get(u, body=body, content_type="image/png")
    seen_threads: set[str] = set()
    lock = threading.Lock()

    def callback(event: ProgressEvent) -> None:
        with lock:
            seen_threads.add(threading.current_thread().name)

    results = download_all(urls, dest, workers=8, progress=callback)
    assert [r.url for r in results] == urls
    assert all(r.status == "downloaded" for r in results)
    for r in results:
        assert r.path is not None
        assert r.path.read_bytes() == bodies[r.url]
        assert r.bytes == len(bodies[r.url])
        assert r.attempts == 1
        assert r.content_type == "image/png"
    assert len({t for t in seen_threads if t.startswith("fetchpool")}) > 1
    assert listing(dest) == sorted(f"{i}.png" for i in range(60))


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_healable_statuses_are_retried(
    rs: responses.RequestsMock, dest: Path, waits: list[float], status: int
) -> None:
    url = f"{B}/flaky.png"
    rs.get(url, status=status)
    rs.get(url, status=status)
    rs.get(url, body=PNG)
    (result,) = download_all([url], dest, retry=RetryPolicy(attempts=4, jitter=0))
    assert result.status == "downloaded"
    assert result.attempts == 3
    assert calls_to(rs, url) == 3
    assert waits == [0.5, 1.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451, 501])
def test_other_statuses_are_not_retried(
    rs: responses.RequestsMock, dest: Path, waits: list[float], status: int
) -> None:
    url = f"{B}/gone.png"
    rs.get(url, status=status, body=b"error page")
    (result,) = download_all([url], dest)
    assert result.status == "failed"
    assert isinstance(result.error, HTTPStatusError)
    assert result.error.status_code == status
    assert result.error.url == url
    assert result.attempts == 1
    assert calls_to(rs, url) == 1
    assert waits == []
    assert listing(dest) == []


def test_retries_give_up_after_attempts(
    rs: responses.RequestsMock, dest: Path, waits: list[float]
) -> None:
    url = f"{B}/down.png"
    rs.get(url, status=503)
    (result,) = download_all([url], dest, retry=3)
    assert result.status == "failed"
    assert result.attempts == 3
    assert calls_to(rs, url) == 3
    assert len(waits) == 2
    assert isinstance(result.error, HTTPStatusError)


def test_retry_after_seconds_and_date(
    rs: responses.RequestsMock, dest: Path, waits: list[float]
) -> None:
    a, b = f"{B}/a.png", f"{B}/b.png"
    rs.get(a, status=429, headers={"Retry-After": "7"})
    rs.get(a, body=PNG)
    date = email.utils.formatdate(time.time() + 20, usegmt=True)
    rs.get(b, status=503, headers={"Retry-After": date})
    rs.get(b, body=PNG)
    results = download_all([a], dest, workers=1)
    assert results[0].ok
    assert waits == [7.0]
    waits.clear()
    results = download_all([b], dest, workers=1)
    assert results[0].ok
    assert len(waits) == 1
    assert 15.0 <= waits[0] <= 20.0


def test_absurd_retry_after_ends_retries_at_once(
    rs: responses.RequestsMock, dest: Path, waits: list[float]
) -> None:
    url = f"{B}/later.png"
    rs.get(url, status=503, headers={"Retry-After": "86400"})
    rs.get(url, body=PNG)
    (result,) = download_all([url], dest)
    assert result.status == "failed"
    assert isinstance(result.error, HTTPStatusError)
    assert result.error.retry_after == 86400.0
    assert calls_to(rs, url) == 1
    assert waits == []


def test_connection_errors_are_retried_and_chained(
    rs: responses.RequestsMock, dest: Path, waits: list[float]
) -> None:
    url = f"{B}/reset.png"
    rs.get(url, body=requests.ConnectionError("connection reset by peer"))
    (result,) = download_all([url], dest, retry=2)
    assert result.status == "failed"
    assert result.attempts == 2
    err = result.error
    assert isinstance(err, TransferError)
    assert isinstance(err.__cause__, requests.ConnectionError)
    assert "connection reset by peer" in str(err)
    assert err.url == url


def test_timeouts_are_transfer_errors(
    rs: responses.RequestsMock, dest: Path, waits: list[float]
) -> None:
    url = f"{B}/slow.png"
    rs.get(url, body=requests.ReadTimeout("read timed out"))
    rs.get(url, body=PNG)
    (result,) = download_all([url], dest)
    assert result.ok
    assert result.attempts == 2


def test_request_headers(rs: responses.RequestsMock, dest: Path) -> None:
    url = f"{B}/h.png"
    rs.get(url, body=PNG)
    download_all([url], dest, headers={"X-Token": "abc", "Referer": "https://site.test/"})
    sent = rs.calls[0].request.headers
    assert sent["Accept-Encoding"] == "identity"
    assert sent["X-Token"] == "abc"
    assert sent["Referer"] == "https://site.test/"
    assert sent["User-Agent"].startswith("fetchpool/")


def test_cross_origin_redirect_drops_credentials(rs: responses.RequestsMock, dest: Path) -> None:
    rs.get(f"{B}/r.png", status=302, headers={"Location": f"{B}/same.png"})
    rs.get(f"{B}/same.png", status=301, headers={"Location": "http://cdn.test/final.png"})
    rs.get("http://cdn.test/final.png", body=PNG)
    headers = {"Authorization": "Bearer secret", "Cookie": "sid=1", "X-Keep": "yes"}
    (result,) = download_all([f"{B}/r.png"], dest, headers=headers)
    assert result.ok
    assert result.path == dest / "r.png"
    same, final = rs.calls[1].request.headers, rs.calls[2].request.headers
    assert same["Authorization"] == "Bearer secret"
    assert "Authorization" not in final
    assert "Cookie" not in final
    assert final["X-Keep"] == "yes"


def test_redirect_refusals(rs: responses.RequestsMock, dest: Path, waits: list[float]) -> None:
    rs.get(f"{B}/ftp.png", status=302, headers={"Location": "ftp://files.test/x.png"})
    rs.get(f"{B}/file.png", status=302, headers={"Location": "file:///etc/passwd"})
    rs.get(f"{B}/loop1.png", status=302, headers={"Location": f"{B}/loop2.png"})
    rs.get(f"{B}/loop2.png", status=302, headers={"Location": f"{B}/loop1.png"})
    rs.get("https://secure.test/x.png", status=302, headers={"Location": f"{B}/plain.png"})
    rs.get(f"{B}/plain.png", body=PNG)
    for i in range(12):
        rs.get(f"{B}/hop{i}.png", status=307, headers={"Location": f"{B}/hop{i + 1}.png"})
    rs.get(f"{B}/hop12.png", body=PNG)
    urls = [
        f"{B}/ftp.png",
        f"{B}/file.png",
        f"{B}/loop1.png",
        "https://secure.test/x.png",
        f"{B}/hop0.png",
        f"{B}/hop2.png",
    ]
    results = download_all(urls, dest)
    for r in results[:5]:
        assert isinstance(r.error, RedirectError), r
        assert r.attempts == 1
    assert "loop" in str(results[2].error)
    assert "https to http" in str(results[3].error)
    assert results[5].ok  # exactly 10 hops is allowed
    assert results[5].path == dest / "hop2.png"
    assert listing(dest) == ["hop2.png"]
    (down,) = download_all(["https://secure.test/x.png"], dest, allow_downgrade=True)
    assert down.ok
    assert down.path == dest / "x.png"


def test_not_an_image(rs: responses.RequestsMock, dest: Path, waits: list[float]) -> None:
    rs.get(f"{B}/page.png", body=HTML, content_type="text/html")
    rs.get(f"{B}/fake.png", body=HTML, content_type="image/png")
    rs.get(f"{B}/empty.png", body=b"", content_type="image/png")
    results = download_all([f"{B}/page.png", f"{B}/fake.png", f"{B}/empty.png"], dest)
    for r in results:
        assert isinstance(r.error, NotAnImageError)
        assert r.attempts == 1
    assert listing(dest) == []
    results = download_all([f"{B}/page.png"], dest, verify=None)
    assert results[0].ok
    assert (dest / "page.png").read_bytes() == HTML


def test_max_bytes(rs: responses.RequestsMock, dest: Path, waits: list[float]) -> None:
    rs.get(f"{B}/big.png", body=PNG, headers={"Content-Length": str(len(PNG))})
    (r,) = download_all([f"{B}/big.png"], dest, max_bytes=100)
    assert isinstance(r.error, TooLargeError)
    assert r.attempts == 1
    assert listing(dest) == []
    (r,) = download_all([f"{B}/big.png"], dest, max_bytes=len(PNG))
    assert r.ok
    (dest / "big.png").unlink()
    (r,) = download_all([f"{B}/big.png"], dest, max_bytes=None)
    assert r.ok


def test_gzip_body_is_decoded_and_limited(
    rs: responses.RequestsMock, dest: Path, waits: list[float]
) -> None:
    packed = gzip.compress(PNG)
    rs.get(f"{B}/z.png", body=packed, headers={"Content-Encoding": "gzip"})
    bomb = gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(50 * 1024 * 1024))
    rs.get(f"{B}/bomb.png", body=bomb, headers={"Content-Encoding": "gzip"})
    # An encoding fetchpool never decodes (br and zstd are, with their extras).
    rs.get(f"{B}/lzw.png", body=b"xx", headers={"Content-Encoding": "compress"})
    ok, boom, lzw = download_all(
        [f"{B}/z.png", f"{B}/bomb.png", f"{B}/lzw.png"], dest, max_bytes=1024 * 1024
    )
    assert ok.ok
    assert ok.bytes == len(PNG)
    assert (dest / "z.png").read_bytes() == PNG
    assert isinstance(boom.error, TooLargeError)
    assert boom.attempts == 1
    assert isinstance(lzw.error, TransferError)
    assert "unsupported Content-Encoding 'compress'" in str(lzw.error)
    assert lzw.attempts == 1
    assert listing(dest) == ["z.png"]


def test_repeated_url_is_requested_once(
    rs: responses.RequestsMock, dest: Path, waits: list[float]
) -> None:
    url = f"{B}/same.png"
    rs.get(url, body=PNG)
    results = download_all([url, f"{B}/other.png", url, url], dest)
    assert calls_to(rs, url) == 1
    assert results[0] == results[2] == results[3]
    assert results[0].path == dest / "same.png"
    assert isinstance(results[1].error, TransferError)  # responses refuses unknown URLs


def test_mapping_names(rs: responses.RequestsMock, dest: Path) -> None:
    rs.get(f"{B}/1.png", body=PNG)
    rs.get(f"{B}/2.png", body=JPEG)
    rs.get(f"{B}/3.png", body=PNG)
    rs.get(f"{B}/4.png", body=PNG)
    mapping = {
        f"{B}/1.png": "cats/first.png",
        f"{B}/2.png": "second.jpg",
        f"{B}/3.png": "cats/first.png",
        f"{B}/4.png": "../escape.png",
    }
    results = download_all(mapping, dest)
    assert results[0].path == dest / "cats" / "first.png"
    assert results[1].path == dest / "second.jpg"
    assert (dest / "second.jpg").read_bytes() == JPEG
    assert isinstance(results[2].error, UnsafeFilenameError)
    assert isinstance(results[3].error, UnsafeFilenameError)
    assert calls_to(rs, f"{B}/3.png") == 0
    assert calls_to(rs, f"{B}/4.png") == 0
    assert listing(dest) == ["cats", "cats/first.png", "second.jpg"]
    assert not (dest.parent / "escape.png").exists()


def test_colliding_basenames_get_distinct_stable_names(
    rs: responses.RequestsMock, tmp_path: Path
) -> None:
    urls = [f"{B}/a/cat.jpg", f"{B}/b/cat.jpg", f"{B}/c/cat.jpg?v=2"]
    for i, u in enumerate(urls):
        rs.get(u, body=JPEG + bytes([i]))
    first = download_all(urls, tmp_path / "one", workers=3)
    second = download_all(urls, tmp_path / "two", workers=3)
    names1 = [r.path.name for r in first if r.path]
    names2 = [r.path.name for r in second if r.path]
    assert names1 == names2
    assert len(set(names1)) == 3
    assert names1[0] == "cat.jpg"
    for r in first:
        assert r.path is not None
        assert r.path.read_bytes()[-1] == urls.index(r.url)
    again = download_all(list(reversed(urls)), tmp_path / "one", workers=3)
    assert [r.status for r in again] == ["skipped"] * 3
    assert [r.path for r in again] == [r.path for r in reversed(first)]


def test_input_errors_raise_at_once(dest: Path) -> None:
    with pytest.raises(TypeError):
        download_all("http://img.test/a.png", dest)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        download_all([], dest, workers=0)
    with pytest.raises(TypeError):
        download_all([], dest, workers=2.5)  # type: ignore[arg-type]
    afile = dest / "file"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError):
        download_all([f"{B}/x.png"], afile)
    with pytest.raises(ValueError):
        download_all([], dest, overwrite="sometimes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        download_all([], dest, unknown_option=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        download_all([], dest, fsync="yes")  # type: ignore[arg-type]
    # A file name of the wrong type says so, hashable or not.
    for wrong in (42, ["a.png"]):
        with pytest.raises(TypeError, match=r"expected str, bytes or os\.PathLike"):
            download_all({f"{B}/y.png": wrong}, dest)  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        download_all([], dest, timeout=-1)
    # Beyond what the platform's timers hold: a clear error now, not OverflowError per URL.
    with pytest.raises(ValueError, match="at most"):
        download_all([], dest, timeout=(5, 1e10))
    with pytest.raises(ValueError, match="at most"):
        download_all([], dest, deadline=1e10)


def test_bad_urls_are_failed_results(dest: Path) -> None:
    bad: list[object] = ["ftp://x/y.png", "not a url", None, 42, "http://", "http://h:0/x"]
    results = download_all(bad, dest)  # type: ignore[arg-type]
    assert len(results) == len(bad)
    for r in results:
        assert r.status == "failed"
        assert isinstance(r.error, InvalidURL)
        assert r.attempts == 0
        assert r.path is None


def test_dest_is_created(rs: responses.RequestsMock, tmp_path: Path) -> None:
    rs.get(f"{B}/a.png", body=PNG)
    target = tmp_path / "new" / "deeper"
    (r,) = download_all([f"{B}/a.png"], target)
    assert r.path == target / "a.png"
    assert r.path.read_bytes() == PNG


def test_overwrite_modes(rs: responses.RequestsMock, dest: Path) -> None:
    url = f"{B}/a.png"
    rs.get(url, body=PNG)
    (dest / "a.png").write_bytes(b"old")
    (r,) = download_all([url], dest)
    assert r.status == "skipped"
    assert r.bytes == 3
    assert r.attempts == 0
    assert calls_to(rs, url) == 0
    (r,) = download_all([url], dest, overwrite="error")
    assert isinstance(r.error, StorageError)
    assert calls_to(rs, url) == 0
    assert (dest / "a.png").read_bytes() == b"old"
    (r,) = download_all([url], dest, overwrite="replace")
    assert r.status == "downloaded"
    assert (dest / "a.png").read_bytes() == PNG


def test_progress_events(rs: responses.RequestsMock, dest: Path, waits: list[float]) -> None:
    rs.get(f"{B}/ok.png", body=PNG)
    rs.get(f"{B}/flaky.png", status=503)
    rs.get(f"{B}/flaky.png", body=PNG)
    rs.get(f"{B}/missing.png", status=404)
    events: list[ProgressEvent] = []
    inside = [0]
    overlapped = [False]

    def callback(event: ProgressEvent) -> None:
        # Deliberately not thread-safe: the Downloader must serialise calls.
        inside[0] += 1
        if inside[0] > 1:
            overlapped[0] = True
        time.sleep(0.001)
        events.append(event)
        inside[0] -= 1

    urls = [f"{B}/ok.png", f"{B}/flaky.png", f"{B}/missing.png", "bogus"]
    download_all(urls, dest, workers=4, progress=callback)
    assert not overlapped[0]
    for url in urls:
        states = [e.state for e in events if e.url == url]
        assert states[0] == "started"
        assert states[-1] in ("done", "failed")
        assert states.count("started") == 1
    assert [e.state for e in events if e.url == f"{B}/missing.png"][-1] == "failed"
    assert "retrying" in [e.state for e in events if e.url == f"{B}/flaky.png"]
    ok_progress = [e for e in events if e.url == f"{B}/ok.png" and e.state == "progress"]
    assert ok_progress[-1].bytes == len(PNG)


def test_a_failing_progress_callback_does_not_break_downloads(
    rs: responses.RequestsMock, dest: Path
) -> None:
    rs.get(f"{B}/a.png", body=PNG)

    def callback(event: ProgressEvent) -> None:
        raise RuntimeError("bad callback")

    (r,) = download_all([f"{B}/a.png"], dest, progress=callback)
    assert r.ok


def test_no_secrets_in_messages_or_logs(
    rs: responses.RequestsMock, dest: Path, waits: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    url = "http://alice:hunter2@img.test/private.png"
    rs.get("http://img.test/private.png", status=503)
    caplog.set_level(logging.DEBUG, logger="fetchpool")
    (r,) = download_all([url], dest, retry=2, headers={"Authorization": "Bearer tok3n"})
    assert r.status == "failed"
    assert r.url == url
    assert r.error is not None
    for text in (str(r.error), repr(r.error), r.error.url, caplog.text):
        assert "hunter2" not in text
        assert "tok3n" not in text
    assert "img.test/private.png" in str(r.error)


def test_submit_futures_and_as_completed(rs: responses.RequestsMock, dest: Path) -> None:
    urls = [f"{B}/{i}.png" for i in range(10)]
    for u in urls:
        rs.get(u, body=PNG)
    with Downloader(dest, workers=4) as dl:
        futures = {dl.submit(u): u for u in urls}
        futures[dl.submit("mailto:x@y")] = "mailto:x@y"
        futures[dl.submit(f"{B}/0.png", filename="renamed.png")] = "renamed"
        done = [f.result() for f in as_completed(futures)]
    assert len(done) == 12
    assert sum(r.ok for r in done) == 11
    assert (dest / "renamed.png").read_bytes() == PNG
    with pytest.raises(RuntimeError):
        dl.submit(urls[0])


def test_map_is_lazy_ordered_and_bounded(rs: responses.RequestsMock, dest: Path) -> None:
    pulled = [0]

    def generate() -> Iterator[str]:
        for i in range(80):
            pulled[0] += 1
            yield f"{B}/m/{i}.png"

    for i in range(80):
        rs.get(f"{B}/m/{i}.png", body=PNG + str(i).encode())
    workers = 3
    seen: list[DownloadResult] = []
    with Downloader(dest, workers=workers) as dl:
        it = dl.map(generate())
        first = next(it)
        assert pulled[0] <= 2 * workers + 1
        seen.append(first)
        for r in it:
            assert pulled[0] - len(seen) <= 2 * workers + 1
            seen.append(r)
    assert [r.url for r in seen] == [f"{B}/m/{i}.png" for i in range(80)]
    assert all(r.ok for r in seen)


def test_map_rejects_a_string(dest: Path) -> None:
    with Downloader(dest) as dl, pytest.raises(TypeError):
        dl.map("http://img.test/a.png")  # type: ignore[arg-type]


def test_session_factory(rs: responses.RequestsMock, dest: Path) -> None:
    rs.get(f"{B}/a.png", body=PNG)
    rs.get(f"{B}/b.png", body=PNG)
    made: list[requests.Session] = []

    def factory() -> requests.Session:
        s = requests.Session()
        s.headers["X-From-Factory"] = "1"
        made.append(s)
        return s

    results = download_all([f"{B}/a.png", f"{B}/b.png"], dest, workers=2, session_factory=factory)
    assert all(r.ok for r in results)
    assert 1 <= len(made) <= 2
    assert all(c.request.headers["X-From-Factory"] == "1" for c in rs.calls)


def test_content_disposition_opt_in(rs: responses.RequestsMock, tmp_path: Path) -> None:
    headers = {"Content-Disposition": 'attachment; filename="../../evil.png"'}
    rs.get(f"{B}/dl?id=1", body=PNG, headers=headers)
    (r,) = download_all([f"{B}/dl?id=1"], tmp_path / "off")
    assert r.path == tmp_path / "off" / "dl"
    (r,) = download_all([f"{B}/dl?id=1"], tmp_path / "on", content_disposition=True)
    assert r.path == tmp_path / "on" / "evil.png"
    assert listing(tmp_path / "on") == ["evil.png"]
    (r,) = download_all([f"{B}/dl?id=1"], tmp_path / "on", content_disposition=True)
    assert r.status == "skipped"
    assert r.path == tmp_path / "on" / "evil.png"


def test_errors_carry_url_and_type(rs: responses.RequestsMock, dest: Path) -> None:
    rs.get(f"{B}/x.png", status=404)
    (r,) = download_all([f"{B}/x.png"], dest)
    assert isinstance(r.error, FetchError)
    assert r.error.url == f"{B}/x.png"
    with pytest.raises(HTTPStatusError):
        r.raise_for_error()


def test_progress_true_draws_a_tqdm_bar(
    rs: responses.RequestsMock, dest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rs.get(f"{B}/a.png", body=PNG)
    rs.get(f"{B}/b.png", status=404)
    results = download_all([f"{B}/a.png", f"{B}/b.png"], dest, progress=True)
    assert [r.status for r in results] == ["downloaded", "failed"]
    err = capsys.readouterr().err
    assert "2/2" in err
    assert "1 failed" in err


def test_without_xattrs_names_are_remembered(
    rs: responses.RequestsMock, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fetchpool.pipeline
    import fetchpool.storage

    monkeypatch.setattr(fetchpool.pipeline, "supports_xattrs", lambda directory: False)
    monkeypatch.setattr(fetchpool.storage, "_set_origin", lambda fd, origin: False)
    urls = [f"{B}/a/cat.jpg", f"{B}/b/cat.jpg"]
    rs.get(urls[0], body=JPEG + b"a")
    rs.get(urls[1], body=JPEG + b"b")
    with Downloader(dest, workers=1) as dl:
        first = dl.submit(urls[0]).result()
        # The first file is finished and carries no origin record; only the
        # Downloader's memory keeps the second URL from taking it as its own.
        second = dl.submit(urls[1]).result()
        repeat = dl.submit(urls[0]).result()
    assert first.path == dest / "cat.jpg"
    assert second.status == "downloaded"
    assert second.path is not None
    assert second.path != first.path
    assert second.path.read_bytes() == JPEG + b"b"
    assert repeat.status == "skipped"
    assert repeat.path == first.path


def test_remembered_names_cost_digests_only(tmp_path: Path) -> None:
    # Without xattrs a Downloader remembers every name it gave out (DESIGN rule 3), so
    # that record grows with the URLs: it must stay small. A Path and the URL cost
    # ~550 bytes a name; two 16-byte digests in dicts cost ~130.
    from fetchpool.claims import Claims

    claims = Claims(remember=True)
    n = 2000
    names = [f"img{i}.png" for i in range(n)]
    urls = [f"{B}/a/{name}" for name in names]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name, url in zip(names, urls, strict=True):
            path = claims.url_name(tmp_path, name, url, url)
            claims.release(path, url, keep=True)
        per_name = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(claims) == n
    assert per_name < 200, f"{per_name:.0f} bytes per remembered name"
    # Still a claim: another URL asking for a remembered name gets its derived one.
    other = claims.url_name(tmp_path, "img7.png", f"{B}/b/img7.png", f"{B}/b/img7.png")
    assert other.parent == tmp_path
    assert other.name != "img7.png"
    again = claims.url_name(tmp_path, "img7.png", urls[7], urls[7])
    assert again == tmp_path / "img7.png"
