"""The transport seam: what a backend must do, and the failures it reports.

A backend answers one question: "send this GET, give me the status, the headers and
the body bytes". Everything else, redirects, status and framing checks, decoding,
limits, naming and storage, is written once, above it (:mod:`fetchpool.transfer`,
:mod:`fetchpool.pipeline`). A backend never follows a redirect, never decodes a body
and never retries: it reports what the wire said, and maps its own exceptions to the
failures below so that both backends fail with the same types and messages.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, TypeVar

from ..deadline import Guard
from ..errors import BlockedAddressError, FetchError, InvalidURL, TransferError
from ..naming import scrub
from ..ssrf import AddressPolicy, Refusal

if TYPE_CHECKING:
    from ..hosts import Ticket
    from ..steps import Steps

T = TypeVar("T")

__all__ = [
    "CA_VARIABLES",
    "BodyEnded",
    "Failure",
    "Reply",
    "Request",
    "Runner",
    "SpliceSink",
    "Transport",
    "attempt_error",
    "ca_bundle_from_env",
    "check_guard",
    "describe",
    "on_done",
    "open_transport",
    "refused",
]

#: What went wrong below HTTP, as every backend classifies it.
Failure = Literal[
    "invalid-url", "tls", "tls-dropped", "malformed", "timeout", "connection", "blocked"
]


class Request(NamedTuple):
    """One GET to send, one hop of a redirect chain.

    A named tuple rather than a frozen dataclass: one is made per attempt and hop, and a
    frozen dataclass's ``__init__`` is a Python call setting each field by hand.

    Attributes:
        url: the URL, without user-info.
        headers: the request headers (the caller's, plus fetchpool's own).
        auth: ``(user, password)`` for Basic auth, from the caller's URL, or ``None``.
        drop: header names not to send even where the backend would add them itself
            (a session's default headers or cookie jar): set on cross-origin hops.
        timeout: ``(connect, read)`` seconds.
        shown: the caller's URL as messages show it (no user-info).
        secrets: what messages must never contain.
    """

    url: str
    headers: Mapping[str, str]
    auth: tuple[str, str] | None
    drop: tuple[str, ...]
    timeout: tuple[float, float]
    shown: str
    secrets: tuple[str, ...] = ()


class SpliceSink(Protocol):
    """Where :meth:`Reply.splice` puts the body (a :class:`~fetchpool.storage.TempFile`)."""

    def write(self, data: bytes | memoryview) -> None: ...
    def splice_from(self, pipe_fd: int, count: int) -> None: ...
    def direct(self, length: int) -> int | None:
        """A descriptor to write the next ``length`` bytes through, space allocated, or
        ``None`` where the sink must see the bytes (:meth:`write` then serves)."""
        ...

    def wrote(self, count: int) -> None:
        """Count ``count`` bytes written through the descriptor :meth:`direct` gave."""
        ...


class Reply(Protocol):
    """A response whose headers have arrived and whose body is unread.

    ``headers`` is case-insensitive; a field sent more than once has its values joined
    with ``", "``.
    """

    @property
    def status(self) -> int:
        """The HTTP status code."""
        ...

    @property
    def reason(self) -> str:
        """The reason phrase (may be empty: HTTP/2 has none)."""
        ...

    @property
    def headers(self) -> Mapping[str, str]:
        """The response headers."""
        ...

    def read(self, size: int) -> bytes:
        """Return the next bytes of the body as sent, at most ``size``; ``b""`` at the end.

        Transfer framing is removed, the content encoding kept.

        Raises:
            FetchError: the read failed (mapped with :func:`attempt_error`).
            BodyEnded: the connection ended before the announced length.
        """
        ...

    def splice(self, sink: SpliceSink, length: int, moved: Callable[[int], None]) -> bool:
        """Move the next ``length`` body bytes into ``sink`` without reading them here.

        Call ``moved(n)`` after each ``n`` bytes given to ``sink``. Returns ``False``
        (having moved none, or some with every count up to date) where this reply
        cannot; :meth:`chunks` then reads the rest.

        Raises:
            FetchError: as :meth:`chunks`; the connection is then closed.
            BodyEnded: as :meth:`chunks`.
        """
        ...

    def close(self) -> None:
        """Release the reply; an unread body is dropped with its connection."""
        ...


class Transport(Protocol):
    """A backend: sends single requests on behalf of the pipeline's worker threads.

    A backend that can drive the pipeline's steps itself (an event loop) also has
    ``runner(workers, hosts) -> Runner`` (``hosts``: the per-host limits, or ``None``);
    the pool then uses it instead of threads.
    """

    def send(self, request: Request, guard: Guard) -> Reply:
        """Send ``request`` and return once the status and headers are in.

        The transport must end the attempt when ``guard`` fires (deadline or cancel),
        however the server behaves.

        Raises:
            FetchError: the request failed (mapped with :func:`attempt_error`).
        """
        ...

    def close(self) -> None:
        """Close every connection the transport opened."""
        ...


class Runner(Protocol):
    """Runs downloads' steps (:mod:`fetchpool.steps`) and gives their results as futures."""

    def submit(self, start: Callable[[], Steps[T]], ticket: Ticket | None = None) -> Future[T]:
        """Run the steps ``start()`` makes; the future gets what they end with.

        With per-host limits, ``ticket`` is the download's: it starts once
        :meth:`HostLimits.pop <fetchpool.hosts.HostLimits.pop>` hands it out.
        """
        ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; cancel what has not started; wait for the rest."""
        ...

    def wake(self) -> None:
        """Look again at the downloads waiting to retry (the cancel event was set)."""
        ...


def on_done(future: Future[T], fn: Callable[[Future[T]], object]) -> None:
    """Call fetchpool's own ``fn(future)`` once ``future`` is done, where it completes.

    A runner may hand callers' done-callbacks to threads of their own (the curl
    backend's loop does, so that none can hold every download); ``fn`` is quick and
    never blocks, and runs where the future completes, with no hand-off.
    """
    Future.add_done_callback(future, fn)


class BodyEnded(Exception):
    """The body stopped short of its ``Content-Length`` (turned into a truncation error)."""


def describe(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """Return a short text for a cause, good for an error message, with secrets removed."""
    text = scrub(str(exc) or type(exc).__name__, secrets)
    return text if len(text) <= 300 else text[:297] + "..."


#: Where users name a CA bundle, in the order looked at: requests' two variables, then
#: OpenSSL's (which requests alone would ignore: it loads certifi's bundle instead).
CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")

# What OpenSSL (through Python's ssl or libcurl) says of a certificate it refuses, and
# the cause in plain words: the same on every backend, whatever the library's wording.
_TLS_CAUSES = (
    (("certificate has expired",), "the server's certificate has expired"),
    (("certificate is not yet valid",), "the server's certificate is not yet valid"),
    (
        ("hostname mismatch", "ip address mismatch", "subject name"),
        "the server's certificate is not valid for this host name (hostname mismatch)",
    ),
    (
        (
            "unable to get local issuer",
            "self-signed certificate",
            "self signed certificate",
            "unable to verify the first certificate",
            "unknown ca",
        ),
        (
            "the server's certificate is signed by an unknown CA (not in the CA bundle: "
            "set REQUESTS_CA_BUNDLE or SSL_CERT_FILE to trust another)"
        ),
    ),
)


def ca_bundle_from_env() -> str | None:
    """Return the CA bundle (a file, or a directory) that the environment names, if any.

    Looked up in :data:`CA_VARIABLES` order, the first one set and not empty wins; both
    backends verify against it (certifi's bundle when there is none).
    """
    for name in CA_VARIABLES:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _tls_cause(detail: str) -> str | None:
    lowered = detail.lower()
    for words, cause in _TLS_CAUSES:
        if any(word in lowered for word in words):
            return cause
    return None


def attempt_error(
    kind: Failure,
    shown: str,
    during: str,
    detail: str,
    guard: Guard | None,
    refusal: Refusal | None = None,
) -> FetchError:
    """Return the error for a failure below HTTP, worded the same for every backend.

    A fired ``guard`` wins over ``kind``: a socket shut down by the watchdog fails as a
    reset, but what the caller needs to hear is the deadline (or the cancel).

    Args:
        kind: what the backend saw.
        shown: the URL as messages show it.
        during: ``"requesting"`` or ``"while reading"``.
        detail: the backend's own text for the cause (secrets already removed).
        guard: the attempt's guard.
        refusal: for ``"blocked"``, what the SSRF guard refused (its host and address).
    """
    if guard is not None and guard.cancelled:
        return TransferError(f"download of {shown} cancelled", url=shown, cancelled=True)
    if guard is not None and guard.fired:
        return TransferError(
            f"{guard.limit} of {guard.seconds:.3g} s exceeded {during} {shown}", url=shown
        )
    if kind == "blocked":
        # Not a TransferError: nothing was sent, and another attempt resolves the same.
        return BlockedAddressError(
            f"connection refused by block_private {during} {shown}: {detail}",
            url=shown,
            host=refusal.host if refusal is not None else "",
            address=refusal.address if refusal is not None else "",
        )
    if kind == "invalid-url":
        return InvalidURL(f"invalid URL {shown}: {detail}", url=shown)
    if kind in ("tls", "tls-dropped"):
        # The connection dropping mid-handshake may heal; a refused certificate or a
        # protocol mismatch will not.
        cause = _tls_cause(detail) if kind == "tls" else None
        text = detail if cause is None else f"{cause}; {detail}"
        return TransferError(
            f"TLS error {during} {shown}: {text}", url=shown, retryable=kind == "tls-dropped"
        )
    if kind == "malformed":
        return TransferError(
            f"malformed response {during} {shown}: {detail}", url=shown, retryable=False
        )
    if kind == "timeout":
        return TransferError(f"timed out {during} {shown}: {detail}", url=shown)
    return TransferError(f"connection failed {during} {shown}: {detail}", url=shown)


def check_guard(guard: Guard | None, shown: str, during: str = "while reading") -> None:
    """Raise the deadline's (or the cancel's) error if ``guard`` has fired."""
    if guard is not None and guard.fired:
        raise attempt_error("timeout", shown, during, "stopped", guard)


def refused(refusal: Refusal, shown: str, during: str, guard: Guard | None) -> FetchError:
    """Return the error for a connection the SSRF guard refused (see :mod:`fetchpool.ssrf`)."""
    return attempt_error("blocked", shown, during, str(refusal), guard, refusal)


def open_transport(
    backend: str,
    workers: int,
    session_factory: Callable[[], object] | None = None,
    policy: AddressPolicy | None = None,
) -> Transport:
    """Return a new transport of the named backend, for a pool of ``workers`` threads.

    ``policy``, where not ``None``, is the SSRF guard every connection is checked by.

    Raises:
        ValueError: an unknown backend.
        ImportError: ``"curl"`` without pycurl (``pip install "fetchpool[curl]"``).
    """
    # Each backend's module is imported when it is first used: what it costs, it pays.
    if backend == "requests":
        from .requests import RequestsTransport  # noqa: PLC0415

        return RequestsTransport(workers, session_factory, policy)  # type: ignore[arg-type]
    if backend == "curl":
        try:
            from .curl import CurlTransport  # noqa: PLC0415
        except ImportError as exc:
            raise ImportError(
                f"backend='curl' needs pycurl: pip install \"fetchpool[curl]\" ({exc})"
            ) from exc
        return CurlTransport(workers, policy)
    raise ValueError(f"unknown backend {backend!r}")
