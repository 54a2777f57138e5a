"""Image sniffing from the first bytes."""

from __future__ import annotations

import pytest

from fetchpool.sniff import sniff_image


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\x89PNG\r\n\x1a\n....", "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"GIF89a\x01\x00", "gif"),
        (b"GIF87a\x01\x00", "gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"BM" + b"\x36\x00\x0c\x00" + b"\x00" * 4 + b"\x36" + b"\x00" * 20, "bmp"),
        (b"II*\x00\x08\x00", "tiff"),
        (b"MM\x00*\x00\x00", "tiff"),
        (b"\x00\x00\x01\x00\x01\x00", "ico"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00", "heif"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00", "heif"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "svg"),
        (b'\xef\xbb\xbf<?xml version="1.0"?>\n<!-- x -->\n<!DOCTYPE svg>\n<svg>', "svg"),
    ],
)
def test_images_recognised(head: bytes, kind: str) -> None:
    assert sniff_image(head) == kind


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"<!DOCTYPE html><html><body>not found</body></html>",
        b"<html><svg></svg></html>",
        b'{"error": "nope"}',
        b"BMP is a format",
        b"RIFF\x24\x00\x00\x00WAVEfmt ",
        b"\x00\x00\x00\x18ftypisom",
        b"PK\x03\x04",
    ],
)
def test_non_images_refused(head: bytes) -> None:
    assert sniff_image(head) is None
