"""A lean benchmark HTTP/1.1 server, run in a process of its own (asyncio, stdlib only).

Why not :class:`fetchpool.testing.ImageServer` directly: it is built for fault injection
and correctness (a thread per connection, ``http.server`` parsing, hit counters), and it
keeps only 256 generated images in an LRU cache, so a 5,000-image run regenerates (and
zlib-compresses) most bodies per request. Here the bodies are the same kind of images
(made with the public :func:`fetchpool.testing.make_image`), generated once at start and
served as prebuilt ``head + body`` bytes from one event loop, in a separate process so
its GIL never competes with the client under test. A single large body is served with
``sendfile(2)`` from a file on tmpfs.

Routes::

    /<collection>/<index>.<ext>   body number ``index % distinct`` of that collection
    /big/<name>                   the large body (PNG signature, then a byte pattern)
    /_stats                       JSON: the server's CPU seconds and request count

Run as ``python -m benchmarks.server CONFIG_JSON``: prints one JSON line (port and the
manifest of every body's extension, size and sha256), then serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import struct
import sys
import tempfile
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Final

from fetchpool.testing import make_image

KINDS: Final = ("png", "jpeg", "gif", "webp", "bmp")
KIND_WEIGHTS: Final = (3, 4, 1, 1, 1)
EXTENSIONS: Final = {"png": "png", "jpeg": "jpg", "gif": "gif", "webp": "webp", "bmp": "bmp"}
CONTENT_TYPES: Final = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
}
_PATTERN_SIZE: Final = 1 << 20
_WRITE_HIGH_WATER: Final = 4 << 20


@dataclass(frozen=True)
class Body:
    """One distinct response body: its URL extension, size and sha256."""

    ext: str
    size: int
    sha256: str


def corpus_size(rng: random.Random) -> int:
    """Draw an image size like ImageServer's corpus: mostly 20-90 kB, 10 % 100-300 kB."""
    if rng.random() < 0.1:
        return rng.randint(100_000, 300_000)
    return rng.randint(20_000, 90_000)


def build_collection(
    count: int, distinct: int, size: int | None, seed: int, kind: str | None = None
) -> tuple[list[bytes], list[Body]]:
    """Generate ``min(count, distinct)`` image bodies with their prebuilt responses.

    ``size`` None draws corpus-like sizes; ``kind`` None mixes formats like ImageServer.
    """
    rng = random.Random(f"fetchpool-bench-{seed}")
    responses: list[bytes] = []
    bodies: list[Body] = []
    for _ in range(max(1, min(count, distinct))):
        drawn = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
        chosen = kind or drawn
        wanted = size if size is not None else corpus_size(rng)
        data = make_image(chosen, wanted, rng.getrandbits(32))
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPES[chosen]}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode("ascii")
        responses.append(head + data)
        bodies.append(Body(EXTENSIONS[chosen], len(data), hashlib.sha256(data).hexdigest()))
    return responses, bodies


def write_big_body(directory: str, size: int) -> tuple[str, str]:
    """Write a ``size``-byte body that sniffs as PNG to a file; return (path, sha256)."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + crc
    pattern = random.Random("fetchpool-bench-big").randbytes(_PATTERN_SIZE)
    digest = hashlib.sha256()
    fd, path = tempfile.mkstemp(prefix="fetchpool-bench-big-", suffix=".png", dir=directory)
    with os.fdopen(fd, "wb") as f:
        first = head + pattern[: max(0, min(size, _PATTERN_SIZE) - len(head))]
        first = first[:size]
        f.write(first)
        digest.update(first)
        remaining = size - len(first)
        view = memoryview(pattern)
        while remaining > 0:
            piece = view[: min(remaining, _PATTERN_SIZE)]
            f.write(piece)
            digest.update(piece)
            remaining -= len(piece)
    return path, digest.hexdigest()


class BenchServer:
    """Serve prebuilt responses on 127.0.0.1 from one asyncio loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.latency = float(config.get("latency", 0.0))
        self.collections: dict[str, tuple[int, list[bytes]]] = {}
        self.manifest: dict[str, Any] = {"collections": {}, "big": None}
        for spec in config.get("collections", []):
            responses, bodies = build_collection(
                int(spec["count"]),
                int(spec["distinct"]),
                spec.get("size"),
                int(spec["seed"]),
                spec.get("kind"),
            )
            self.collections[spec["name"]] = (int(spec["count"]), responses)
            self.manifest["collections"][spec["name"]] = [[b.ext, b.size, b.sha256] for b in bodies]
        self.big_path: str | None = None
        self.big_size = 0
        big = config.get("big")
        if big:
            self.big_size = int(big["size"])
            self.big_path, sha = write_big_body(str(big.get("dir", "/dev/shm")), self.big_size)
            self.manifest["big"] = {"size": self.big_size, "sha256": sha}
        self.requests = 0
        self._not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    def close(self) -> None:
        """Remove the large body's file."""
        if self.big_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.big_path)

    def _lookup(self, target: bytes) -> bytes | None:
        path = target.split(b"?", 1)[0].decode("latin-1")
        _, collection, name = [*path.split("/", 2), "", ""][:3]
        entry = self.collections.get(collection)
        if entry is None:
            return None
        count, responses = entry
        stem = name.split(".", 1)[0]
        if not stem.isdigit() or int(stem) >= count:
            return None
        return responses[int(stem) % len(responses)]

    def _stats(self) -> bytes:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        body = json.dumps(
            {"cpu": usage.ru_utime + usage.ru_stime, "requests": self.requests}
        ).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        return head.encode() + b"\r\n\r\n" + body

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the requests of one keep-alive connection in turn."""
        transport = writer.transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    break
                line, _, headers = head.partition(b"\r\n")
                parts = line.split()
                if len(parts) != 3:
                    break
                method, target, version = parts
                lowered = headers.lower()
                close = version == b"HTTP/1.0" or b"connection: close" in lowered
                self.requests += 1
                if target == b"/_stats":
                    writer.write(self._stats())
                elif target.startswith(b"/big/") and self.big_path is not None:
                    if self.latency:
                        await asyncio.sleep(self.latency)
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                        + f"Content-Length: {self.big_size}\r\n\r\n".encode()
                    )
                    if method != b"HEAD":
                        with open(self.big_path, "rb") as f:
                            await loop.sendfile(transport, f, 0, self.big_size)
                else:
                    if self.latency:
                        await asyncio.sleep(self.latency)
                    response = self._lookup(target) or self._not_found
                    if method == b"HEAD":
                        response = response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
                    writer.write(response)
                    if transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                        await writer.drain()
                if close:
                    break
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def _finish(stop: asyncio.Future[None]) -> None:
    if not stop.done():
        stop.set_result(None)


async def serve(server: BenchServer) -> None:
    """Serve until stdin closes; print the port and manifest as one JSON line first."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    listener = await asyncio.start_server(
        server.handle, "127.0.0.1", 0, backlog=4096, limit=1 << 16
    )
    port = listener.sockets[0].getsockname()[1]
    print(json.dumps({"port": port, **server.manifest}), flush=True)

    def wait_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(_finish, stop)

    threading.Thread(target=wait_stdin, daemon=True).start()
    async with listener:
        await stop


def main(argv: list[str]) -> int:
    """Entry point: ``python -m benchmarks.server CONFIG_JSON``."""
    config = json.loads(argv[0]) if argv else {}
    server = BenchServer(config)
    try:
        asyncio.run(serve(server))
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
