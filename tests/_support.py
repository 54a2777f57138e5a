"""Constants and helpers shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

#: A small but valid-looking PNG body (the sniffer only needs the signature).
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 20 + b"\xff\xd9"
HTML = b"<!DOCTYPE html><html><body>Not the image you want</body></html>"


def listing(directory: Path) -> list[str]:
    """Every entry below ``directory``, relative, sorted (to spot litter)."""
    return sorted(
        os.path.relpath(os.path.join(root, name), directory)
        for root, dirs, files in os.walk(directory)
        for name in dirs + files
    )
