"""A real HTTP/2-over-TLS image server on loopback, for the tests of both backends.

:class:`H2ImageServer` runs hypercorn in a background thread (its own asyncio loop) on
``127.0.0.1`` and a free port, with a throw-away CA and server certificate from
``trustme``, offering ``h2`` and ``http/1.1`` by ALPN. Routes::

    /img/<name>.png             200, a deterministic PNG (see expected()), image/png
    /redirect-http/<name>       302 to http://127.0.0.1:PORT/img/<name>.png (a downgrade)
    /redirect-to?location=URL   302 to URL, verbatim
    /big/<size>.png             200, ``big_body(size)``, sent in 256 KiB DATA blocks

Anything else answers 404. The server counts what the tests want to check:
:attr:`~H2ImageServer.connections` (TCP connections accepted, those whose TLS
handshake then failed included), :attr:`~H2ImageServer.clients` (the client addresses
that sent requests: one per connection used), :attr:`~H2ImageServer.http_versions`
(the ASGI ``http_version`` of every request: ``"2"`` or ``"1.1"``) and
:attr:`~H2ImageServer.open_connections`.

Stopping takes a few milliseconds, however the clients behave: hypercorn closes idle
connections itself, but closing TLS waits (30 s in asyncio) for the client's
``close_notify``, so whatever is still open after a short grace is cut at the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import shutil
import socket
import tempfile
import threading
import zlib
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import parse_qs

import trustme

# serve() would bind the socket itself; worker_serve() (what serve() calls) takes ours,
# whose accept() is how connections are counted and, at the end, cut.
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.typing import ASGIFramework
from hypercorn.utils import wrap_app

from fetchpool.testing import make_image

__all__ = ["H2ImageServer"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_HOST: Final = "127.0.0.1"
_IMAGE_SIZE: Final = 3000
_START_TIMEOUT: Final = 10.0
_STOP_TIMEOUT: Final = 5.0
# Seconds that connections get to close by themselves once the server stops.
_GRACE: Final = 0.1
_log = logging.getLogger("tests.h2server")


class _ListeningSocket(socket.socket):
    """A listening socket that keeps every connection it accepts, to count and cut them."""

    def __init__(self, on_accept: Callable[[socket.socket], None]) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self._on_accept = on_accept

    def accept(self) -> tuple[socket.socket, Any]:
        conn, address = super().accept()
        self._on_accept(conn)
        return conn, address


class H2ImageServer:
    """Hypercorn on ``127.0.0.1``, HTTP/2 and HTTP/1.1 over TLS, serving PNGs.

    Use it as a context manager; everything is torn down on exit (in milliseconds),
    the temporary certificate files included.

    Args:
        hosts: the names and addresses the server's certificate is issued for (one
            without ``127.0.0.1`` makes a certificate for another host).
        not_before, not_after: the certificate's validity (trustme's defaults if
            ``None``; both in the past make an expired certificate).

    Attributes:
        ca_file: path of the PEM file of the CA that signed the server's certificate
            (for ``127.0.0.1`` and ``localhost``).
        port: the port it listens on.
        errors: unexpected exceptions seen in the server (should stay empty); exiting
            the ``with`` block raises if there are any.
    """

    def __init__(
        self,
        *,
        hosts: Sequence[str] = (_HOST, "localhost"),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._all: list[socket.socket] = []  # every connection, to cut at the end
        self._accepted: list[socket.socket] = []  # those since reset(), to count
        self._clients: list[tuple[str, int]] = []
        self._versions: list[str] = []
        self._paths: list[str] = []
        self.errors: list[BaseException] = []
        self._ca = trustme.CA()
        self._cert = self._ca.issue_cert(*hosts, not_before=not_before, not_after=not_after)
        self._tmp: Path | None = None
        self.ca_file = ""
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> H2ImageServer:
        self._tmp = Path(tempfile.mkdtemp(prefix="fetchpool-h2-"))
        self.ca_file = str(self._tmp / "ca.pem")
        self._ca.cert_pem.write_to_path(self.ca_file)
        server_pem = str(self._tmp / "server.pem")
        self._cert.private_key_and_cert_chain_pem.write_to_path(server_pem)
        config = Config()
        config.certfile = config.keyfile = server_pem
        config.alpn_protocols = ["h2", "http/1.1"]
        config.graceful_timeout = 2.0  # never reached: connections are cut before
        config.errorlog = _log
        config.accesslog = None
        # Bound and listening before the thread starts: no race for a free port, and
        # an early client waits in the backlog.
        sock = _ListeningSocket(self._accept)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((_HOST, 0))
            sock.listen(128)
            sock.setblocking(False)
            self.port = sock.getsockname()[1]
        except BaseException:
            sock.close()
            self._cleanup_files()
            raise
        self._thread = threading.Thread(
            target=self._run, args=(config, sock), name="h2-image-server", daemon=True
        )
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT) or self.errors:
            errors = list(self.errors)
            with contextlib.suppress(RuntimeError):
                self.__exit__(None, None, None)
            raise RuntimeError(f"the HTTP/2 test server did not start: {errors!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        self._thread = None
        if thread is not None:
            if loop is not None and stop is not None:
                with contextlib.suppress(RuntimeError):  # the loop has ended already
                    loop.call_soon_threadsafe(stop.set)
            thread.join(_STOP_TIMEOUT)
        self._cleanup_files()
        if thread is not None and thread.is_alive():
            raise RuntimeError("the HTTP/2 test server did not stop")
        if self.errors and exc[0] is None:
            raise RuntimeError(f"the HTTP/2 test server failed: {self.errors!r}")

    def _cleanup_files(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _accept(self, conn: socket.socket) -> None:
        with self._lock:
            self._all = [c for c in self._all if c.fileno() != -1]
            self._all.append(conn)
            self._accepted.append(conn)

    def _cut_connections(self) -> None:
        """Shut down every accepted socket still open (on the loop's thread)."""
        with self._lock:
            accepted = list(self._all)
        for conn in accepted:
            if conn.fileno() != -1:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _run(self, config: Config, sock: socket.socket) -> None:
        try:
            asyncio.run(self._main(config, sock))
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self._started.set()  # for a start that failed
            sock.close()

    async def _main(self, config: Config, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        self._stop = asyncio.Event()
        self._loop = loop
        await worker_serve(
            wrap_app(cast(ASGIFramework, self._app), config.wsgi_max_body_size, "asgi"),
            config,
            sockets=Sockets(secure_sockets=[sock], insecure_sockets=[], quic_sockets=[]),
            shutdown_trigger=self._until_stopped,
        )

    async def _until_stopped(self) -> None:
        assert self._stop is not None
        await self._stop.wait()
        # Hypercorn now closes idle connections; cut those that do not close in time.
        asyncio.get_running_loop().call_later(_GRACE, self._cut_connections)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        # A client that refuses the certificate aborts the handshake: expected here.
        if isinstance(exc, OSError):
            return
        self.errors.append(exc or RuntimeError(str(context.get("message"))))

    # ------------------------------------------------------------------- the app

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            try:
                await self._http(scope, send)
            except Exception as exc:
                self.errors.append(exc)
                raise

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
                self._started.set()
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, send: Send) -> None:
        path: str = scope["path"]
        client = scope.get("client")
        with self._lock:
            self._versions.append(scope["http_version"])
            self._paths.append(path)
            if client is not None:
                self._clients.append((str(client[0]), int(client[1])))
        head_only = scope["method"] == "HEAD"
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
        elif path.startswith("/img/") and path.endswith(".png") and len(path) > 9:
            body = self.expected(path[len("/img/") : -len(".png")])
            await _respond(send, 200, body, [(b"content-type", b"image/png")], head_only)
        elif path.startswith("/big/") and path.endswith(".png") and path[5:-4].isdigit():
            size = int(path[5:-4])
            await _respond_in_blocks(send, big_body(size), head_only)
        elif path.startswith("/redirect-http/") and len(path) > len("/redirect-http/"):
            name = path[len("/redirect-http/") :]
            location = f"http://{_HOST}:{self.port}/img/{name}.png".encode()
            await _respond(send, 302, b"", [(b"location", location)], head_only)
        elif path == "/redirect-to":
            query = parse_qs(scope["query_string"].decode("latin-1"))
            location = query.get("location", [""])[0].encode("latin-1")
            await _respond(send, 302, b"", [(b"location", location)], head_only)
        else:
            await _respond(send, 404, b"not found\n", [], head_only)

    # ------------------------------------------------------------------ for tests

    def url(self, path: str) -> str:
        """``https://127.0.0.1:PORT/<path>`` (leading slash optional)."""
        return f"https://{_HOST}:{self.port}/{path.lstrip('/')}"

    def image_url(self, name: str) -> str:
        """The URL of the image ``name``: ``url(f"/img/{name}.png")``."""
        return self.url(f"/img/{name}.png")

    @staticmethod
    def expected(name: str) -> bytes:
        """The PNG that ``/img/<name>.png`` serves (``name`` without the extension)."""
        seed = zlib.crc32(name.encode())
        return make_image("png", _IMAGE_SIZE + seed % 1000, seed)

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (or since :meth:`reset`)."""
        with self._lock:
            return len(self._accepted)

    @property
    def open_connections(self) -> int:
        """Accepted connections (since :meth:`reset`) the server has not closed yet.

        The server closes its side soon after the client closes its own.
        """
        with self._lock:
            return sum(1 for conn in self._accepted if conn.fileno() != -1)

    @property
    def clients(self) -> set[tuple[str, int]]:
        """The distinct ``(host, port)`` of clients that sent requests: used connections."""
        with self._lock:
            return set(self._clients)

    @property
    def http_versions(self) -> list[str]:
        """The ASGI ``http_version`` of every request, in arrival order."""
        with self._lock:
            return list(self._versions)

    @property
    def paths(self) -> list[str]:
        """The path of every request, in arrival order."""
        with self._lock:
            return list(self._paths)

    def reset(self) -> None:
        """Zero the counters: :attr:`connections` counts only connections accepted after."""
        with self._lock:
            self._accepted.clear()
            self._clients.clear()
            self._versions.clear()
            self._paths.clear()


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    head_only: bool = False,
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    if not any(name == b"content-type" for name, _ in headers):
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else body})


def big_body(size: int) -> bytes:
    """A PNG-looking body of ``size`` bytes (``size`` >= 8), the same for every call."""
    pattern = bytes(range(251)) * (size // 251 + 1)
    return (b"\x89PNG\r\n\x1a\n" + pattern)[:size]


async def _respond_in_blocks(send: Send, body: bytes, head_only: bool) -> None:
    headers = [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if head_only:
        await send({"type": "http.response.body", "body": b""})
        return
    block = 256 * 1024
    for start in range(0, len(body), block):
        last = start + block >= len(body)
        await send(
            {
                "type": "http.response.body",
                "body": body[start : start + block],
                "more_body": not last,
            }
        )
