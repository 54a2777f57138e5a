"""Tests for fetchpool.testing: the loopback image server and make_image."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import requests

from fetchpool.testing import ImageServer, make_image
from fetchpool.transfer import brotli_module, zstd_module

KINDS = ("png", "jpeg", "gif", "webp", "bmp")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
}
TIMEOUT = 10


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=100) as srv:
        yield srv
    assert srv.errors == []


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as sess:
        yield sess


# --------------------------------------------------------------------------- helpers


def raw_request(srv: ImageServer, path: str, *, timeout: float = TIMEOUT) -> bytes:
    """Send one GET with a raw socket and read until the server closes."""
    parts = urlsplit(srv.base_url)
    assert parts.hostname is not None
    assert parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = [(name, value.strip()) for name, _, value in (x.partition(":") for x in lines)]
    return status, headers, body


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def check_png(data: bytes) -> None:
    assert data[:8] == PNG_SIGNATURE
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + payload), f"bad CRC in {tag!r}"
        chunks.append(tag)
        if tag == b"IDAT":
            idat += payload
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0] == b"IHDR"
    assert chunks[-1] == b"IEND"
    assert b"IDAT" in chunks
    ihdr = data[16:29]
    width, height, depth, color = struct.unpack(">IIBB", ihdr[:10])
    assert (depth, color) == (8, 2)
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)


def check_jpeg(data: bytes) -> None:
    assert data[:2] == b"\xff\xd8"
    assert data[-2:] == b"\xff\xd9"
    pos, markers = 2, []
    while True:
        assert data[pos] == 0xFF
        marker = data[pos + 1]
        markers.append(marker)
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        pos += 2 + length
    assert 0xC0 in markers
    assert 0xDB in markers
    assert 0xC4 in markers


def check_gif(data: bytes) -> None:
    assert data[:6] == b"GIF89a"
    assert data[-1] == 0x3B
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = 0

    def skip_sub_blocks(pos: int) -> int:
        while data[pos]:
            pos += 1 + data[pos]
        return pos + 1

    while data[pos] != 0x3B:
        if data[pos] == 0x21:
            pos = skip_sub_blocks(pos + 2)
        else:
            assert data[pos] == 0x2C
            frames += 1
            pos = skip_sub_blocks(pos + 11)
    assert pos == len(data) - 1
    assert frames == 1


def check_webp(data: bytes) -> None:
    assert data[:4] == b"RIFF"
    assert data[8:12] == b"WEBP"
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    pos, tags = 12, []
    while pos < len(data):
        tags.append(data[pos : pos + 4])
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        pos += 8 + size + size % 2
    assert pos == len(data)
    assert tags[0] in (b"VP8X", b"VP8L", b"VP8 ")
    assert b"VP8L" in tags or b"VP8 " in tags


def check_bmp(data: bytes) -> None:
    assert data[:2] == b"BM"
    size, _, _, offset = struct.unpack("<IHHI", data[2:14])
    assert size == len(data)
    assert offset == 54
    _, width, height, _, bits = struct.unpack("<IiiHH", data[14:30])
    assert bits == 24
    assert 54 + ((3 * width + 3) & ~3) * abs(height) == len(data)


CHECKS = {"png": check_png, "jpeg": check_jpeg, "gif": check_gif, "webp": check_webp}
CHECKS["bmp"] = check_bmp


def kind_of(data: bytes) -> str:
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data.startswith(b"GIF8"):
        return "gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    assert data.startswith(b"BM")
    return "bmp"


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [1_000, 30_000, 150_000])
def test_make_image_is_valid_and_about_the_right_size(kind: str, size: int) -> None:
    data = make_image(kind, size, seed=3)
    assert kind_of(data) == kind
    assert abs(len(data) - size) <= max(200, size // 50)
    CHECKS[kind](data)


@pytest.mark.parametrize("kind", KINDS)
def test_make_image_tiny_sizes_are_still_valid(kind: str) -> None:
    for size in (0, 1, 70, 65_537, 65_540):
        CHECKS[kind](make_image(kind, size, seed=1))


@pytest.mark.parametrize("kind", KINDS)
def test_make_image_is_deterministic(kind: str) -> None:
    assert make_image(kind, 25_000, 5) == make_image(kind, 25_000, 5)
    assert make_image(kind, 25_000, 5) != make_image(kind, 25_000, 6)


def test_make_image_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind"):
        make_image("tiff", 1000, 0)
    with pytest.raises(ValueError, match="size"):
        make_image("png", -1, 0)


def corpus_tails(srv: ImageServer) -> list[str]:
    with srv:
        return [url.removeprefix(srv.base_url) for url in srv.urls]


def test_corpus_is_realistic_and_deterministic() -> None:
    first, second, other = ImageServer(seed=0), ImageServer(seed=0), ImageServer(seed=1)
    tails = corpus_tails(first)
    assert tails == corpus_tails(second)
    assert tails[0].startswith("/img/0000.")
    assert tails[-3:] == ["/a/cat.jpg", "/b/cat.jpg", "/img/cat.jpg?v=2"]
    images = [first.expected(tail) for tail in tails]
    assert images == [second.expected(tail) for tail in tails]
    assert images != [other.expected(tail) for tail in corpus_tails(other)]
    sizes = [len(image) for image in images]
    assert all(15_000 <= size <= 320_000 for size in sizes)
    assert sum(size < 100_000 for size in sizes) >= 70
    assert any(size > 100_000 for size in sizes)
    assert {kind_of(image) for image in images} == set(KINDS)


def test_collision_urls(server: ImageServer) -> None:
    tails = [u.removeprefix(server.base_url) for u in server.urls[-3:]]
    assert tails == ["/a/cat.jpg", "/b/cat.jpg", "/img/cat.jpg?v=2"]
    assert len({server.expected(t) for t in tails}) == 3
    with pytest.raises(KeyError):
        server.expected("/img/cat.jpg")


# --------------------------------------------------------------------------- basics


def test_corpus_urls_serve_expected_bytes(server: ImageServer, session: requests.Session) -> None:
    assert len(server.urls) == 100
    for url in server.urls:
        response = session.get(url, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.content == server.expected(url)
        path = url.removeprefix(server.base_url)
        assert server.expected(path) == response.content
        digest = hashlib.sha256(response.content).hexdigest()
        assert server.expected_sha256(url) == digest
        extension = urlsplit(url).path.rsplit(".", 1)[-1]
        assert response.headers["Content-Type"] == CONTENT_TYPES[extension]
        CHECKS[kind_of(response.content)](response.content)


def test_lifecycle() -> None:
    srv = ImageServer(n_images=0)
    with pytest.raises(RuntimeError):
        _ = srv.base_url
    assert srv.start() is srv
    first = srv.base_url
    assert srv.start() is srv
    assert srv.base_url == first
    assert srv.base_url.startswith("http://127.0.0.1:")
    assert srv.url("x/y.png") == first + "/x/y.png"
    assert srv.url("/x/y.png") == first + "/x/y.png"
    assert srv.urls == []
    srv.stop()
    srv.stop()
    with srv, requests.Session() as sess:
        assert sess.get(srv.url("/any/x.png"), timeout=TIMEOUT).status_code == 200


def test_start_is_fast() -> None:
    started = time.monotonic()
    with ImageServer(n_images=100):
        pass
    assert time.monotonic() - started < 1.0


def test_head_request(server: ImageServer, session: requests.Session) -> None:
    url = server.urls[1]
    before = server.hits(url)
    response = session.head(url, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["Content-Length"]) == len(server.expected(url))
    assert server.hits(url) == before + 1
    # The keep-alive connection must still be usable after a body-less answer.
    assert session.get(url, timeout=TIMEOUT).content == server.expected(url)


def test_unknown_paths_are_404(server: ImageServer, session: requests.Session) -> None:
    for path in ("/nope/x.png", "/img/9999.png", "/", "/any", "/status/abc/x", "/fail/1/x"):
        response = session.get(server.url(path), timeout=TIMEOUT)
        assert response.status_code == 404, path
        assert int(response.headers["Content-Length"]) == len(response.content) > 0
        with pytest.raises(KeyError):
            server.expected(path)


def test_hits_and_total_requests(server: ImageServer, session: requests.Session) -> None:
    path = "/status/404/hits.png"
    server.reset_hits()
    assert server.total_requests == 0
    for _ in range(3):
        session.get(server.url(path + "?n=1"), timeout=TIMEOUT)
    session.head(server.url(path), timeout=TIMEOUT)
    assert server.hits(path) == 4
    assert server.hits(server.url(path)) == 4
    assert server.hits("/status/404/other.png") == 0
    assert server.total_requests == 4
    server.reset_hits()
    assert server.hits(path) == 0
    assert server.total_requests == 0


def test_headers_are_echoed_and_recorded(server: ImageServer, session: requests.Session) -> None:
    response = session.get(
        server.url("/headers"), headers={"X-Probe": "abc", "User-Agent": "ua/1"}, timeout=TIMEOUT
    )
    assert response.headers["Content-Type"] == "application/json"
    echoed = json.loads(response.content)
    assert echoed["X-Probe"] == "abc"
    assert echoed["User-Agent"] == "ua/1"
    session.get(server.urls[0], headers={"X-Probe": "img"}, timeout=TIMEOUT)
    recorded = server.last_headers(server.urls[0])
    assert recorded is not None
    assert recorded["X-Probe"] == "img"
    assert server.last_headers("/never/requested.png") is None


def test_latency_applies_per_request(server: ImageServer, session: requests.Session) -> None:
    url = server.urls[2]
    session.get(url, timeout=TIMEOUT)
    server.latency = 0.2
    try:
        started = time.monotonic()
        for _ in range(2):
            assert session.get(url, timeout=TIMEOUT).content == server.expected(url)
        assert time.monotonic() - started >= 0.38
        started = time.monotonic()
        assert session.get(server.url("/status/404/lat.png"), timeout=TIMEOUT).status_code == 404
        assert time.monotonic() - started >= 0.19
    finally:
        server.latency = 0.0


def test_latency_constructor_argument() -> None:
    with ImageServer(n_images=1, latency=0.2) as srv, requests.Session() as sess:
        started = time.monotonic()
        assert sess.get(srv.urls[0], timeout=TIMEOUT).status_code == 200
        assert time.monotonic() - started >= 0.19


# --------------------------------------------------------------------------- /any/


@pytest.mark.parametrize(
    "path",
    [
        "/any/plain.png",
        "/any/%2e%2e%2f",
        "/any/a%5cb.png",
        "/any/%00x.png",
        "/any/%E2%82%AC.jpg",
        "/any/sp ace.gif",
        "/any/" + "n" * 300 + ".webp",
        "/any/dir/",
        "/any/",
        "/any/x.bmp?query=1&b=%2F",
    ],
)
def test_any_serves_expected_image(
    server: ImageServer, session: requests.Session, path: str
) -> None:
    response = session.get(server.url(path), timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("image/")
    assert response.content == server.expected(path)
    assert response.content == server.expected(server.url(path))
    CHECKS[kind_of(response.content)](response.content)


def test_any_extension_picks_the_format(server: ImageServer) -> None:
    for extension, kind in [("png", "png"), ("jpg", "jpeg"), ("gif", "gif"), ("webp", "webp")]:
        assert kind_of(server.expected(f"/any/pick.{extension}")) == kind
    assert kind_of(server.expected("/any/pick.bmp")) == "bmp"
    assert server.expected("/any/one.png") != server.expected("/any/two.png")


# --------------------------------------------------------------------------- statuses


def test_status_with_retry_after(server: ImageServer, session: requests.Session) -> None:
    response = session.get(server.url("/status/503/x.png?retry_after=120"), timeout=TIMEOUT)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "120"
    assert int(response.headers["Content-Length"]) == len(response.content)
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    url = server.url("/status/429/x.png?retry_after=" + quote(date))
    response = session.get(url, timeout=TIMEOUT)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == date
    response = session.get(server.url("/status/404/x.png"), timeout=TIMEOUT)
    assert response.status_code == 404
    assert "Retry-After" not in response.headers
    response = session.get(server.url("/status/204/x.png"), timeout=TIMEOUT)
    assert response.status_code == 204
    assert response.content == b""
    with pytest.raises(KeyError):
        server.expected("/status/200/x.png")


def test_fail_then_succeed(server: ImageServer, session: requests.Session) -> None:
    path = "/fail/2/503/fail.png?retry_after=3"
    url = server.url(path)
    for _ in range(2):
        response = session.get(url, timeout=TIMEOUT)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "3"
    for _ in range(2):
        response = session.get(url, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.content == server.expected(path)
    assert server.hits("/fail/2/503/fail.png") == 4
    # State is per full URL, query included.
    assert session.get(server.url("/fail/1/500/fail.png"), timeout=TIMEOUT).status_code == 500


# --------------------------------------------------------------------------- redirects


def test_redirect_chain(server: ImageServer, session: requests.Session) -> None:
    url = server.url("/redirect/3/chain.png")
    response = session.get(url, timeout=TIMEOUT)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [302, 302, 302]
    assert response.content == server.expected(url)
    assert response.content == server.expected("/redirect/0/chain.png")
    assert server.hits("/redirect/1/chain.png") == 1

    hop = session.get(
        server.url("/redirect/2/c.png?code=307"), allow_redirects=False, timeout=TIMEOUT
    )
    assert hop.status_code == 307
    assert hop.headers["Location"] == "/redirect/1/c.png?code=307"
    assert int(hop.headers["Content-Length"]) == len(hop.content) > 0


def test_redirect_to_is_verbatim(server: ImageServer, session: requests.Session) -> None:
    for location in ("ftp://example.invalid/x.png", "file:///etc/passwd", "http://other/x"):
        url = server.url("/redirect-to?location=" + quote(location, safe=""))
        response = session.get(url, allow_redirects=False, timeout=TIMEOUT)
        assert response.status_code == 302
        assert response.headers["Location"] == location


def test_redirect_loops(server: ImageServer, session: requests.Session) -> None:
    hop = session.get(server.url("/loop/a.png"), allow_redirects=False, timeout=TIMEOUT)
    assert hop.headers["Location"] == "/loop2/a.png"
    hop = session.get(server.url("/loop2/a.png"), allow_redirects=False, timeout=TIMEOUT)
    assert hop.headers["Location"] == "/loop/a.png"
    hop = session.get(server.url("/self-loop/b.png"), allow_redirects=False, timeout=TIMEOUT)
    assert hop.headers["Location"] == "/self-loop/b.png"
    with pytest.raises(requests.TooManyRedirects):
        session.get(server.url("/loop/a.png"), timeout=TIMEOUT)
    with pytest.raises(KeyError):
        server.expected("/loop/a.png")


def read_head(sock: socket.socket) -> bytes:
    received = b""
    while b"\r\n\r\n" not in received:
        data = sock.recv(4096)
        assert data, "connection closed before the end of the headers"
        received += data
    return received.partition(b"\r\n\r\n")[0]


def test_redirect_big_body(server: ImageServer, session: requests.Session) -> None:
    parts = urlsplit(server.base_url)
    assert parts.hostname is not None
    assert parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /redirect-big-body/x.png HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = split_response(read_head(sock) + b"\r\n\r\n")
    # Hanging up without reading the 50 MiB must be a non-event for the server.
    assert status.startswith("HTTP/1.1 302")
    assert ("Content-Length", str(50 * 1024 * 1024)) in headers
    location = dict(headers)["Location"]
    assert location == server.urls[0].removeprefix(server.base_url)
    assert server.expected("/redirect-big-body/x.png") == server.expected(location)
    # requests itself does read 3xx bodies (to reuse the connection): 50 MiB arrive.
    response = session.get(server.url("/redirect-big-body/x.png"), timeout=TIMEOUT)
    assert response.content == server.expected(location)
    assert len(response.history[0].content) == 50 * 1024 * 1024


# --------------------------------------------------------------------------- faults


def test_reset(server: ImageServer, session: requests.Session) -> None:
    with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        session.get(server.url("/reset/r.png"), timeout=TIMEOUT)
    # Stateless: it resets every time.
    with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        session.get(server.url("/reset/r.png"), timeout=TIMEOUT)


def test_reset_once(server: ImageServer, session: requests.Session) -> None:
    url = server.url("/reset-once/r.png")
    with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        session.get(url, timeout=TIMEOUT)
    assert session.get(url, timeout=TIMEOUT).content == server.expected(url)


def test_truncate(server: ImageServer, session: requests.Session) -> None:
    for _ in range(2):
        with (
            session.get(server.url("/truncate/t.jpg"), stream=True, timeout=TIMEOUT) as resp,
            pytest.raises((requests.exceptions.ChunkedEncodingError, requests.ConnectionError)),
        ):
            b"".join(resp.iter_content(8192))
    raw = raw_request(server, "/truncate/t.jpg")
    _, headers, body = split_response(raw)
    full = server.expected("/truncate/t.jpg")
    assert ("Content-Length", str(len(full))) in headers
    assert body == full[: len(full) // 2]


def test_truncate_once(server: ImageServer, session: requests.Session) -> None:
    url = server.url("/truncate-once/t.png")
    with (
        session.get(url, stream=True, timeout=TIMEOUT) as resp,
        pytest.raises((requests.exceptions.ChunkedEncodingError, requests.ConnectionError)),
    ):
        _ = resp.content
    assert session.get(url, timeout=TIMEOUT).content == server.expected(url)


def test_corrupt_then_good(server: ImageServer, session: requests.Session) -> None:
    url = server.url("/corrupt/2/c.png")
    good = server.expected(url)
    bad = [session.get(url, timeout=TIMEOUT) for _ in range(2)]
    for response in bad:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "image/png"
        # The same length and head (it still sniffs as a PNG), another hash.
        assert len(response.content) == len(good)
        assert response.content[:-1] == good[:-1]
        assert response.content != good
    assert session.get(url, timeout=TIMEOUT).content == good
    assert server.hits(url) == 3
    for path in ("/corrupt/x/c.png", "/corrupt/1", "/corrupt/1/"):
        assert session.get(server.url(path), timeout=TIMEOUT).status_code == 404


def test_big_and_sized_bodies(server: ImageServer, session: requests.Session) -> None:
    default = session.get(server.url("/big/b.jpg"), timeout=TIMEOUT)
    assert default.headers["Content-Type"] == "image/jpeg"
    assert len(default.content) == 4 * 1024 * 1024
    assert default.content == server.expected("/big/b.jpg")
    sized = server.url("/big/b.gif?size=3000000")
    assert session.get(sized, timeout=TIMEOUT).content == server.expected(sized)
    assert len(server.expected(sized)) == 3_000_000
    corrupt = server.url("/corrupt/0/c.bmp?size=2500000")
    assert session.get(corrupt, timeout=TIMEOUT).content == server.expected(corrupt)
    assert abs(len(server.expected(corrupt)) - 2_500_000) < 4096


def test_drip(server: ImageServer) -> None:
    path = "/drip/d.png?interval=0.05"
    with (
        requests.Session() as sess,
        sess.get(server.url(path), stream=True, timeout=TIMEOUT) as response,
    ):
        assert response.headers["Content-Length"] == str(len(server.expected(path)))
        started = time.monotonic()
        first = response.raw.read(4)
        assert time.monotonic() - started >= 0.15
        assert first == server.expected(path)[:4]


def test_drip_headers(server: ImageServer) -> None:
    parts = urlsplit(server.base_url)
    assert parts.hostname is not None
    assert parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /drip-headers/h.png?interval=0.05 HTTP/1.1\r\nHost: t\r\n\r\n")
        started = time.monotonic()
        received = b""
        while len(received) < 10:
            received += sock.recv(10 - len(received))
        assert time.monotonic() - started >= 0.4
        assert received.startswith(b"HTTP/1.1 2")
    raw = raw_request(server, "/drip-headers/h.png?interval=0.001")
    status, _, body = split_response(raw)
    assert status.startswith("HTTP/1.1 200")
    assert body == server.expected("/drip-headers/h.png?interval=0.001")


def test_slow(server: ImageServer, session: requests.Session) -> None:
    path = "/slow/s.gif?delay=0.3"
    started = time.monotonic()
    response = session.get(server.url(path), timeout=TIMEOUT)
    assert time.monotonic() - started >= 0.29
    assert response.content == server.expected(path)


def test_html_routes(server: ImageServer, session: requests.Session) -> None:
    page = session.get(server.url("/html/p.png"), timeout=TIMEOUT)
    assert page.headers["Content-Type"].startswith("text/html")
    assert page.content.startswith(b"<!DOCTYPE html>")
    lying = session.get(server.url("/html-as-image/p.png"), timeout=TIMEOUT)
    assert lying.headers["Content-Type"] == "image/png"
    assert lying.content == page.content
    with pytest.raises(KeyError):
        server.expected("/html-as-image/p.png")


def test_huge_length(server: ImageServer) -> None:
    with (
        requests.Session() as sess,
        sess.get(server.url("/huge-length/h.png"), stream=True, timeout=TIMEOUT) as response,
    ):
        assert response.headers["Content-Length"] == str(10 * 1024**3)
        assert response.raw.read(8) == PNG_SIGNATURE
        assert response.raw.read(100_000) == bytes(100_000)


def test_endless(server: ImageServer) -> None:
    with (
        requests.Session() as sess,
        sess.get(server.url("/endless/e.png"), stream=True, timeout=TIMEOUT) as response,
    ):
        assert response.headers["Transfer-Encoding"] == "chunked"
        received = b""
        for piece in response.iter_content(65536):
            received += piece
            if len(received) > 300_000:
                break
        assert received.startswith(PNG_SIGNATURE)


def test_gzip(server: ImageServer) -> None:
    path = "/gzip/g.png"
    with requests.Session() as sess:
        response = sess.get(server.url(path), timeout=TIMEOUT)
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.content == server.expected(path)
        with sess.get(server.url(path), stream=True, timeout=TIMEOUT) as streamed:
            compressed = streamed.raw.read(decode_content=False)
    assert len(compressed) == int(response.headers["Content-Length"])
    assert zlib.decompress(compressed, 31) == server.expected(path)


def test_gzip_bomb(server: ImageServer, session: requests.Session) -> None:
    url = server.url("/gzip-bomb/b.png?size=1048576")
    with session.get(url, stream=True, timeout=TIMEOUT) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Type"] == "image/png"
        compressed = response.raw.read(decode_content=False)
    assert len(compressed) == int(response.headers["Content-Length"])
    assert zlib.decompress(compressed, 31) == PNG_SIGNATURE + bytes(1048576)
    default = session.head(server.url("/gzip-bomb/b.png"), timeout=30)
    # 256 MiB of zeros deflate about 1000:1.
    assert 100_000 < int(default.headers["Content-Length"]) < 1_000_000


def _codec(encoding: str) -> Any:
    """The module that encodes and decodes ``encoding``; the test is skipped without it."""
    module = brotli_module() if encoding == "br" else zstd_module()
    if module is None:
        pytest.skip(f"no {encoding} module installed")
    return module


def _decode(encoding: str, data: bytes) -> tuple[bytes, bool]:
    """``data`` decoded as far as it goes, and whether its stream ended."""
    module = _codec(encoding)
    if encoding == "br":
        brotli = module.Decompressor()
        return bytes(brotli.process(data)), bool(brotli.is_finished())
    zstd = module.ZstdDecompressor()
    return bytes(zstd.decompress(data)), bool(zstd.eof)


@pytest.mark.parametrize("encoding", ["br", "zstd"])
def test_br_and_zstd(server: ImageServer, session: requests.Session, encoding: str) -> None:
    _codec(encoding)  # the server answers 501 without it
    path = f"/{encoding}/e.png"
    headers = {"Accept-Encoding": "identity"}  # encoded all the same
    with session.get(server.url(path), stream=True, headers=headers, timeout=TIMEOUT) as whole:
        assert whole.headers["Content-Encoding"] == encoding
        assert whole.headers["Content-Type"] == "image/png"
        encoded = whole.raw.read(decode_content=False)
    assert len(encoded) == int(whole.headers["Content-Length"])
    assert _decode(encoding, encoded) == (server.expected(path), True)
    cut_path = f"{path}?cut=7"
    with session.get(server.url(cut_path), stream=True, timeout=TIMEOUT) as cut:
        shortened = cut.raw.read(decode_content=False)
    assert len(shortened) == int(cut.headers["Content-Length"])
    decoded, ended = _decode(encoding, shortened)
    assert server.expected(cut_path).startswith(decoded)
    assert not ended
    bomb_url = server.url(f"/{encoding}-bomb/b.png?size=1048576")
    with session.get(bomb_url, stream=True, timeout=TIMEOUT) as bomb:
        assert bomb.headers["Content-Encoding"] == encoding
        packed = bomb.raw.read(decode_content=False)
    assert len(packed) < 100_000
    assert _decode(encoding, packed) == (PNG_SIGNATURE + bytes(1048576), True)


def test_content_disposition(server: ImageServer, session: requests.Session) -> None:
    path = "/cd/x.png?filename=" + quote("../../etc/passwd", safe="")
    response = session.get(server.url(path), timeout=TIMEOUT)
    assert response.headers["Content-Disposition"] == 'attachment; filename="../../etc/passwd"'
    assert response.content == server.expected(path)
    path = "/cd/x.png?filename_star=" + quote("€ rates.png", safe="")
    response = session.get(server.url(path), timeout=TIMEOUT)
    assert response.headers["Content-Disposition"] == (
        "attachment; filename*=UTF-8''%E2%82%AC%20rates.png"
    )


def test_bad_length(server: ImageServer) -> None:
    status, headers, body = split_response(raw_request(server, "/bad-length/b.png"))
    assert status.startswith("HTTP/1.1 200")
    assert ("Content-Length", "abc") in headers
    assert body == server.expected("/bad-length/b.png")


def test_conflicting_length(server: ImageServer) -> None:
    status, headers, body = split_response(raw_request(server, "/conflicting-length/c.png"))
    assert status.startswith("HTTP/1.1 200")
    lengths = [int(value) for name, value in headers if name == "Content-Length"]
    assert lengths == [len(body), len(body) + 10]
    assert body == server.expected("/conflicting-length/c.png")


def test_broken_chunk(server: ImageServer) -> None:
    status, headers, body = split_response(raw_request(server, "/broken-chunk/c.png"))
    assert status.startswith("HTTP/1.1 200")
    assert ("Transfer-Encoding", "chunked") in headers
    size_line, _, rest = body.partition(b"\r\n")
    size = int(size_line, 16)
    assert rest[:8] == PNG_SIGNATURE
    assert rest[size:] == b"\r\nzz\r\n"


def test_wrong_type(server: ImageServer, session: requests.Session) -> None:
    response = session.get(server.url("/wrong-type/w.jpg"), timeout=TIMEOUT)
    assert response.headers["Content-Type"] == "text/plain"
    assert response.content == server.expected("/wrong-type/w.jpg")
    check_jpeg(response.content)


# --------------------------------------------------------------------------- load, shutdown


def test_64_concurrent_clients(server: ImageServer) -> None:
    urls = server.urls

    def worker(index: int) -> int:
        ok = 0
        with requests.Session() as sess:
            for step in range(4):
                url = urls[(index * 4 + step) % len(urls)]
                response = sess.get(url, timeout=30)
                digest = hashlib.sha256(response.content).hexdigest()
                ok += response.status_code == 200 and digest == server.expected_sha256(url)
        return ok

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(worker, range(64)))
    assert results == [4] * 64


def test_stop_leaves_no_threads_behind() -> None:
    baseline = threading.active_count()
    srv = ImageServer(n_images=8)
    with requests.Session() as sess:
        with srv:
            for url in srv.urls[:3]:
                assert sess.get(url, timeout=TIMEOUT).status_code == 200
            parts = urlsplit(srv.base_url)
            assert parts.hostname is not None
            assert parts.port is not None
            address = (parts.hostname, parts.port)
            with (
                socket.create_connection(address, timeout=TIMEOUT) as sleeping,
                socket.create_connection(address, timeout=TIMEOUT) as dripping,
                socket.create_connection(address, timeout=TIMEOUT) as stuffed,
            ):
                # Handlers asleep in /slow/, dripping, and blocked in sendall() on a
                # client that never reads must all be woken by stop().
                sleeping.sendall(b"GET /slow/s.png?delay=60 HTTP/1.1\r\nHost: t\r\n\r\n")
                dripping.sendall(b"GET /drip/d.png?interval=60 HTTP/1.1\r\nHost: t\r\n\r\n")
                stuffed.sendall(b"GET /huge-length/h.png HTTP/1.1\r\nHost: t\r\n\r\n")
                paths = ("/slow/s.png", "/drip/d.png", "/huge-length/h.png")
                assert wait_for(lambda: all(srv.hits(path) for path in paths))
                assert threading.active_count() > baseline
                started = time.monotonic()
                srv.stop()
                assert time.monotonic() - started < 10
        # The session still holds its keep-alive connection; the server closed its end.
        assert wait_for(lambda: threading.active_count() <= baseline)
    assert srv.errors == []
