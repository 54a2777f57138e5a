"""Both backends against a real TLS server (hypercorn) that offers HTTP/2 and HTTP/1.1.

The curl backend must multiplex many transfers to one host over one HTTP/2
connection; the requests backend speaks HTTP/1.1 over TLS. On both, an untrusted
certificate fails once and for good, and an https to http redirect is refused.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from _h2server import H2ImageServer, big_body
from fetchpool import RedirectError, TransferError, download_all
from fetchpool.options import Backend

BACKENDS: list[Backend] = ["requests", "curl"]
N_IMAGES = 40
# Environment variables that could point a TLS client at some CA bundle.
CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(scope="module")
def h2_server() -> Iterator[H2ImageServer]:
    with H2ImageServer() as server:
        yield server


@pytest.fixture
def server(h2_server: H2ImageServer, monkeypatch: pytest.MonkeyPatch) -> H2ImageServer:
    """The module's server with fresh counters, reached directly (no proxy)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    h2_server.reset()
    return h2_server


@pytest.fixture
def trusted(server: H2ImageServer, monkeypatch: pytest.MonkeyPatch) -> H2ImageServer:
    """The server, its CA trusted through ``REQUESTS_CA_BUNDLE`` alone."""
    for name in CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", server.ca_file)
    return server


@pytest.fixture
def untrusted(server: H2ImageServer, monkeypatch: pytest.MonkeyPatch) -> H2ImageServer:
    """The server, its CA in no bundle a client is told about."""
    for name in CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return server


def need(backend: Backend) -> Backend:
    """Skip the test when ``backend`` cannot be imported here."""
    if backend == "curl":
        pytest.importorskip("pycurl")
    return backend


def image_names() -> list[str]:
    return [f"{i:04d}" for i in range(N_IMAGES)]


def check_downloads(server: H2ImageServer, dest: Path, backend: Backend) -> None:
    names = image_names()
    results = download_all([server.image_url(n) for n in names], dest, workers=8, backend=backend)
    assert [r.status for r in results] == ["downloaded"] * N_IMAGES, results.failed
    for name, result in zip(names, results, strict=True):
        assert result.path is not None
        assert result.path.read_bytes() == server.expected(name)
        assert result.content_type == "image/png"
        assert result.attempts == 1
    assert sorted(server.paths) == sorted(f"/img/{n}.png" for n in names)
    assert server.errors == []


# -- the server itself ----------------------------------------------------------------


def test_server_offers_http11_to_requests(trusted: H2ImageServer) -> None:
    with requests.Session() as session:
        for name in ("a", "b", "c"):
            reply = session.get(trusted.image_url(name), timeout=5)
            assert reply.status_code == 200
            assert reply.headers["Content-Type"] == "image/png"
            assert reply.headers["Content-Length"] == str(len(trusted.expected(name)))
            assert reply.content == trusted.expected(name)
        assert session.get(trusted.url("/nothing/here"), timeout=5).status_code == 404
    assert trusted.http_versions == ["1.1"] * 4
    assert trusted.connections == len(trusted.clients) == 1


def test_server_offers_h2_to_bare_pycurl(trusted: H2ImageServer) -> None:
    pycurl = pytest.importorskip("pycurl")
    curl = pycurl.Curl()
    try:
        for name in ("a", "b", "c"):
            body = io.BytesIO()
            curl.setopt(pycurl.URL, trusted.image_url(name))
            curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS)
            curl.setopt(pycurl.CAINFO, trusted.ca_file)
            curl.setopt(pycurl.WRITEDATA, body)
            curl.perform()
            assert curl.getinfo(pycurl.RESPONSE_CODE) == 200
            assert curl.getinfo(pycurl.INFO_HTTP_VERSION) == pycurl.CURL_HTTP_VERSION_2_0
            assert body.getvalue() == trusted.expected(name)
    finally:
        curl.close()
    assert trusted.http_versions == ["2"] * 3
    assert trusted.connections == len(trusted.clients) == 1


# -- downloads ------------------------------------------------------------------------


def test_curl_multiplexes_every_download_over_one_h2_connection(
    trusted: H2ImageServer, dest: Path
) -> None:
    check_downloads(trusted, dest, need("curl"))
    assert trusted.http_versions == ["2"] * N_IMAGES
    assert trusted.connections == 1
    assert len(trusted.clients) == 1


def test_requests_downloads_over_tls_with_http11(trusted: H2ImageServer, dest: Path) -> None:
    check_downloads(trusted, dest, need("requests"))
    assert trusted.http_versions == ["1.1"] * N_IMAGES
    # A pool of keep-alive connections, at most one per worker.
    assert 1 <= trusted.connections <= 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_download_all_closes_its_connections(
    trusted: H2ImageServer, dest: Path, backend: Backend
) -> None:
    urls = [trusted.image_url(n) for n in image_names()[:10]]
    results = download_all(urls, dest, workers=4, backend=need(backend))
    assert all(r.ok for r in results), results.failed
    assert trusted.connections >= 1
    # The server closes its side as soon as it reads the client's close.
    deadline = time.monotonic() + 2.0
    while trusted.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert trusted.open_connections == 0


# -- failures -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_untrusted_certificate_fails_once_with_a_tls_error(
    untrusted: H2ImageServer, dest: Path, backend: Backend, waits: list[float]
) -> None:
    (result,) = download_all([untrusted.image_url("x")], dest, backend=need(backend))
    assert result.status == "failed"
    assert isinstance(result.error, TransferError), result.error
    assert "TLS error" in str(result.error)
    assert result.error.retryable is False
    assert result.attempts == 1
    assert waits == []
    assert untrusted.connections == 1
    assert untrusted.paths == []
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_https_to_http_redirect_is_refused(
    trusted: H2ImageServer, dest: Path, backend: Backend
) -> None:
    (result,) = download_all([trusted.url("/redirect-http/x")], dest, backend=need(backend))
    assert result.status == "failed"
    assert isinstance(result.error, RedirectError), result.error
    assert trusted.paths == ["/redirect-http/x"]
    assert list(dest.iterdir()) == []


def test_big_bodies_multiplexed_are_byte_exact(trusted: H2ImageServer, dest: Path) -> None:
    # Big bodies on HTTP/2 go through the curl backend's pausing buffer and its sink mode
    # (the loop writes them to the file), several streams at once on one connection.
    need("curl")
    sizes = [3 * 1024 * 1024 + 17, 5 * 1024 * 1024, 2 * 1024 * 1024 + 1]
    urls = [trusted.url(f"/big/{size}.png") for size in sizes]
    results = download_all(urls, dest, workers=3, backend="curl")
    for size, result in zip(sizes, results, strict=True):
        assert result.ok, result.error
        assert result.path is not None
        assert result.path.read_bytes() == big_body(size)
    assert trusted.connections == 1
    assert set(trusted.http_versions) == {"2"}
