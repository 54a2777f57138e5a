"""Image signatures: decide from a body's first bytes whether it is an image."""

from __future__ import annotations

import re

__all__ = ["SNIFF_BYTES", "sniff_image"]

#: How many leading bytes :func:`sniff_image` wants (fewer is fine at end of body).
SNIFF_BYTES = 4096

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"\x00\x00\x02\x00", "ico"),
    (b"\xff\x0a", "jxl"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jxl"),
)
# The signatures above by their first byte: one lookup finds the one or two to try.
_BY_FIRST: dict[bytes, tuple[tuple[bytes, str], ...]] = {}
for _magic, _kind in _MAGIC:
    _BY_FIRST[_magic[:1]] = (*_BY_FIRST.get(_magic[:1], ()), (_magic, _kind))
del _magic, _kind
_HEIF_BRANDS = frozenset(
    {b"avif", b"avis", b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
)
# Optional BOM, XML declaration, comments and a doctype may precede the <svg> element.
_SVG = re.compile(
    rb"^(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*|<!DOCTYPE[^>]*>\s*)*<svg[\s>/]",
    re.IGNORECASE | re.DOTALL,
)


def sniff_image(head: bytes) -> str | None:
    """Return the image format that ``head`` starts with, or ``None``.

    Recognises PNG, JPEG, GIF, WebP, BMP, TIFF, ICO/CUR, AVIF/HEIC, JPEG XL and SVG.

    Args:
        head: the first bytes of the body (:data:`SNIFF_BYTES` of them, or the whole
            body if it is shorter).
    """
    for magic, kind in _BY_FIRST.get(head[:1], ()):
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 26 and head[6:10] == b"\x00\x00\x00\x00":
        return "bmp"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "heif"
    if _SVG.match(head):
        return "svg"
    return None
