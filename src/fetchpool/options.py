"""The keyword options shared by ``download_all`` and ``Downloader``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Literal, TypedDict

import requests

from .results import ProgressEvent
from .retry import MAX_SECONDS, RetryPolicy
from .ssrf import ALLOW_PROXY, AllowEntry, BlockPrivate, parse_allow_hosts

__all__ = [
    "BACKENDS",
    "DEFAULT_MAX_BYTES",
    "OPTION_NAMES",
    "DownloadOptions",
    "FrozenHeaders",
    "Options",
    "make_options",
]

#: The default ``max_bytes``: 2 GiB.
DEFAULT_MAX_BYTES = 2 * 1024**3

Overwrite = Literal["skip", "replace", "error"]
Verify = Literal["image"]
ProgressCallback = Callable[[ProgressEvent], object]
SessionFactory = Callable[[], requests.Session]
Timeout = float | tuple[float, float]
Backend = Literal["requests", "curl"]
#: The transfer backends ``backend=`` accepts.
BACKENDS: tuple[Backend, ...] = ("requests", "curl")


class DownloadOptions(TypedDict, total=False):
    """The options of :func:`~fetchpool.download_all`, for type checkers."""

    retry: RetryPolicy | int
    timeout: Timeout
    deadline: float
    max_bytes: int | None
    overwrite: Overwrite
    content_disposition: bool
    allow_downgrade: bool
    fsync: bool
    verify: Verify | None
    headers: Mapping[str, str] | None
    session_factory: SessionFactory | None
    progress: bool | ProgressCallback | None
    backend: Backend
    per_host: int | None
    rate: float | None
    resume: bool
    block_private: BlockPrivate
    allow_hosts: Iterable[str | IPv4Address | IPv6Address | IPv4Network | IPv6Network]


_DEFAULT_RETRY = RetryPolicy()


class FrozenHeaders(Mapping[str, str]):
    """The request headers of validated options: read-only, and they pickle.

    A ``MappingProxyType`` would be read-only too, but does not pickle, and options
    cross process boundaries (``fetchpool.dask`` ships them to its workers).

    Args:
        pairs: the headers, as a mapping or ``(name, value)`` pairs.
    """

    __slots__ = ("_map",)

    def __init__(self, pairs: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._map: dict[str, str] = dict(pairs)

    def __getitem__(self, key: str) -> str:
        return self._map[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __hash__(self) -> int:
        return hash(frozenset(self._map.items()))

    def __repr__(self) -> str:
        # Names only: header values may be secrets (DESIGN rule 9), and reprs reach logs.
        return f"FrozenHeaders({sorted(self._map)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenHeaders, (tuple(self._map.items()),))


@dataclass(frozen=True)
class Options:
    """Validated options (internal); the defaults here are the documented ones."""

    retry: RetryPolicy = _DEFAULT_RETRY
    timeout: tuple[float, float] = (10.0, 30.0)
    deadline: float = 300.0
    max_bytes: int | None = DEFAULT_MAX_BYTES
    overwrite: Overwrite = "skip"
    content_disposition: bool = False
    allow_downgrade: bool = False
    fsync: bool = False
    verify: Verify | None = "image"
    headers: Mapping[str, str] = field(default_factory=FrozenHeaders)
    session_factory: SessionFactory | None = None
    progress: bool | ProgressCallback | None = None
    backend: Backend = "requests"
    per_host: int | None = None
    rate: float | None = None
    resume: bool = False
    block_private: BlockPrivate = False
    allow_hosts: tuple[AllowEntry, ...] = ()

    @property
    def host_limits(self) -> bool:
        """Whether per-host limits are on (``per_host`` or ``rate``)."""
        return self.per_host is not None or self.rate is not None


#: The option names, in the order the docs list them.
OPTION_NAMES = tuple(f.name for f in fields(Options))


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise ValueError(f"{name} must be > 0 and at most {MAX_SECONDS:g} s, not {value!r}")
    return float(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def make_options(given: Mapping[str, Any]) -> Options:
    """Validate the keyword options a caller passed, and fill in the defaults.

    Raises:
        TypeError: an unknown option, or an option of the wrong type.
        ValueError: an option with a value outside its range.
    """
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"Downloader() got an unexpected keyword argument {unknown[0]!r}")
    raw = {**{f.name: getattr(_DEFAULTS, f.name) for f in fields(Options)}, **given}
    timeout = raw["timeout"]
    if isinstance(timeout, tuple):
        if len(timeout) != 2:
            raise ValueError(f"timeout must be (connect, read), not {timeout!r}")
        pair = (_positive("timeout[0]", timeout[0]), _positive("timeout[1]", timeout[1]))
    else:
        one = _positive("timeout", timeout)
        pair = (one, one)
    max_bytes = raw["max_bytes"]
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
            raise TypeError(f"max_bytes must be an int or None, not {type(max_bytes).__name__}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
    overwrite = raw["overwrite"]
    if overwrite not in ("skip", "replace", "error"):
        raise ValueError(f"overwrite must be 'skip', 'replace' or 'error', not {overwrite!r}")
    verify = raw["verify"]
    if verify not in ("image", None):
        raise ValueError(f"verify must be 'image' or None, not {verify!r}")
    clean_headers: dict[str, str] = {}
    for key, value in (raw["headers"] or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("headers must map str to str")
        if any(c in key + value for c in "\r\n\0"):
            raise ValueError(f"header {key!r} contains a line break or NUL")
        clean_headers[key] = value
    session_factory = raw["session_factory"]
    if session_factory is not None and not callable(session_factory):
        raise TypeError("session_factory must be a callable returning a requests.Session")
    progress = raw["progress"]
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise TypeError("progress must be True, False, None or a callable")
    backend = raw["backend"]
    if backend not in BACKENDS:
        names = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"backend must be one of {names}, not {backend!r}")
    if backend != "requests" and session_factory is not None:
        raise TypeError(f"session_factory needs backend='requests', not {backend!r}")
    per_host = raw["per_host"]
    if per_host is not None:
        if isinstance(per_host, bool) or not isinstance(per_host, int):
            raise TypeError(f"per_host must be an int or None, not {type(per_host).__name__}")
        if per_host < 1:
            raise ValueError(f"per_host must be at least 1, not {per_host}")
    rate = raw["rate"]
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise TypeError(f"rate must be a number or None, not {type(rate).__name__}")
        if not math.isfinite(rate) or not 0 < rate <= 1e6:
            raise ValueError(f"rate must be > 0 and at most 1e6 requests per second, not {rate!r}")
        rate = float(rate)
    block_private = raw["block_private"]
    if not isinstance(block_private, bool) and block_private != ALLOW_PROXY:
        kind = ValueError if isinstance(block_private, str) else TypeError
        raise kind(f"block_private must be True, False or '{ALLOW_PROXY}', not {block_private!r}")
    allow_hosts = parse_allow_hosts(raw["allow_hosts"])
    if allow_hosts and not block_private:
        # Most likely a guard the caller thinks is on: say so rather than ignore it.
        raise ValueError("allow_hosts has no effect without block_private=True")
    return Options(
        retry=RetryPolicy.coerce(raw["retry"]),
        timeout=pair,
        deadline=_positive("deadline", raw["deadline"]),
        max_bytes=max_bytes,
        overwrite=overwrite,
        content_disposition=_flag("content_disposition", raw["content_disposition"]),
        allow_downgrade=_flag("allow_downgrade", raw["allow_downgrade"]),
        fsync=_flag("fsync", raw["fsync"]),
        verify=verify,
        headers=FrozenHeaders(clean_headers),
        session_factory=session_factory,
        progress=progress,
        backend=backend,
        per_host=per_host,
        rate=rate,
        resume=_flag("resume", raw["resume"]),
        block_private=block_private,
        allow_hosts=allow_hosts,
    )


_DEFAULTS = Options()
