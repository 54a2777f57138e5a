"""The input items: :class:`Item`, a URL with what its file must be, accepted where URLs are."""

from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass

from .checksums import Expected, check_hex, check_size
from .naming import redact_url

__all__ = ["Item", "expected_of"]


@dataclass(frozen=True, repr=False)
class Item:
    """A URL to download, with an optional file name and what the file must be.

    Accepted wherever a URL string is (``download_all``, ``Downloader.map`` and
    ``Downloader.submit``), mixed with strings. A body whose size or hash differs is a
    failed result with :class:`~fetchpool.ChecksumError` (after retries: a corrupted
    transfer can heal), and never reaches the final name. With ``overwrite="skip"`` a
    file already there is kept only if it matches; otherwise it is downloaded again.

    Args:
        url: the URL, kept as given (one that is not an http(s) URL becomes a failed
            :class:`~fetchpool.InvalidURL` result, as a plain string would).
        filename: a path relative to ``dest`` to save to, instead of the URL's name.
        sha256: the expected SHA-256, 64 hex digits (any case; kept lower-case).
        md5: the expected MD5, 32 hex digits, for catalogues that only have that.
        size: the expected size in bytes; a ``Content-Length`` that says otherwise
            fails before the body is read, and a body is stopped as soon as it is longer.

    Raises:
        TypeError: ``filename`` is not a str or path, a hash not a str, ``size`` not
            an int.
        ValueError: a hash that is not hex of the right length, or a negative ``size``.
    """

    url: str
    filename: str | os.PathLike[str] | None = None
    _: KW_ONLY
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if self.filename is not None and not isinstance(self.filename, str | os.PathLike):
            raise TypeError(
                f"filename must be str or os.PathLike, not {type(self.filename).__name__}"
            )
        # Frozen: normalised values are set the way dataclasses set fields themselves.
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", check_hex("sha256", self.sha256))
        if self.md5 is not None:
            object.__setattr__(self, "md5", check_hex("md5", self.md5))
        if self.size is not None:
            check_size(self.size)

    def __repr__(self) -> str:
        # Reprs end up in logs: the URL without its user-info (DESIGN rule 9).
        url = redact_url(self.url) if isinstance(self.url, str) else self.url
        parts = [f"url={url!r}"]
        for name in ("filename", "sha256", "md5", "size"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        return f"Item({', '.join(parts)})"


def expected_of(item: Item) -> Expected | None:
    """Return what ``item`` expects of its file, ``None`` when it expects nothing."""
    return Expected.of(item.sha256, item.md5, item.size)
