"""Local file names: safe, deterministic and collision-free (DESIGN rule 3).

Names come from the caller's URL (never from a redirect's ``Location``); a
``Content-Disposition`` name is used only when the caller opts in. Every name is
percent-decoded and sanitised here; the decision which URL owns a name is the
:class:`~fetchpool.downloader.Downloader`'s.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Mapping
from email.message import Message
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit, urlunsplit

from .errors import InvalidURL, UnsafeFilenameError

__all__ = [
    "PARTIAL_SUFFIX",
    "RESERVED_PREFIX",
    "check_relative_filename",
    "derived_name",
    "is_sensitive_header",
    "name_from_content_disposition",
    "name_from_url",
    "origin_url",
    "redact_url",
    "sanitize",
    "scrub",
    "secrets_of",
    "shown_input",
    "split_userinfo",
    "validate_url",
]

#: Temporary and lock files start with this; no name handed out may.
RESERVED_PREFIX = ".fetchpool-"
#: A partial file (``resume=True``) is ``.<name>`` and this: no name handed out is one.
#: (Names from URLs never start with a dot.)
PARTIAL_SUFFIX = ".fetchpool-partial"

# Leaves room for the "-<hash>" of a derived name inside the usual 255-byte limit.
_MAX_NAME_BYTES = 200
_MAX_EXT_CHARS = 16
_HASH_CHARS = 10
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x1f\x7f-\x9f\s]")
#: An http(s) URL that :func:`validate_url` accepts with no further look: lower-case
#: scheme, a plain host (no user-info, no brackets), digits for a port, printable ASCII.
#: Its groups: the port, and the path (as ``urlsplit`` would give it: up to ``?`` or ``#``).
_PLAIN_HTTP_URL = re.compile(
    r"https?://[A-Za-z0-9.\-]+(?::([0-9]{1,5}))?"
    r"(/[\x21\x22\x24-\x3e\x40-\x7e]*)?(?:[?#][\x21-\x7e]*)?"
)
#: A name that :func:`sanitize` leaves as it is (but for the reserved names and length):
#: ASCII word characters, ``-``, ``~`` and ``+``, single dots inside only.
_PLAIN_NAME = re.compile(r"[\w\-~+]+(?:\.[\w\-~+]+)*", re.ASCII)
_DOTS = re.compile(r"\.{2,}")
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)


def validate_url(url: object) -> str:
    """Check that ``url`` is an absolute http(s) URL and return it unchanged.

    Raises:
        InvalidURL: not a string, not http/https, no host, a bad port, or control
            characters or whitespace inside it.
    """
    if not isinstance(url, str):
        raise InvalidURL(f"not a URL string: {type(url).__name__}", url=repr(url)[:200])
    plain = _PLAIN_HTTP_URL.fullmatch(url)
    if plain is not None and 0 < int(plain.group(1) or 80) <= 65535:
        # The usual shape, which all the checks below would pass, known in one match.
        return url
    shown = redact_url(url)
    if _CONTROL_OR_SPACE.search(url):
        raise InvalidURL(f"URL contains whitespace or control characters: {shown!r}", url=shown)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"malformed URL {shown!r}: {exc}", url=shown) from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidURL(f"not an http(s) URL: {shown!r}", url=shown)
    if not parts.hostname:
        raise InvalidURL(f"URL has no host: {shown!r}", url=shown)
    if port == 0:
        raise InvalidURL(f"URL has port 0: {shown!r}", url=shown)
    return url


def shown_input(url: object) -> str:
    """How an input item appears in results and events: itself, or its ``repr``."""
    return url if isinstance(url, str) else repr(url)


def redact_url(url: str) -> str:
    """Return ``url`` without user-info (``user:pass@``), for messages and logs."""
    if "@" not in url:
        return url  # no user-info anywhere: the common case, without parsing
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//", url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


_SENSITIVE_HEADER = re.compile(r"auth|cookie|token|secret|key|session|passw", re.IGNORECASE)


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """Return ``url`` without user-info and the decoded ``(user, password)``, if any."""
    clean = redact_url(url)
    if clean == url:
        return url, None
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    return clean, (unquote(user), unquote(password))


def is_sensitive_header(name: str) -> bool:
    """Whether a header's value is a secret (``Authorization``, ``Cookie``, ``X-Api-Key``...)."""
    return bool(_SENSITIVE_HEADER.search(name))


def secrets_of(url: str, headers: Mapping[str, str]) -> tuple[str, ...]:
    """Return the strings that must never appear in a message about ``url``.

    They are the URL's user-info and the values of sensitive-looking headers
    (``Authorization``, ``Cookie``, anything named like a token, key or secret).
    """
    found: list[str] = []
    _, creds = split_userinfo(url)
    if creds is not None:
        userinfo = urlsplit(url).netloc.rpartition("@")[0]
        found += [userinfo, creds[1], userinfo.partition(":")[2]]
    for name, value in headers.items():
        if is_sensitive_header(name):
            found.append(value)
            found += value.split()
    return tuple(sorted({s for s in found if len(s) >= 4}, key=len, reverse=True))


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Return ``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def origin_url(url: str) -> str:
    """Return the URL recorded as a file's origin: user-info and fragment removed."""
    if "@" not in url and "#" not in url:
        return url
    parts = urlsplit(redact_url(url))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))


def url_hash(url: str) -> str:
    """Return a short stable hash of ``url`` (hex), used to derive unique names."""
    return hashlib.sha256(origin_url(url).encode("utf-8", "surrogatepass")).hexdigest()[
        :_HASH_CHARS
    ]


def sanitize(name: str) -> str:
    """Make one path component safe to create; return ``""`` if nothing usable is left.

    Separators (``/``, ``\\``) become ``_``; control characters are dropped; leading
    dots and surrounding spaces are stripped and runs of dots collapse (so no ``..``,
    no hidden or reserved names); the result is bounded to 200 UTF-8 bytes, keeping the extension.
    """
    if _PLAIN_NAME.fullmatch(name) and len(name) < _MAX_NAME_BYTES:
        # Nearly every name: nothing below would change it but a reserved stem (the
        # "_" then fits in the bound).
        return "_" + name if name.partition(".")[0].upper() in _WINDOWS_RESERVED else name
    name = unicodedata.normalize("NFC", name)
    name = name.replace("/", "_").replace("\\", "_")
    name = _CONTROL.sub("", name)
    name = _DOTS.sub(".", name)
    name = name.strip().lstrip(".").rstrip(". ")
    if not name:
        return ""
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        name = "_" + name
    return _bound(name, _MAX_NAME_BYTES)


def _split_ext(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    if dot and stem and 0 < len(ext) <= _MAX_EXT_CHARS and "." not in ext:
        return stem, "." + ext
    return name, ""


def _bound(name: str, limit: int) -> str:
    if len(name.encode("utf-8", "surrogatepass")) <= limit:
        return name
    stem, ext = _split_ext(name)
    room = limit - len(ext.encode("utf-8", "surrogatepass"))
    raw = stem.encode("utf-8", "surrogatepass")[:room]
    # Cutting bytes may split a character: drop the broken tail.
    return raw.decode("utf-8", "ignore").rstrip(". ") + ext


def name_from_url(url: str) -> str:
    """Return the local name for ``url``: its last path segment, decoded and sanitised.

    A URL with no usable last segment (``http://host/``, ``/%2e%2e/``) gets the stable
    derived name ``download-<hash>``.
    """
    plain = _PLAIN_HTTP_URL.fullmatch(url)
    path = (plain.group(2) or "") if plain is not None else urlsplit(url).path
    segment = path.rsplit("/", 1)[-1]
    name = sanitize(unquote(segment, errors="replace"))
    return name or f"download-{url_hash(url)}"


def derived_name(name: str, url: str) -> str:
    """Return ``name`` made unique to ``url``: ``<stem>-<hash of url><ext>``."""
    stem, ext = _split_ext(name)
    return f"{stem}-{url_hash(url)}{ext}"


def name_from_content_disposition(header: str | None) -> str | None:
    """Return the sanitised filename of a ``Content-Disposition`` header, if it has one."""
    if not header:
        return None
    msg = Message()
    msg["content-disposition"] = header
    try:
        raw = msg.get_filename()
    except (ValueError, LookupError):
        return None
    if not raw:
        return None
    # A server may send a path; only its last component can name the file.
    raw = raw.replace("\\", "/").rsplit("/", 1)[-1]
    return sanitize(raw) or None


def check_relative_filename(filename: str | os.PathLike[str], url: str = "") -> PurePosixPath:
    """Validate a caller-given filename and return it as a normalised relative path.

    The caller owns the name, so it is not rewritten, only refused when unsafe.

    Raises:
        UnsafeFilenameError: empty, absolute, contains ``..``, a backslash, a control
            character, a component over 255 bytes, or a reserved ``.fetchpool-`` name.
        TypeError: ``filename`` is not a ``str`` or ``os.PathLike[str]``.
    """
    raw = os.fspath(filename)
    if not isinstance(raw, str):
        raise TypeError(f"filename must be str or os.PathLike[str], not {type(raw).__name__}")
    shown = redact_url(url)

    def unsafe(why: str) -> UnsafeFilenameError:
        return UnsafeFilenameError(f"unsafe filename {raw!r} for {shown}: {why}", url=shown)

    if not raw or raw.endswith("/"):
        raise unsafe("no file name")
    if _CONTROL.search(raw):
        raise unsafe("control character")
    if "\\" in raw:
        raise unsafe("backslash")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise unsafe("absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not parts:
        raise unsafe("no file name")
    if ".." in parts:
        raise unsafe("'..' escapes the destination")
    if any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts):
        raise unsafe("a path component is longer than 255 bytes")
    if any(p.startswith(RESERVED_PREFIX) for p in parts):
        raise unsafe(f"names starting with {RESERVED_PREFIX!r} are reserved")
    if parts[-1].startswith(".") and parts[-1].endswith(PARTIAL_SUFFIX):
        # Another file's partial file (resume=True) has that name.
        raise unsafe(f"hidden names ending with {PARTIAL_SUFFIX!r} are reserved")
    return PurePosixPath(*parts)
