"""The ``requests`` backend: one ``requests.Session`` per worker thread.

The default backend, and the one that ``responses`` mocks. Everything specific to
requests and urllib3 lives here and in :mod:`._splice`: sessions and adapters, the
connection classes that hand sockets to the deadline's watchdog, the proxy and CA
settings read from the environment, and the mapping of their exceptions.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager
from urllib3.util.connection import allowed_gai_family

from .. import __version__
from ..deadline import Guard, current_guard, guarding
from ..errors import FetchError
from ..ssrf import AddressPolicy, Refusal
from . import (
    Failure,
    Request,
    SpliceSink,
    attempt_error,
    ca_bundle_from_env,
    describe,
    refused,
)
from ._splice import splice_body

__all__ = [
    "NETWORK_ERRORS",
    "RequestsReply",
    "RequestsTransport",
    "default_session",
    "network_error",
    "prepare_pool_manager",
    "prepare_session",
]

_ENV_CACHE_HOSTS = 256
#: What a read or a send through requests and urllib3 can raise, short of a bug.
NETWORK_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
    ValueError,
)

# -- the guards' hooks: sockets handed to the attempt's guard, addresses screened ------

#: The SSRF policy of the send under way on this thread (``policy``), if any.
_screening = threading.local()


def _screened_conn(conn: HTTPConnection, new_conn: Callable[[], socket.socket]) -> socket.socket:
    """Open ``conn``'s socket through ``new_conn``, to an address the SSRF policy allows.

    The name is resolved once here, each address checked, and urllib3 is handed the
    address itself to connect to: what was checked is what is connected to, with no
    second lookup for a rebinding DNS server to answer differently. ``conn.host`` (the
    ``Host`` header, TLS SNI and certificate check) stays the name. Refused addresses
    are skipped; :class:`~fetchpool.ssrf.Refusal` when none is left.
    """
    policy: AddressPolicy | None = getattr(_screening, "policy", None)
    if policy is None:
        return new_conn()
    name = conn._dns_host
    try:
        infos = socket.getaddrinfo(name, conn.port, allowed_gai_family(), socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise urllib3.exceptions.NameResolutionError(conn.host, conn, exc) from exc
    refusal: Refusal | None = None
    failed: urllib3.exceptions.ConnectTimeoutError | None = None
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        blocked = policy.refusal(conn.host, address)
        if blocked is not None:
            refusal = refusal or blocked
            continue
        conn._dns_host = address
        try:
            return new_conn()
        except urllib3.exceptions.ConnectTimeoutError as exc:  # NewConnectionError too
            failed = exc
        finally:
            conn._dns_host = name
    if failed is not None:
        raise failed
    if refusal is None:  # pragma: no cover - getaddrinfo gives an address or raises
        raise urllib3.exceptions.NameResolutionError(conn.host, conn, socket.gaierror())
    raise refusal


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _screened_conn(self, super()._new_conn)

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        g = current_guard()
        if g is not None and self.sock is not None:
            g.attach(self.sock)
        return super().getresponse(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _screened_conn(self, super()._new_conn)

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        g = current_guard()
        if g is not None and self.sock is not None:
            g.attach(self.sock)
        return super().getresponse(*args, **kwargs)


class _GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


_GUARDED_POOL_CLASSES: dict[str, type[HTTPConnectionPool]] = {
    "http": _GuardedHTTPConnectionPool,
    "https": _GuardedHTTPSConnectionPool,
}


def _close_pool(pool: HTTPConnectionPool) -> None:
    pool.close()


def prepare_pool_manager(manager: PoolManager) -> bool:
    """Make ``manager`` close the pools it drops, and create guarded connections if it
    uses urllib3's default pools.

    urllib3 2 drops a pool (``PoolManager.clear()``, which ``Session.close()`` calls, or
    an eviction when more hosts come than it keeps) without closing it, and counts on the
    garbage collector: a response still referenced (an error's traceback kept on a
    result holds the frames that hold it) keeps its pool, and that pool's idle sockets,
    open after ``close()``. As urllib3 1.x did, it now closes them when dropping them.

    Returns:
        Whether the manager now hands sockets to guards (a custom pool class is left
        alone; the deadline is then checked between body chunks only).
    """
    manager.pools.dispose_func = _close_pool
    classes = manager.pool_classes_by_scheme
    if classes.get("http") is HTTPConnectionPool and classes.get("https") is HTTPSConnectionPool:
        manager.pool_classes_by_scheme = dict(_GUARDED_POOL_CLASSES)
        return True
    return all(classes.get(s) is _GUARDED_POOL_CLASSES[s] for s in ("http", "https"))


class _GuardedAdapter(HTTPAdapter):
    """An adapter whose pools, direct and through proxies, hand sockets to the guard."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        prepare_pool_manager(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        manager: PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        prepare_pool_manager(manager)
        return manager


def _guard_adapter(adapter: HTTPAdapter) -> None:
    """Guard a caller's adapter: its direct pools and every proxy manager it makes."""
    prepare_pool_manager(adapter.poolmanager)
    if isinstance(adapter, _GuardedAdapter) or adapter.__dict__.get("_fetchpool_guarded"):
        return
    adapter.__dict__["_fetchpool_guarded"] = True
    make = adapter.proxy_manager_for

    def proxy_manager_for(proxy: str, **proxy_kwargs: Any) -> PoolManager:
        manager: PoolManager = make(proxy, **proxy_kwargs)
        prepare_pool_manager(manager)
        return manager

    adapter.proxy_manager_for = proxy_manager_for  # type: ignore[method-assign]


def _screens(session: requests.Session) -> bool:
    """Whether every adapter of ``session`` makes fetchpool's guarded connections."""
    return all(
        isinstance(adapter, HTTPAdapter)
        and all(
            adapter.poolmanager.pool_classes_by_scheme.get(scheme) is cls
            for scheme, cls in _GUARDED_POOL_CLASSES.items()
        )
        for adapter in session.adapters.values()
    )


# -- sessions -------------------------------------------------------------------------


def _no_redirects(*args: object, **kwargs: object) -> Iterator[Any]:
    return iter(())


def prepare_session(session: requests.Session) -> requests.Session:
    """Make ``session`` safe to use for fetchpool's attempts and return it.

    Disarms ``requests``' own redirect machinery on this instance (it would read 3xx
    bodies, DESIGN rule 6) and guards the default connection pools of its adapters.
    """
    session.resolve_redirects = _no_redirects  # type: ignore[method-assign]
    for adapter in session.adapters.values():
        if isinstance(adapter, HTTPAdapter):
            _guard_adapter(adapter)
    return session


def default_session(workers: int) -> requests.Session:
    """Return a new session for one worker thread: no urllib3 retries, pools sized to match."""
    session = requests.Session()
    session.headers["User-Agent"] = (
        f"fetchpool/{__version__} python-requests/{requests.__version__}"
    )
    for prefix in ("http://", "https://"):
        session.mount(
            prefix,
            _GuardedAdapter(pool_connections=16, pool_maxsize=max(1, workers), max_retries=0),
        )
    return prepare_session(session)


# -- errors ---------------------------------------------------------------------------


def _wrapped(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """``exc`` or the first thing it wraps (cause, context, args) that is one of ``kinds``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return current
        todo += [a for a in current.args if isinstance(a, BaseException)]
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return None


def _caused_by(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether ``exc`` or anything it wraps (cause, context, args) is one of ``kinds``."""
    return _wrapped(exc, kinds) is not None


def _classify(exc: BaseException) -> Failure:
    if isinstance(
        exc,
        (
            requests.exceptions.InvalidURL,
            requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema,
            urllib3.exceptions.LocationParseError,
        ),
    ):
        return "invalid-url"
    if isinstance(exc, requests.exceptions.SSLError):
        dropped = _caused_by(
            exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, TimeoutError)
        ) and not _caused_by(exc, (ssl.SSLCertVerificationError,))
        return "tls-dropped" if dropped else "tls"
    if _caused_by(
        exc,
        (
            requests.exceptions.InvalidHeader,
            urllib3.exceptions.InvalidHeader,
            urllib3.exceptions.InvalidChunkLength,
        ),
    ):
        return "malformed"
    if isinstance(
        exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    ):
        return "timeout"
    return "connection"


def network_error(
    exc: BaseException,
    shown: str,
    guard: Guard | None,
    during: str,
    secrets: tuple[str, ...] = (),
) -> FetchError:
    """Map a ``requests``/urllib3/socket exception to the right :class:`FetchError`."""
    kind = _classify(exc)
    # urllib3 wraps a refused handshake in "Max retries exceeded ... (Caused by SSLError(
    # ...))": misleading for a failure that was tried once. ssl's own text says it all.
    cause = _wrapped(exc, (ssl.SSLError,)) if kind == "tls" else None
    return attempt_error(kind, shown, during, describe(cause or exc, secrets), guard)


# -- the transport --------------------------------------------------------------------


def _environment(
    session: requests.Session, url: str, cache: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, Any]:
    # Proxies and CA bundle depend only on scheme and host; reading them from
    # os.environ on every request is a large share of requests' per-call cost.
    parts = urlsplit(url)
    key = (parts.scheme.lower(), parts.netloc.lower())
    settings = cache.get(key)
    if settings is None:
        settings = dict(session.merge_environment_settings(url, {}, True, None, None))
        if settings.get("verify") is True and session.trust_env:
            # requests reads REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE (merged above) but not
            # OpenSSL's SSL_CERT_FILE / SSL_CERT_DIR, which the curl backend honours too.
            settings["verify"] = ca_bundle_from_env() or True
        if len(cache) >= _ENV_CACHE_HOSTS:
            # Many distinct hosts (a crawl): stay bounded rather than clever.
            cache.clear()
        cache[key] = settings
    return settings


class RequestsReply:
    """A streamed ``requests.Response`` as a :class:`~fetchpool.backends.Reply`."""

    def __init__(self, resp: requests.Response, request: Request, guard: Guard | None) -> None:
        self.resp = resp
        self.status = resp.status_code
        self.reason = resp.reason or ""
        self.headers = resp.headers
        self._request = request
        self._guard = guard
        self._source: Iterator[bytes] | None = None

    def _error(self, exc: BaseException) -> FetchError:
        request = self._request
        return network_error(exc, request.shown, self._guard, "while reading", request.secrets)

    def chunks(self, size: int) -> Iterator[bytes]:
        """Yield the body undecoded; see :meth:`fetchpool.backends.Reply.chunks`."""
        raw = self.resp.raw
        source: Iterator[bytes]
        if raw.chunked and raw.supports_chunked_reads():
            # urllib3's chunk parser tells a garbage chunk-size line (malformed, final)
            # from a connection that closed between chunks (truncated, retryable);
            # http.client's reports both as IncompleteRead.
            source = raw.read_chunked(size, decode_content=False)
        else:
            source = iter(lambda: raw.read(size, decode_content=False), b"")
        while True:
            try:
                data = next(source, b"")
            except NETWORK_ERRORS as exc:
                raise self._error(exc) from exc
            if not data:
                return
            yield data

    def read(self, size: int) -> bytes:
        """Return the next bytes of the body; see :meth:`fetchpool.backends.Reply.read`."""
        if self._source is None:
            self._source = self.chunks(size)
        return next(self._source, b"")

    def splice(self, sink: SpliceSink, length: int, moved: Callable[[int], None]) -> bool:
        """Splice a plain-HTTP body socket to file; see :mod:`fetchpool.backends._splice`."""
        return splice_body(self.resp, sink, length, moved, self._guard, self._request, self._error)

    def close(self) -> None:
        """Close the response (an unread body drops its connection)."""
        self.resp.close()


class RequestsTransport:
    """Sends each worker thread's requests on that thread's own session.

    Args:
        workers: the pool's size (each session's connection pool is sized to it).
        session_factory: makes a configured session for each worker thread, or ``None``
            for fetchpool's default one.
        policy: the SSRF guard's policy, checked on every new connection, or ``None``.
    """

    def __init__(
        self,
        workers: int,
        session_factory: Callable[[], requests.Session] | None = None,
        policy: AddressPolicy | None = None,
    ) -> None:
        self._workers = workers
        self._factory = session_factory
        self._policy = policy
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> tuple[requests.Session, dict[tuple[str, str], dict[str, Any]]]:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            if self._factory is not None:
                session = self._factory()
                if not isinstance(session, requests.Session):
                    raise TypeError("session_factory must return a requests.Session")
                prepare_session(session)
                if self._policy is not None and not _screens(session):
                    raise TypeError(
                        "block_private needs the session's adapters to be requests' "
                        "HTTPAdapter with urllib3's default connection pools"
                    )
            else:
                session = default_session(self._workers)
            self._local.session = session
            self._local.env_cache = {}
            with self._lock:
                self._sessions.append(session)
        return session, self._local.env_cache

    def send(self, request: Request, guard: Guard) -> RequestsReply:
        """Send one GET, redirects not followed; see :class:`fetchpool.backends.Transport`."""
        session, env_cache = self._session()
        prepared = session.prepare_request(
            requests.Request("GET", request.url, headers=dict(request.headers), auth=request.auth)
        )
        for name in request.drop:
            prepared.headers.pop(name, None)
        settings = _environment(session, request.url, env_cache)
        policy = self._policy
        if policy is not None and select_proxy(prepared.url or request.url, settings["proxies"]):
            # The proxy resolves and connects: its own address is not the one to check.
            refusal = policy.proxied(urlsplit(request.url).hostname or "")
            if refusal is not None:
                raise refused(refusal, request.shown, "requesting", guard)
            policy = None
        # The guarded connections find the guard and the policy here, deep inside urllib3.
        _screening.policy = policy
        try:
            with guarding(guard):
                resp = session.send(
                    prepared, allow_redirects=False, timeout=request.timeout, **settings
                )
        except Refusal as exc:
            raise refused(exc, request.shown, "requesting", guard) from exc
        except NETWORK_ERRORS as exc:
            raise network_error(exc, request.shown, guard, "requesting", request.secrets) from exc
        finally:
            _screening.policy = None
        return RequestsReply(resp, request, guard)

    def close(self) -> None:
        """Close every session (and so every pooled connection) the workers made."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
