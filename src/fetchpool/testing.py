"""A loopback HTTP/1.1 image server for tests, examples and benchmarks (stdlib only).

:class:`ImageServer` serves a deterministic corpus of valid images (PNG, JPEG, GIF,
WebP, BMP) plus a set of misbehaving routes (resets, truncations, drips, redirect
loops, decompression bombs, lying headers, ...) on ``127.0.0.1`` and a random port.
Every response a test can compare against is predictable: :meth:`ImageServer.expected`
returns the exact bytes a URL serves.

Typical use as a pytest fixture::

    @pytest.fixture(scope="module")
    def image_server() -> Iterator[ImageServer]:
        with ImageServer(n_images=50) as server:
            yield server

    def test_fetch(image_server: ImageServer) -> None:
        url = image_server.urls[0]
        assert requests.get(url, timeout=5).content == image_server.expected(url)

Routes. Every one honours :attr:`ImageServer.latency`; ``<name>`` only seeds the image
and gives the URL its basename (an extension such as ``.png`` picks the format)::

    /img/0000.png ...               the corpus, see ImageServer.urls (also /a/cat.jpg,
                                    /b/cat.jpg and /img/cat.jpg?v=2)
    /any/<anything>                 200, a deterministic image for any path under /any/
    /status/<code>/<name>           that status, small text body; ?retry_after=VALUE
    /fail/<n>/<code>/<name>         the first n requests answer <code>, then the image
    /reset/<name>                   half the body, then a TCP reset (also /reset-once/)
    /truncate/<name>                half the body, then a clean close (also /truncate-once/)
    /corrupt/<n>/<name>?size=N      the first n requests get the image with its last byte
                                    changed (same length and type, another hash), then
                                    the image; ?size= as for /big/
    /big/<name>?size=N              an image of N bytes (default 4 MiB, at most 256 MiB),
                                    with ETag and Last-Modified, honouring Range and
                                    If-Range (206, 416); ?etag=weak|none, ?modified=0
                                    leave validators out; ImageServer.generation
                                    changes them (a new version of the file)
    /cut/<name>?size=N&cuts=K       /big/<name>?size=N (the same body), but each of the
                                    first K requests (default 3) is cut at a random
                                    point past 1 MiB (seeded),
                                    by a clean close (?reset=1: a TCP reset; ?at=F: at
                                    the fraction F of the body; ?stall=1: the answer
                                    stops there and hangs until the client leaves)
    /no-range/<name>?size=N&cuts=K  as /cut/, ignoring Range: always 200 and the whole body
    /bad-range/<name>?wrong=W       as /big/; the first request is cut at half the
                                    body, the second (asking for the rest) gets a wrong
                                    answer W: start (206 from the wrong byte), total
                                    (206 of another total), garbage (Content-Range
                                    unparsable), none (206 without Content-Range) or
                                    416; with W=first, the first request (no Range)
                                    gets a 206 of the whole body instead
    /drip/<name>?interval=0.2       the body one byte per interval
    /drip-headers/<name>?interval=  the status line and headers one byte per interval
    /slow/<name>?delay=2.0          waits delay seconds, then the image
    /html/<name>                    an HTML page (/html-as-image/: typed image/png)
    /redirect/<n>/<name>?code=302   a chain of n redirects ending in an image
    /redirect-to?location=<url>     302 to location, verbatim
    /loop/<name>, /self-loop/<name> redirect loops (two-step and to itself)
    /redirect-big-body/<name>       302 to the first corpus image, with a 50 MiB body
    /huge-length/<name>             claims 10 GiB, streams zeros until the client leaves
    /endless/<name>                 an endless chunked body
    /gzip-bomb/<name>?size=N        gzip of a PNG signature and N zero bytes
                                    (also /br-bomb/, /zstd-bomb/)
    /gzip/<name>?cut=N              an image with Content-Encoding: gzip, whatever the
                                    request's Accept-Encoding (also /br/, /zstd/: 501
                                    unless brotli / backports.zstd is installed);
                                    ?cut=N drops the last N bytes of the encoded body
                                    (its Content-Length then says so: a clean end of
                                    framing, a cut compressed stream)
    /cd/<name>?filename=            Content-Disposition: attachment (also ?filename_star=)
    /bad-length/<name>              Content-Length: abc, then close
    /conflicting-length/<name>      two different Content-Length headers, then close
    /broken-chunk/<name>            a valid chunk, then a garbage chunk-size line
    /wrong-type/<name>              an image typed text/plain
    /headers                        the request headers echoed as JSON

Anything else answers 404.

:func:`instant_retries` (re-exported from :mod:`fetchpool.retry`) makes retry waits
instant and records them, for tests of code that downloads with fetchpool.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import html
import json
import math
import random
import socket
import socketserver
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .retry import instant_retries
from .transfer import brotli_module, zstd_module

__all__ = ["ImageServer", "instant_retries", "make_image"]

_KINDS: Final = ("png", "jpeg", "gif", "webp", "bmp")
_EXTENSIONS: Final = {"png": "png", "jpeg": "jpg", "gif": "gif", "webp": "webp", "bmp": "bmp"}
_KIND_BY_EXTENSION: Final = {
    "png": "png",
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "jpe": "jpeg",
    "gif": "gif",
    "webp": "webp",
    "bmp": "bmp",
}
_CONTENT_TYPES: Final = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
}

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
# A 1x1 grey baseline JPEG (JFIF APP0, one quantisation table, optimised Huffman
# tables), generated once with Pillow and checked to decode with it.
_TINY_JPEG: Final = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300100b0c0e0c0a100e0d0e12111013"
    "18281a181616183123251d283a333d3c3933383740485c4e404457453738506d51575f62676867"
    "3e4d71797064785c656763ffc0000b080001000101011100ffc40014000100000000000000000000"
    "000000000006ffc40014100100000000000000000000000000000000ffda0008010100003f0048ffd9"
)
# The end of the JFIF APP0 segment: padding goes right after it so the file stays JFIF.
_JPEG_PAD_OFFSET: Final = 20
# VP8L bitstream of a 1x1 lossless image, generated once with Pillow.
_TINY_VP8L: Final = bytes.fromhex("2f000000000750bc2a14b9ff8188e87f00")
_MAX_COM_PAYLOAD: Final = 65533
# Printable ASCII only, so naive scanners looking for markers in padding find none.
_PRINTABLE: Final = bytes(0x20 + (i % 95) for i in range(256))

_SERVER_NAME: Final = "fetchpool-testing"
_CHUNK: Final = 64 * 1024
_ZEROS: Final = bytes(_CHUNK)
_BIG_BODY_LENGTH: Final = 50 * 1024 * 1024
_HUGE_LENGTH: Final = 10 * 1024 * 1024 * 1024
_DEFAULT_BOMB_SIZE: Final = 256 * 1024 * 1024
_REDIRECT_CODES: Final = frozenset({301, 302, 303, 307, 308})
_BIG_DEFAULT: Final = 4 * 1024 * 1024
_BIG_MAX: Final = 256 * 1024 * 1024
_STOP_JOIN_TIMEOUT: Final = 5.0
# A /cut/ point falls past this, so that a client that keeps 1 MiB has something to keep.
_CUT_MIN: Final = 1024 * 1024 + 64 * 1024
_CUTS_DEFAULT: Final = 3
# What a stalled answer waits for at most (the server's stop wakes it).
_STALL_MAX: Final = 600.0
# Last-Modified of the ranged routes (generation 0), a second later per generation.
_LAST_MODIFIED: Final = 1_700_000_000
_RANGED_ROUTES: Final = frozenset({"big", "cut", "no-range", "bad-range"})
_POLL_INTERVAL: Final = 0.05

# Routes whose body is a plain derived image (possibly delivered badly).
_IMAGE_ROUTES: Final = frozenset(
    {
        "any",
        "slow",
        "wrong-type",
        "gzip",
        "br",
        "zstd",
        "cd",
        "drip",
        "drip-headers",
        "reset",
        "reset-once",
        "truncate",
        "truncate-once",
        "bad-length",
        "conflicting-length",
    }
)


# --------------------------------------------------------------------------- images


def make_image(kind: str, size: int, seed: int) -> bytes:
    """Build a valid image of roughly ``size`` bytes, deterministically.

    Args:
        kind: one of ``"png"``, ``"jpeg"``, ``"gif"``, ``"webp"``, ``"bmp"``.
        size: wanted file size in bytes; tiny sizes give the smallest valid file.
        seed: seeds the pixels and padding; equal arguments give equal bytes.

    Returns:
        The encoded file. PNG holds real zlib-compressed random pixels, BMP holds
        uncompressed 24-bit pixels; JPEG, GIF and WebP are tiny images padded with
        metadata that decoders skip (COM segments, a comment extension, a RIFF chunk).

    Raises:
        ValueError: for an unknown ``kind`` or a negative ``size``.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown image kind {kind!r}; expected one of {_KINDS}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return _make_image_cached(kind, size, seed)


@functools.lru_cache(maxsize=256)
def _make_image_cached(kind: str, size: int, seed: int) -> bytes:
    rng = random.Random(f"fetchpool-image-{kind}-{size}-{seed}")
    builder = _BUILDERS[kind]
    return builder(size, rng)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _make_png(size: int, rng: random.Random) -> bytes:
    # Signature, IHDR, IDAT framing, IEND and the zlib wrapper cost about 70 bytes.
    budget = max(size - 70, 4)
    width = max(1, min(4096, math.isqrt(budget // 3)))
    stride = 3 * width
    height = max(1, budget // (stride + 1))
    # Random pixels are incompressible, so the file size tracks the requested one.
    pixels = rng.randbytes(stride * height)
    raw = b"".join(b"\x00" + pixels[i : i + stride] for i in range(0, len(pixels), stride))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", ihdr),
            _png_chunk(b"IDAT", zlib.compress(raw, 6)),
            _png_chunk(b"IEND", b""),
        )
    )


def _make_bmp(size: int, rng: random.Random) -> bytes:
    header_size = 14 + 40
    budget = max(size - header_size, 4)
    width = max(1, min(4096, math.isqrt(budget // 3)))
    row = (3 * width + 3) & ~3
    height = max(1, budget // row)
    padding = b"\x00" * (row - 3 * width)
    pixels = rng.randbytes(3 * width * height)
    data = b"".join(pixels[i : i + 3 * width] + padding for i in range(0, len(pixels), 3 * width))
    file_header = struct.pack("<2sIHHI", b"BM", header_size + len(data), 0, 0, header_size)
    info_header = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(data), 2835, 2835, 0, 0
    )
    return file_header + info_header + data


def _text_padding(rng: random.Random, length: int) -> bytes:
    return rng.randbytes(length).translate(_PRINTABLE)


def _make_jpeg(size: int, rng: random.Random) -> bytes:
    segments: list[bytes] = []
    missing = size - len(_TINY_JPEG)
    while missing >= 4:
        payload = min(missing - 4, _MAX_COM_PAYLOAD)
        segments.append(b"\xff\xfe" + struct.pack(">H", payload + 2) + _text_padding(rng, payload))
        missing -= payload + 4
    head, tail = _TINY_JPEG[:_JPEG_PAD_OFFSET], _TINY_JPEG[_JPEG_PAD_OFFSET:]
    return head + b"".join(segments) + tail


def _make_gif(size: int, rng: random.Random) -> bytes:
    # Global colour table flag with 2 entries (white, black), then one 1x1 frame.
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\xff\xff\xff\x00\x00\x00"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    trailer = b"\x3b"
    missing = size - len(header) - len(frame) - len(trailer) - 3
    comment = b""
    if missing > 0:
        # Each 255-byte sub-block costs one length byte.
        text = _text_padding(rng, missing - math.ceil(missing / 256))
        blocks = [text[i : i + 255] for i in range(0, len(text), 255)]
        comment = b"\x21\xfe" + b"".join(bytes((len(b),)) + b for b in blocks if b) + b"\x00"
    return header + comment + frame + trailer


def _riff_chunk(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")


def _make_webp(size: int, rng: random.Random) -> bytes:
    # The extended format (VP8X) is the one the spec allows unknown chunks in.
    vp8x = _riff_chunk(b"VP8X", b"\x00\x00\x00\x00" + (0).to_bytes(3, "little") * 2)
    chunks = [vp8x, _riff_chunk(b"VP8L", _TINY_VP8L)]
    missing = size - 12 - sum(len(c) for c in chunks) - 8
    if missing > 0:
        chunks.append(_riff_chunk(b"FPAD", _text_padding(rng, missing - missing % 2)))
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


_BUILDERS: Final[dict[str, Callable[[int, random.Random], bytes]]] = {
    "png": _make_png,
    "jpeg": _make_jpeg,
    "gif": _make_gif,
    "webp": _make_webp,
    "bmp": _make_bmp,
}


def _derived_image(key: str, path: str, size: int | None = None) -> tuple[str, bytes]:
    """Pick a deterministic image for a non-corpus URL from its canonical key.

    ``size``: its size in bytes, instead of one derived from the key (8-64 KiB).
    """
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    number = int.from_bytes(digest[:8], "big")
    basename = path.rsplit("/", 1)[-1]
    extension = basename.rsplit(".", 1)[-1].lower() if "." in basename else ""
    kind = _KIND_BY_EXTENSION.get(extension) or _KINDS[number % len(_KINDS)]
    if size is None:
        size = 8 * 1024 + (number >> 8) % (56 * 1024)
    seed = int.from_bytes(digest[8:16], "big")
    return kind, _make_image_cached(kind, size, seed)


class _Encoder:
    """A streaming compressor for one ``Content-Encoding``: ``compress`` then ``finish``."""

    def __init__(self, encoding: str, level: int) -> None:
        self.compress: Callable[[bytes], bytes]
        self.finish: Callable[[], bytes]
        if encoding == "gzip":
            obj = zlib.compressobj(level, zlib.DEFLATED, 31)
            self.compress, self.finish = obj.compress, obj.flush
        elif encoding == "br":
            # The modules fetchpool decodes with, imported when first needed: the server
            # needs only the stdlib unless asked for these.
            brotli = brotli_module()
            if brotli is None:
                raise ImportError("brotli >= 1.2 is not installed")
            comp = brotli.Compressor(quality=min(level, 11))
            self.compress = getattr(comp, "process", None) or comp.compress
            self.finish = comp.finish
        elif encoding == "zstd":
            zstd = zstd_module()
            if zstd is None:
                raise ImportError("backports.zstd is not installed")
            zobj = zstd.ZstdCompressor(level=level)
            self.compress, self.finish = zobj.compress, zobj.flush
        else:  # pragma: no cover - the routes name only the encodings above
            raise ValueError(encoding)


def _encode(encoding: str, data: bytes) -> bytes:
    encoder = _Encoder(encoding, 6)
    return encoder.compress(data) + encoder.finish()


_BOMB_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _bomb_cached(encoding: str, size: int) -> bytes:
    encoder = _Encoder(encoding, 9 if encoding == "gzip" else 5)
    parts = [encoder.compress(_PNG_SIGNATURE)]
    block = bytes(1024 * 1024)  # bytes, not a memoryview: brotlicffi takes no other
    remaining = size
    while remaining > 0:
        piece = min(remaining, len(block))
        parts.append(encoder.compress(block if piece == len(block) else block[:piece]))
        remaining -= piece
    parts.append(encoder.finish())
    return b"".join(parts)


def _bomb(encoding: str, size: int) -> bytes:
    # Serialised so concurrent first requests don't each burn a second of CPU.
    with _BOMB_LOCK:
        return _bomb_cached(encoding, size)


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class _Target:
    """A request target, raw and canonical.

    ``path`` and ``key`` are percent-decoded so that a client which normalises
    escapes (``requests`` turns ``%2e`` into ``.``) still maps to the same image,
    hit counter and failure state as the URL the test wrote down.
    """

    raw_path: str
    raw_query: str
    path: str
    key: str
    route: str
    rest: str | None


def _split_target(url_or_path: str) -> tuple[str, str]:
    parts = urlsplit(url_or_path)
    if parts.scheme and parts.netloc:
        path, query = parts.path, parts.query
    else:
        path, _, query = url_or_path.partition("#")[0].partition("?")
    if not path.startswith("/"):
        path = "/" + path
    return path, query


def _parse_target(raw_path: str, raw_query: str) -> _Target:
    path = unquote(raw_path)
    key = f"{path}?{unquote(raw_query)}" if raw_query else path
    route, slash, rest = raw_path[1:].partition("/")
    return _Target(raw_path, raw_query, path, key, unquote(route), rest if slash else None)


def _target(url_or_path: str) -> _Target:
    return _parse_target(*_split_target(url_or_path))


def _small_int(raw: str) -> int | None:
    text = unquote(raw)
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        return None
    return int(text)


def _parse_fail(t: _Target) -> tuple[int, int] | None:
    parts = (t.rest or "").split("/", 2)
    if t.rest is None or len(parts) != 3:
        return None
    count, code = _small_int(parts[0]), _small_int(parts[1])
    if count is None or code is None or not 200 <= code <= 599:
        return None
    return count, code


def _parse_count(t: _Target) -> int | None:
    """The ``<n>`` of ``/route/<n>/<name>``, or ``None`` if the path is not that."""
    count_raw, slash, name = (t.rest or "").partition("/")
    if t.rest is None or not slash or not name:
        return None
    return _small_int(count_raw)


def _size_param(t: _Target, default: int | None) -> int | None:
    """The ``?size=`` of a target (at most 256 MiB), ``default`` if absent or bad."""
    size = _small_int(_query(t).get("size", ""))
    return default if size is None else min(size, _BIG_MAX)


def _parse_redirect(t: _Target) -> tuple[int, str] | None:
    if t.rest is None:
        return None
    hops_raw, slash, name = t.rest.partition("/")
    hops = _small_int(hops_raw)
    if hops is None or not slash:
        return None
    return hops, name


def _query(t: _Target) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(t.raw_query, keep_blank_values=True).items()}


def _float_param(params: dict[str, str], name: str, default: float) -> float:
    try:
        value = float(params.get(name, default))
    except ValueError:
        return default
    return value if math.isfinite(value) and value >= 0 else default


def _header_bytes(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        # Raw UTF-8 on the wire, as many real servers send non-ASCII filenames.
        return value.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class _Entry:
    target: str
    kind: str
    size: int
    seed: int


def _build_corpus(n_images: int, seed: int) -> list[_Entry]:
    rng = random.Random(f"fetchpool-corpus-{seed}")
    collisions = ["/a/cat.jpg", "/b/cat.jpg", "/img/cat.jpg?v=2"] if n_images >= 8 else []
    first_collision = n_images - len(collisions)
    entries: list[_Entry] = []
    for index in range(n_images):
        kind = rng.choices(_KINDS, weights=(3, 4, 1, 1, 1))[0]
        few_large = rng.random() < 0.1
        size = rng.randint(100_000, 300_000) if few_large else rng.randint(20_000, 90_000)
        image_seed = rng.getrandbits(32)
        if index >= first_collision:
            kind, target = "jpeg", collisions[index - first_collision]
        else:
            target = f"/img/{index:04d}.{_EXTENSIONS[kind]}"
        entries.append(_Entry(target, kind, size, image_seed))
    return entries


# --------------------------------------------------------------------------- server


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed, e.g. by a /reset/ handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: ImageServer) -> None:
        self.owner = owner
        self.stop_event = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connections_lock = threading.Lock()
        self._closing = False
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can stall.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        # Registered here, on the accept thread, so stop() can never miss a
        # connection whose handler thread has not started running yet.
        sock = request if isinstance(request, socket.socket) else request[1]
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"{_SERVER_NAME}-conn",
            daemon=True,
        )
        with self._connections_lock:
            if self._closing:
                self.shutdown_request(request)
                return
            self._connections[sock] = thread
        self.owner._count_connection()
        thread.start()

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            sock = request if isinstance(request, socket.socket) else request[1]
            with self._connections_lock:
                self._connections.pop(sock, None)

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        error = sys.exc_info()[1]
        # Clients vanishing and stop() tearing sockets down are business as usual.
        if error is not None and not isinstance(error, OSError):
            self.owner.errors.append(error)

    def close_connections(self) -> list[threading.Thread]:
        """Refuse new connections, wake every handler and return their threads."""
        self.stop_event.set()
        with self._connections_lock:
            self._closing = True
            connections = list(self._connections.items())
        for sock, _ in connections:
            _shutdown_quietly(sock)
        return [thread for _, thread in connections]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = _SERVER_NAME
    sys_version = ""
    server: _Server
    _head_only = False
    _client_close = False

    def log_message(self, fmt: str, *args: Any) -> None:
        """Stay silent: tests and benchmarks would drown in access logs."""

    def version_string(self) -> str:
        """Name the server without the Python version (used by send_error too)."""
        return _SERVER_NAME

    def do_GET(self) -> None:
        """Serve a GET request."""
        self._dispatch(head_only=False)

    def do_HEAD(self) -> None:
        """Serve a HEAD request exactly like GET, minus the body."""
        self._dispatch(head_only=True)

    # ---------------------------------------------------------------- plumbing

    def _dispatch(self, *, head_only: bool) -> None:
        self._head_only = head_only
        self._client_close = self.close_connection
        owner = self.server.owner
        target = _target(self.path)
        owner._record(target.path, self.headers.items())
        try:
            latency = owner.latency
            if latency > 0:
                # Counted while it waits: a client that has the answer may send its
                # next request before this thread has written its last line.
                owner._in_flight(1)
                try:
                    if self._pause(latency):
                        return
                finally:
                    owner._in_flight(-1)
            image = owner._corpus_image(target)
            if image is not None:
                self._send(200, image[1], _CONTENT_TYPES[image[0]])
                return
            route = _ROUTES.get(target.route)
            if route is None:
                self._not_found()
            else:
                route(self, target)
        except OSError:
            # The client went away, or stop() shut the socket down under us.
            self.close_connection = True

    def _pause(self, seconds: float) -> bool:
        """Sleep without holding the GIL; True (and close) if the server is stopping."""
        if self.server.stop_event.wait(seconds):
            self.close_connection = True
            return True
        return False

    def _head(self, code: int, headers: Sequence[tuple[str, str]]) -> bytes:
        try:
            reason = HTTPStatus(code).phrase
        except ValueError:
            reason = "Unknown"
        lines = [
            f"{self.protocol_version} {code} {reason}".encode("latin-1"),
            f"Server: {_SERVER_NAME}".encode("latin-1"),
            f"Date: {self.date_time_string()}".encode("latin-1"),
        ]
        lines.extend(name.encode("latin-1") + b": " + _header_bytes(v) for name, v in headers)
        if self._client_close:
            lines.append(b"Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append(b"Connection: keep-alive")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra]
        head = self._head(code, headers)
        self._write(head if self._head_only else head + body)

    def _send_text(self, code: int, text: str, extra: Sequence[tuple[str, str]] = ()) -> None:
        self._send(code, text.encode("utf-8"), "text/plain; charset=utf-8", extra)

    def _not_found(self) -> None:
        self._send_text(404, "404 Not Found\n")

    def _image(self, t: _Target) -> tuple[str, bytes] | None:
        image = self.server.owner._image_for(t)
        if image is None:
            self._not_found()
        return image

    def _image_head(self, kind: str, length: int | str) -> list[tuple[str, str]]:
        return [("Content-Type", _CONTENT_TYPES[kind]), ("Content-Length", str(length))]

    def _redirect(self, code: int, location: str) -> None:
        body = f"Redirecting to {location}\n"
        self._send_text(code, body, [("Location", location)])

    def _reset_connection(self) -> None:
        # SO_LINGER (on, 0 s) makes close() send RST instead of FIN.
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _stream_zeros(self, remaining: int, first: bytes = b"") -> None:
        stop = self.server.stop_event
        piece = first or _ZEROS
        while remaining > 0 and not stop.is_set():
            chunk = piece[:remaining]
            self._write(chunk)
            remaining -= len(chunk)
            piece = _ZEROS
        if remaining > 0:
            self.close_connection = True

    # ------------------------------------------------------------------ routes

    def _r_image(self, t: _Target) -> None:
        image = self._image(t)
        if image is not None:
            self._send(200, image[1], _CONTENT_TYPES[image[0]])

    def _r_slow(self, t: _Target) -> None:
        if t.rest is None:
            self._not_found()
            return
        if self._pause(_float_param(_query(t), "delay", 2.0)):
            return
        self._r_image(t)

    def _r_wrong_type(self, t: _Target) -> None:
        image = self._image(t)
        if image is not None:
            self._send(200, image[1], "text/plain")

    def _r_encoded(self, t: _Target) -> None:
        image = self._image(t)
        if image is None:
            return
        cut = _small_int(_query(t).get("cut", "0"))
        if cut is None:
            self._send_text(400, "bad ?cut=\n")
            return
        try:
            body = _encode(t.route, image[1])
        except ImportError as exc:
            self._send_text(501, f"cannot encode {t.route}: {exc}\n")
            return
        body = body[: max(0, len(body) - cut)]
        self._send(200, body, _CONTENT_TYPES[image[0]], [("Content-Encoding", t.route)])

    def _r_cd(self, t: _Target) -> None:
        image = self._image(t)
        if image is None:
            return
        params = _query(t)
        disposition = "attachment"
        if "filename" in params:
            disposition += f'; filename="{params["filename"]}"'
        if "filename_star" in params:
            encoded = quote(params["filename_star"], safe="!#$&+-.^_`|~")
            disposition += f"; filename*=UTF-8''{encoded}"
        self._send(200, image[1], _CONTENT_TYPES[image[0]], [("Content-Disposition", disposition)])

    def _r_drip(self, t: _Target) -> None:
        image = self._image(t)
        if image is None:
            return
        kind, body = image
        interval = _float_param(_query(t), "interval", 0.2)
        self._write(self._head(200, self._image_head(kind, len(body))))
        if self._head_only:
            return
        for index in range(len(body)):
            if self._pause(interval):
                return
            self._write(body[index : index + 1])

    def _r_drip_headers(self, t: _Target) -> None:
        image = self._image(t)
        if image is None:
            return
        kind, body = image
        interval = _float_param(_query(t), "interval", 0.2)
        head = self._head(200, self._image_head(kind, len(body)))
        for index in range(len(head)):
            if index and self._pause(interval):
                return
            self._write(head[index : index + 1])
        if not self._head_only:
            self._write(body)

    def _r_reset(self, t: _Target) -> None:
        image = self._image(t)
        if image is None:
            return
        kind, body = image
        self._write(self._head(200, self._image_head(kind, len(body))) + body[: len(body) // 2])
        self._reset_connection()

    def _r_reset_once(self, t: _Target) -> None:
        if t.rest is not None and self.server.owner._attempt(t.key) == 0:
            self._r_reset(t)
        else:
            self._r_image(t)

    def _r_truncate(self, t: _Target) -> None:
        image = self._image(t)
        if image is None:
            return
        kind, body = image
        # No "Connection: close": this imitates a server dying mid-body, then a clean FIN.
        self._write(self._head(200, self._image_head(kind, len(body))) + body[: len(body) // 2])
        self.close_connection = True

    def _r_truncate_once(self, t: _Target) -> None:
        if t.rest is not None and self.server.owner._attempt(t.key) == 0:
            self._r_truncate(t)
        else:
            self._r_image(t)

    def _r_bad_length(self, t: _Target) -> None:
        image = self._image(t)
        if image is not None:
            head = self._head(200, self._image_head(image[0], "abc"))
            self._write(head if self._head_only else head + image[1])
            self.close_connection = True

    def _r_conflicting_length(self, t: _Target) -> None:
        image = self._image(t)
        if image is not None:
            kind, body = image
            headers = [*self._image_head(kind, len(body)), ("Content-Length", str(len(body) + 10))]
            head = self._head(200, headers)
            self._write(head if self._head_only else head + body)
            self.close_connection = True

    def _r_broken_chunk(self, t: _Target) -> None:
        if t.rest is None:
            self._not_found()
            return
        first = make_image("png", 4096, zlib.crc32(t.key.encode("utf-8", "surrogatepass")))
        head = self._head(200, [("Content-Type", "image/png"), ("Transfer-Encoding", "chunked")])
        body = b"%x\r\n" % len(first) + first + b"\r\nzz\r\n"
        self._write(head if self._head_only else head + body)
        self.close_connection = True

    def _r_corrupt(self, t: _Target) -> None:
        count = _parse_count(t)
        image = None if count is None else self._image(t)
        if count is None:
            self._not_found()
        if count is None or image is None:
            return
        kind, body = image
        if self.server.owner._attempt(t.key) < count and body:
            # The last byte: the head still sniffs as the image, the length holds.
            body = body[:-1] + bytes((body[-1] ^ 0xFF,))
        self._send(200, body, _CONTENT_TYPES[kind])

    def _send_ranged(
        self,
        t: _Target,
        *,
        honour_range: bool = True,
        cut: Callable[[int, int], int | None] | None = None,
        wrong: str | None = None,
    ) -> None:
        """Serve an image with validators, honouring ``Range``/``If-Range`` if asked to.

        Args:
            cut: given the first byte sent and the total, where to cut this answer
                (``None``: not cut); how is the target's ``?reset=1``/``?stall=1``.
            wrong: a wrong 206 to give instead of the right one (see /bad-range/).
        """
        image = self._image(t)
        if image is None:
            return
        kind, body = image
        owner = self.server.owner
        params = _query(t)
        total = len(body)
        if wrong == "416":
            self._send_text(
                416, "416 Range Not Satisfiable\n", [("Content-Range", f"bytes */{total}")]
            )
            return
        etag, modified = owner._validators(body, params)
        headers = [("Content-Type", _CONTENT_TYPES[kind]), ("Accept-Ranges", "bytes")]
        if etag is not None:
            headers.append(("ETag", etag))
        if modified is not None:
            headers.append(("Last-Modified", modified))
        start, code = 0, 200
        asked = self.headers.get("Range")
        if honour_range and asked is not None:
            if_range = self.headers.get("If-Range")
            current = if_range is None or (
                if_range in (etag, modified) and not if_range.startswith("W/")
            )
            first = _range_start(asked)
            if current and first is not None:
                if first >= total:
                    extra = [("Content-Range", f"bytes */{total}")]
                    self._send_text(416, "416 Range Not Satisfiable\n", extra)
                    return
                start, code = first, 206
        if wrong == "first":
            code = 206
        if wrong == "start":
            start = max(0, start - 1)
        part = body[start:]
        if code == 206:
            content_range = {
                "total": f"bytes {start}-{total}/{total + 1}",
                "garbage": "bytes abc",
                "none": None,
            }.get(wrong or "", f"bytes {start}-{total - 1}/{total}")
            if content_range is not None:
                headers.append(("Content-Range", content_range))
        headers.append(("Content-Length", str(len(part))))
        head = self._head(code, headers)
        if self._head_only:
            self._write(head)
            return
        at = None if cut is None else cut(start, total)
        if at is not None and start < at < total:
            part = part[: at - start]
        else:
            at = None
        owner._count_served(t.path, len(part))
        self._write(head + part)
        if at is None:
            return
        if params.get("stall") == "1":
            self._pause(_STALL_MAX)
            self.close_connection = True
        elif params.get("reset") == "1":
            self._reset_connection()
        else:
            # No "Connection: close": a server dying mid-body, then a clean FIN.
            self.close_connection = True

    def _cutter(self, t: _Target) -> Callable[[int, int], int | None] | None:
        """Where the answer to this request of a /cut/ or /no-range/ target is cut."""
        params = _query(t)
        cuts = _small_int(params["cuts"]) if "cuts" in params else _CUTS_DEFAULT
        owner = self.server.owner
        attempt = owner._attempt(t.key)
        if cuts is None or attempt >= cuts:
            return None
        fraction = _float_param(params, "at", -1.0)
        rng = random.Random(f"{owner.seed}:{t.key}:{attempt}")

        def cut(start: int, total: int) -> int | None:
            if fraction >= 0:
                return int(total * fraction)
            low = max(start + 1, _CUT_MIN)
            return rng.randint(low, total - 1) if low <= total - 1 else None

        return cut

    def _r_big(self, t: _Target) -> None:
        self._send_ranged(t)

    def _r_cut(self, t: _Target) -> None:
        self._send_ranged(t, cut=self._cutter(t))

    def _r_no_range(self, t: _Target) -> None:
        self._send_ranged(t, honour_range=False, cut=self._cutter(t))

    def _r_bad_range(self, t: _Target) -> None:
        wrong = _query(t).get("wrong", "start")
        attempt = self.server.owner._attempt(t.key)
        if wrong == "first":
            self._send_ranged(t, wrong=wrong if attempt == 0 else None)
        elif attempt == 0:
            self._send_ranged(t, cut=lambda start, total: total // 2)
        else:
            self._send_ranged(t, wrong=wrong if attempt == 1 else None)

    def _r_fail(self, t: _Target) -> None:
        parsed = _parse_fail(t)
        if parsed is None:
            self._not_found()
            return
        count, code = parsed
        if self.server.owner._attempt(t.key) < count:
            self._r_status_code(t, code)
        else:
            self._r_image(t)

    def _r_status(self, t: _Target) -> None:
        code_raw = (t.rest or "").partition("/")[0]
        code = _small_int(code_raw) if t.rest is not None else None
        if code is None or not 200 <= code <= 599:
            self._not_found()
            return
        self._r_status_code(t, code)

    def _r_status_code(self, t: _Target, code: int) -> None:
        params = _query(t)
        extra = [("Retry-After", params["retry_after"])] if "retry_after" in params else []
        if code in (204, 304):
            # These statuses never carry a body, so no Content-Length either.
            self._write(self._head(code, extra))
            return
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Unknown"
        self._send_text(code, f"{code} {phrase}\n", extra)

    def _r_redirect(self, t: _Target) -> None:
        parsed = _parse_redirect(t)
        if parsed is None:
            self._not_found()
            return
        hops, name = parsed
        if hops == 0:
            self._r_image(t)
            return
        code = _small_int(_query(t).get("code", "302"))
        query = f"?{t.raw_query}" if t.raw_query else ""
        self._redirect(
            code if code in _REDIRECT_CODES else 302, f"/redirect/{hops - 1}/{name}{query}"
        )

    def _r_redirect_to(self, t: _Target) -> None:
        location = _query(t).get("location")
        if location is None:
            self._send_text(400, "missing ?location=\n")
        else:
            self._redirect(302, location)

    def _loop(self, t: _Target, route: str) -> None:
        if t.rest is None:
            self._not_found()
            return
        query = f"?{t.raw_query}" if t.raw_query else ""
        self._redirect(302, f"/{route}/{t.rest}{query}")

    def _r_loop(self, t: _Target) -> None:
        self._loop(t, "loop2")

    def _r_loop2(self, t: _Target) -> None:
        self._loop(t, "loop")

    def _r_self_loop(self, t: _Target) -> None:
        self._loop(t, "self-loop")

    def _r_redirect_big_body(self, t: _Target) -> None:
        if t.rest is None:
            self._not_found()
            return
        location = self.server.owner._big_body_location(t)
        headers = [
            ("Location", location),
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(_BIG_BODY_LENGTH)),
        ]
        self._write(self._head(302, headers))
        if not self._head_only:
            self._stream_zeros(_BIG_BODY_LENGTH)

    def _r_huge_length(self, t: _Target) -> None:
        if t.rest is None:
            self._not_found()
            return
        self._write(self._head(200, self._image_head("png", _HUGE_LENGTH)))
        if not self._head_only:
            self._stream_zeros(_HUGE_LENGTH, _PNG_SIGNATURE + _ZEROS[len(_PNG_SIGNATURE) :])

    def _r_endless(self, t: _Target) -> None:
        if t.rest is None:
            self._not_found()
            return
        self._write(
            self._head(200, [("Content-Type", "image/png"), ("Transfer-Encoding", "chunked")])
        )
        self.close_connection = True
        if self._head_only:
            return
        framing = b"%x\r\n" % _CHUNK
        piece = framing + _PNG_SIGNATURE + _ZEROS[len(_PNG_SIGNATURE) :] + b"\r\n"
        zeros = framing + _ZEROS + b"\r\n"
        stop = self.server.stop_event
        while not stop.is_set():
            self._write(piece)
            piece = zeros

    def _r_bomb(self, t: _Target) -> None:
        if t.rest is None:
            self._not_found()
            return
        size = _small_int(_query(t).get("size", str(_DEFAULT_BOMB_SIZE)))
        if size is None:
            self._send_text(400, "bad ?size=\n")
            return
        encoding = t.route.removesuffix("-bomb")
        try:
            body = _bomb(encoding, size)
        except ImportError as exc:
            self._send_text(501, f"cannot encode {encoding}: {exc}\n")
            return
        self._send(200, body, "image/png", [("Content-Encoding", encoding)])

    def _html(self, t: _Target) -> bytes:
        name = html.escape(unquote((t.rest or "").rsplit("/", 1)[-1]))
        return (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f"<title>{name}</title></head>\n<body><h1>{name}</h1>"
            "<p>This is an HTML page, not an image.</p></body></html>\n"
        ).encode()

    def _r_html(self, t: _Target) -> None:
        self._send(200, self._html(t), "text/html; charset=utf-8")

    def _r_html_as_image(self, t: _Target) -> None:
        self._send(200, self._html(t), "image/png")

    def _r_headers(self, t: _Target) -> None:
        body = json.dumps(_join_headers(self.headers.items()), indent=2, sort_keys=True)
        self._send(200, body.encode("utf-8"), "application/json")


_ROUTES: Final[dict[str, Callable[[_Handler, _Target], None]]] = {
    "any": _Handler._r_image,
    "slow": _Handler._r_slow,
    "wrong-type": _Handler._r_wrong_type,
    "gzip": _Handler._r_encoded,
    "br": _Handler._r_encoded,
    "zstd": _Handler._r_encoded,
    "cd": _Handler._r_cd,
    "drip": _Handler._r_drip,
    "drip-headers": _Handler._r_drip_headers,
    "reset": _Handler._r_reset,
    "reset-once": _Handler._r_reset_once,
    "truncate": _Handler._r_truncate,
    "truncate-once": _Handler._r_truncate_once,
    "bad-length": _Handler._r_bad_length,
    "conflicting-length": _Handler._r_conflicting_length,
    "broken-chunk": _Handler._r_broken_chunk,
    "fail": _Handler._r_fail,
    "corrupt": _Handler._r_corrupt,
    "big": _Handler._r_big,
    "cut": _Handler._r_cut,
    "no-range": _Handler._r_no_range,
    "bad-range": _Handler._r_bad_range,
    "status": _Handler._r_status,
    "redirect": _Handler._r_redirect,
    "redirect-to": _Handler._r_redirect_to,
    "loop": _Handler._r_loop,
    "loop2": _Handler._r_loop2,
    "self-loop": _Handler._r_self_loop,
    "redirect-big-body": _Handler._r_redirect_big_body,
    "huge-length": _Handler._r_huge_length,
    "endless": _Handler._r_endless,
    "gzip-bomb": _Handler._r_bomb,
    "br-bomb": _Handler._r_bomb,
    "zstd-bomb": _Handler._r_bomb,
    "html": _Handler._r_html,
    "html-as-image": _Handler._r_html_as_image,
    "headers": _Handler._r_headers,
}


def _range_start(value: str) -> int | None:
    """The first byte of a ``Range: bytes=N-`` (or ``bytes=N-M``) header, or ``None``."""
    unit, _, spec = value.strip().partition("=")
    first = spec.partition("-")[0].strip()
    if unit.strip().lower() != "bytes" or "," in spec or not first.isdigit():
        return None
    return int(first)


def _join_headers(items: Sequence[tuple[str, Any]]) -> dict[str, str]:
    joined: dict[str, str] = {}
    for name, value in items:
        joined[name] = f"{joined[name]}, {value}" if name in joined else str(value)
    return joined


# --------------------------------------------------------------------------- public


class ImageServer:
    """A threaded HTTP/1.1 server on loopback serving deterministic images and faults.

    Args:
        n_images: size of the corpus served under ``/img/`` (see :attr:`urls`).
        latency: seconds every request waits before being answered; settable at any
            time through the :attr:`latency` attribute.
        seed: seeds the corpus; equal seeds give byte-identical corpora.
        host: address to bind; ``"::1"`` binds IPv6 loopback.
        port: port to bind; 0 picks a free one.

    Use it as a context manager (``with ImageServer() as server: ...``) or call
    :meth:`start` and :meth:`stop`.

    Attributes:
        latency: per-request delay in seconds, read on every request.
        generation: the version of the files of the ranged routes (``/big/``,
            ``/cut/``...): a test changes it to make their ``ETag`` and
            ``Last-Modified`` change, as a file replaced on the server would.
        seed: the seed of the corpus and of the ``/cut/`` points.
        errors: unexpected exceptions raised in handler threads (should stay empty;
            disconnects are not errors).
    """

    def __init__(
        self,
        *,
        n_images: int = 100,
        latency: float = 0.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if n_images < 0:
            raise ValueError(f"n_images must be >= 0, got {n_images}")
        self.latency: float = float(latency)
        self.generation: int = 0
        self.seed = seed
        self.errors: list[BaseException] = []
        self._host = host
        self._port = port
        self._entries = _build_corpus(n_images, seed)
        self._by_key = {_target(entry.target).key: entry for entry in self._entries}
        self._lock = threading.Lock()
        self._hits: Counter[str] = Counter()
        self._attempts: Counter[str] = Counter()
        self._last_headers: dict[str, dict[str, str]] = {}
        self._ranges: dict[str, list[str | None]] = {}
        self._served: Counter[str] = Counter()
        self._total = 0
        self._accepted = 0
        self._serving = 0
        self._peak = 0
        self._times: list[float] = []
        self._lifecycle = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None

    def __repr__(self) -> str:
        where = self._base_url or "not started"
        return f"ImageServer({where}, n_images={len(self._entries)})"

    # -------------------------------------------------------------- lifecycle

    def start(self) -> ImageServer:
        """Bind and start serving in a background thread; a no-op if already running.

        Returns:
            ``self``, so ``server = ImageServer().start()`` works.
        """
        with self._lifecycle:
            if self._server is not None:
                return self
            server = _Server((self._host, self._port), self)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _POLL_INTERVAL},
                name=f"{_SERVER_NAME}-accept",
                daemon=True,
            )
            thread.start()
            host, port = server.server_address[:2]
            host_text = host.decode() if isinstance(host, bytes | bytearray) else str(host)
            if ":" in host_text:
                host_text = f"[{host_text}]"
            self._server, self._thread = server, thread
            self._base_url = f"http://{host_text}:{port}"
            return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and every open connection.

        Handler threads (including keep-alive ones and those sleeping in
        ``latency``, ``/slow/`` or ``/drip/``) are woken and joined, so none linger.
        Calling it on a stopped server does nothing.
        """
        with self._lifecycle:
            server, thread = self._server, self._thread
            if server is None or thread is None:
                return
            self._server = self._thread = None
            server.stop_event.set()
            server.shutdown()
            server.server_close()
            handlers = server.close_connections()
            thread.join()
            deadline = time.monotonic() + _STOP_JOIN_TIMEOUT
            for handler in handlers:
                handler.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> ImageServer:
        """Start the server; see :meth:`start`."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop the server; see :meth:`stop`."""
        self.stop()

    # ------------------------------------------------------------------- URLs

    @property
    def base_url(self) -> str:
        """``"http://127.0.0.1:PORT"``.

        Raises:
            RuntimeError: before :meth:`start`.
        """
        if self._base_url is None:
            raise RuntimeError("ImageServer is not started; use start() or a with block")
        return self._base_url

    def url(self, path: str) -> str:
        """Return the full URL of ``path`` on this server.

        Args:
            path: a path such as ``"/status/404/x.png"`` (leading slash optional).

        Returns:
            ``base_url + "/" + path.lstrip("/")``.
        """
        return f"{self.base_url}/{path.lstrip('/')}"

    @property
    def urls(self) -> list[str]:
        """Full URLs of the corpus images, in deterministic order.

        With ``n_images >= 8`` the last three are ``/a/cat.jpg``, ``/b/cat.jpg`` and
        ``/img/cat.jpg?v=2``: same basenames, different images.
        """
        base = self.base_url
        return [base + entry.target for entry in self._entries]

    # --------------------------------------------------------------- expected

    def expected(self, url_or_path: str) -> bytes:
        """Return the exact body this server delivers for a URL, once it succeeds.

        Args:
            url_or_path: a full URL or a path with optional query, e.g.
                ``"/redirect/3/x.png"``. Percent-escapes are compared decoded.

        Returns:
            The image bytes: the corpus image, the ``/any/`` image, the decoded
            ``/gzip/`` image, the final ``/fail/`` or ``/redirect/`` image, and so on
            (for ``/reset/`` and ``/truncate/`` the body they announce but cut).

        Raises:
            KeyError: if the URL does not end in a known image (404s, statuses,
                loops, HTML, bombs, endless bodies...).
        """
        image = self._image_for(_target(url_or_path))
        if image is None:
            raise KeyError(url_or_path)
        return image[1]

    def expected_sha256(self, url_or_path: str) -> str:
        """Return the hex SHA-256 of :meth:`expected` for the same URL.

        Raises:
            KeyError: as :meth:`expected`.
        """
        return hashlib.sha256(self.expected(url_or_path)).hexdigest()

    # ------------------------------------------------------------------- hits

    def hits(self, path: str) -> int:
        """Count requests (GET and HEAD) received for a path, ignoring the query.

        Args:
            path: a path like ``"/status/404/x.png"`` or a full URL; any query is
                dropped and percent-escapes are compared decoded.

        Returns:
            The number of requests since start or the last :meth:`reset_hits`.
        """
        key = _target(path).path
        with self._lock:
            return self._hits[key]

    def reset_hits(self) -> None:
        """Zero the hit counters, :attr:`total_requests`, :attr:`total_connections`,
        :attr:`peak_concurrency`, :attr:`request_times`, :meth:`last_headers`,
        :meth:`ranges` and :meth:`bytes_served`.

        The per-URL state of ``/fail/``, ``/corrupt/``, ``/reset-once/`` and
        ``/truncate-once/`` is kept; use a fresh ``<name>`` to get fresh failures.
        """
        with self._lock:
            self._hits.clear()
            self._last_headers.clear()
            self._ranges.clear()
            self._served.clear()
            self._total = 0
            self._accepted = 0
            self._peak = self._serving
            self._times.clear()

    def _count_connection(self) -> None:
        with self._lock:
            self._accepted += 1

    @property
    def total_connections(self) -> int:
        """Number of connections accepted since start or :meth:`reset_hits`."""
        with self._lock:
            return self._accepted

    @property
    def total_requests(self) -> int:
        """Number of requests served (all paths) since start or :meth:`reset_hits`."""
        with self._lock:
            return self._total

    @property
    def peak_concurrency(self) -> int:
        """The most requests waiting out :attr:`latency` at once, since start or
        :meth:`reset_hits`: how many a client had in flight (0 without latency)."""
        with self._lock:
            return self._peak

    @property
    def request_times(self) -> list[float]:
        """When each request arrived (``time.monotonic()``), since start or
        :meth:`reset_hits`, in order."""
        with self._lock:
            return list(self._times)

    def last_headers(self, path: str) -> dict[str, str] | None:
        """Return the headers of the latest request for a path, or None if none came.

        Args:
            path: as for :meth:`hits`.

        Returns:
            A fresh dict of header name (as sent) to value; repeated headers are
            joined with ``", "``.
        """
        key = _target(path).path
        with self._lock:
            headers = self._last_headers.get(key)
            return dict(headers) if headers is not None else None

    def ranges(self, path: str) -> list[str | None]:
        """Return the ``Range`` header of every request for a path, in order (``None``
        for a request without one).

        Args:
            path: as for :meth:`hits`.
        """
        key = _target(path).path
        with self._lock:
            return list(self._ranges.get(key, ()))

    def bytes_served(self, path: str) -> int:
        """Return how many body bytes the ranged routes sent for a path (cut answers
        count what they sent).

        Args:
            path: as for :meth:`hits`.
        """
        key = _target(path).path
        with self._lock:
            return self._served[key]

    # -------------------------------------------------------------- internals

    def _record(self, path: str, headers: Sequence[tuple[str, Any]]) -> None:
        joined = _join_headers(headers)
        asked = next((str(v) for k, v in headers if k.lower() == "range"), None)
        with self._lock:
            self._hits[path] += 1
            self._total += 1
            self._last_headers[path] = joined
            self._times.append(time.monotonic())
            self._ranges.setdefault(path, []).append(asked)

    def _in_flight(self, step: int) -> None:
        with self._lock:
            self._serving += step
            self._peak = max(self._peak, self._serving)

    def _count_served(self, path: str, count: int) -> None:
        with self._lock:
            self._served[path] += count

    def _validators(self, body: bytes, params: dict[str, str]) -> tuple[str | None, str | None]:
        """The ``ETag`` and ``Last-Modified`` of a ranged answer (``None``: not sent)."""
        generation = self.generation
        etag: str | None = f'"{zlib.crc32(body):08x}-{generation}"'
        if params.get("etag") == "weak":
            etag = f"W/{etag}"
        elif params.get("etag") == "none":
            etag = None
        modified = None
        if params.get("modified") != "0":
            modified = email.utils.formatdate(_LAST_MODIFIED + generation, usegmt=True)
        return etag, modified

    def _attempt(self, key: str) -> int:
        """Count a request to a stateful URL; return how many came before it."""
        with self._lock:
            previous = self._attempts[key]
            self._attempts[key] = previous + 1
            return previous

    def _corpus_image(self, t: _Target) -> tuple[str, bytes] | None:
        entry = self._by_key.get(t.key)
        if entry is None and t.raw_query:
            # Unknown query parameters are ignored, as most real servers do.
            entry = self._by_key.get(t.path)
        if entry is None:
            return None
        return entry.kind, make_image(entry.kind, entry.size, entry.seed)

    def _big_body_location(self, t: _Target) -> str:
        if self._entries:
            return self._entries[0].target
        return f"/any/{t.rest or ''}"

    def _image_for(self, t: _Target) -> tuple[str, bytes] | None:
        """The image a target finally serves, shared by the handler and expected()."""
        image = self._corpus_image(t)
        if image is not None or t.rest is None:
            return image
        if t.route in _IMAGE_ROUTES:
            return _derived_image(t.key, t.path)
        if t.route == "fail":
            return _derived_image(t.key, t.path) if _parse_fail(t) is not None else None
        if t.route == "big":
            return _derived_image(t.key, t.path, _size_param(t, _BIG_DEFAULT))
        if t.route in _RANGED_ROUTES:
            # The body of /big/ with the same name and size: the faults' own parameters
            # (cuts, run...) give fresh per-URL state, not another body to make.
            size = _query(t).get("size")
            return self._image_for(
                _target(f"/big/{t.rest}" + ("" if size is None else f"?size={size}"))
            )
        if t.route == "corrupt":
            if _parse_count(t) is None:
                return None
            return _derived_image(t.key, t.path, _size_param(t, None))
        if t.route == "redirect":
            parsed = _parse_redirect(t)
            if parsed is None:
                return None
            final = _parse_target(f"/redirect/0/{parsed[1]}", t.raw_query)
            return _derived_image(final.key, final.path)
        if t.route == "redirect-big-body":
            return self._image_for(_target(self._big_body_location(t)))
        return None
