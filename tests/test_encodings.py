"""Bodies a server encodes although fetchpool asked for identity: br and zstd, as gzip.

Decoded as they stream (``max_bytes`` counts decoded bytes, so a bomb stops at the
limit), and ended cleanly (a cut compressed stream is a truncation), on both backends,
when the decoder is installed (``fetchpool[brotli]``, ``fetchpool[zstd]``, both in the
``test`` extra); without it, the clear error of an unsupported encoding.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import responses

import fetchpool.transfer
from _support import PNG, listing
from fetchpool import RetryPolicy, TooLargeError, TransferError, download_all
from fetchpool.testing import ImageServer

MiB = 1024 * 1024
B = "https://img.test"
ENCODINGS = ["br", "zstd"]
_counter = itertools.count()

pytestmark = pytest.mark.usefixtures("each_backend")


def uniq(stem: str) -> str:
    """A name no other test of this module uses (the server's state is per path)."""
    return f"{stem}{next(_counter)}.png"


def quick(attempts: int) -> RetryPolicy:
    """A retry policy with no backoff, so retries cost no wall-clock time."""
    return RetryPolicy(attempts=attempts, wait_initial=0, wait_max=0, jitter=0)


def need(encoding: str) -> str:
    """Skip the test when the decoder of ``encoding`` is not installed here."""
    module = (
        fetchpool.transfer.brotli_module() if encoding == "br" else fetchpool.transfer.zstd_module()
    )
    if module is None:
        extra = "brotli" if encoding == "br" else encoding
        pytest.skip(f"no {encoding} decoder installed (pip install 'fetchpool[{extra}]')")
    return encoding


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=1) as srv:
        yield srv
    assert srv.errors == []


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encoded_body_is_decoded(server: ImageServer, dest: Path, encoding: str) -> None:
    name = uniq(need(encoding))
    path = f"/{encoding}/{name}"
    (result,) = download_all([server.url(path)], dest)
    assert result.status == "downloaded", result.error
    assert result.path == dest / name
    data = result.path.read_bytes()
    assert data == server.expected(path)
    assert result.bytes == len(data)  # decoded bytes
    assert result.attempts == 1
    # fetchpool asked for identity; the server encoded anyway.
    headers = server.last_headers(path)
    assert headers is not None
    assert headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encoded_bomb_stops_at_max_bytes_in_bounded_memory(
    server: ImageServer, dest: Path, encoding: str
) -> None:
    # 64 MiB of zeros that compress to a few KiB: decoded whole, it would hold them all.
    url = server.url(f"/{need(encoding)}-bomb/{uniq('bomb')}?size={64 * MiB}")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        (result,) = download_all([url], dest, max_bytes=4 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result.error, TooLargeError), result.error
    assert result.attempts == 1
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB while decoding a {encoding} bomb"
    assert listing(dest) == []


@pytest.mark.parametrize("encoding", ["gzip", *ENCODINGS])
def test_cut_compressed_stream_is_a_truncated_body(
    server: ImageServer, dest: Path, waits: list[float], encoding: str
) -> None:
    # The framing ends cleanly (the Content-Length is the cut body's), the stream not.
    path = f"/{need(encoding) if encoding != 'gzip' else encoding}/{uniq('cut')}?cut=5"
    (result,) = download_all([server.url(path)], dest, retry=quick(2))
    assert isinstance(result.error, TransferError), result.error
    assert "truncated compressed body" in str(result.error)
    assert result.error.retryable
    assert result.attempts == 2
    assert listing(dest) == []


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_without_the_decoder_the_encoding_is_refused_clearly(
    server: ImageServer, dest: Path, monkeypatch: pytest.MonkeyPatch, encoding: str
) -> None:
    path = f"/{need(encoding)}/{uniq('absent')}"  # the server still encodes
    loader = "brotli_module" if encoding == "br" else "zstd_module"
    monkeypatch.setattr(fetchpool.transfer, loader, lambda: None)
    (result,) = download_all([server.url(path)], dest, retry=quick(3))
    assert isinstance(result.error, TransferError), result.error
    message = str(result.error)
    assert f"unsupported Content-Encoding {encoding!r}" in message
    assert f'pip install "fetchpool[{encoding if encoding == "zstd" else "brotli"}]"' in message
    assert result.error.retryable is False
    assert result.attempts == 1
    assert listing(dest) == []


def encode(encoding: str, data: bytes) -> bytes:
    """``data`` compressed as one ``encoding`` stream (the decoder's module encodes)."""
    if encoding == "br":
        module = fetchpool.transfer.brotli_module()
        assert module is not None
        return bytes(module.compress(data))
    module = fetchpool.transfer.zstd_module()
    assert module is not None
    return bytes(module.compress(data))


@pytest.mark.requests_only
def test_concatenated_zstd_frames_are_one_body(
    rs: responses.RequestsMock, dest: Path, waits: list[float]
) -> None:
    need("zstd")
    halves = PNG[:1000], PNG[1000:]
    body = b"".join(encode("zstd", half) for half in halves)
    rs.get(f"{B}/frames.png", body=body, headers={"Content-Encoding": "zstd"})
    (result,) = download_all([f"{B}/frames.png"], dest)
    assert result.ok, result.error
    assert (dest / "frames.png").read_bytes() == PNG


@pytest.mark.requests_only
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("fault", ["trailing-junk", "garbage"])
def test_corrupt_encoded_body_is_a_transfer_error(
    rs: responses.RequestsMock, dest: Path, waits: list[float], encoding: str, fault: str
) -> None:
    need(encoding)
    body = encode(encoding, PNG) + b"junk" if fault == "trailing-junk" else b"\x89not encoded"
    rs.get(f"{B}/bad.png", body=body, headers={"Content-Encoding": encoding})
    (result,) = download_all([f"{B}/bad.png"], dest, retry=1)
    assert isinstance(result.error, TransferError), result.error
    assert "corrupt compressed body" in str(result.error)
    assert listing(dest) == []
