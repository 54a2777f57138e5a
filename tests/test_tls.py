"""TLS for real, on both backends: a loopback server with ``trustme`` certificates.

A CA given the way users give it (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` or
OpenSSL's ``SSL_CERT_FILE``) is trusted by both backends alike; a certificate for
another host, an expired one and one from an unknown CA each fail at once, tried once,
with a message that names the cause; an https to http redirect is refused over real
TLS unless ``allow_downgrade``.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme

from _h2server import H2ImageServer
from _support import listing
from fetchpool import RedirectError, RetryPolicy, TransferError, download_all
from fetchpool.backends import CA_VARIABLES
from fetchpool.options import Backend
from fetchpool.testing import ImageServer

BACKENDS: list[Backend] = ["requests", "curl"]
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_PAST = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)

#: What the message must say for each refused certificate, on every backend.
CAUSES = {
    "wrong-host": "hostname mismatch",
    "expired": "certificate has expired",
    "unknown-ca": "unknown CA",
}


def need(backend: Backend) -> Backend:
    """Skip the test when ``backend`` cannot be imported here."""
    if backend == "curl":
        pytest.importorskip("pycurl")
    return backend


def check_trusted(server: H2ImageServer, dest: Path, backend: Backend) -> None:
    """An image from ``server`` downloads on ``backend``, at the first attempt."""
    (result,) = download_all([server.image_url("a")], dest, backend=need(backend))
    assert result.ok, result.error
    assert result.attempts == 1
    assert result.path is not None
    assert result.path.read_bytes() == server.expected("a")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CA bundle named and no proxy: each test sets what it means."""
    for name in (*CA_VARIABLES, *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def good() -> Iterator[H2ImageServer]:
    with H2ImageServer() as server:
        yield server


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The PEM file of a CA that signed none of the servers' certificates."""
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module", params=sorted(CAUSES))
def refused(request: pytest.FixtureRequest, other_ca: str) -> Iterator[tuple[str, H2ImageServer]]:
    """A server whose certificate a client must refuse, and why."""
    case: str = request.param
    if case == "wrong-host":
        server = H2ImageServer(hosts=("img.example.org",))
    elif case == "expired":
        server = H2ImageServer(not_before=_PAST, not_after=_PAST + datetime.timedelta(days=1))
    else:
        server = H2ImageServer()
    with server:
        yield case, server


@pytest.fixture(scope="module")
def plain() -> Iterator[ImageServer]:
    with ImageServer(n_images=1) as server:
        yield server


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ca_named_in_the_environment_is_trusted(
    good: H2ImageServer,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, good.ca_file)
    check_trusted(good, dest, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ca_directory_named_by_ssl_cert_dir_is_trusted(
    good: H2ImageServer,
    dest: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
) -> None:
    # OpenSSL finds a CA in a directory by the hash of its subject: <hash>.0.
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to name the CA file by its subject hash")
    subject_hash = subprocess.run(
        [openssl, "x509", "-subject_hash", "-noout", "-in", good.ca_file],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(good.ca_file, certs / f"{subject_hash}.0")
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    check_trusted(good, dest, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_requests_variables_come_before_openssl_ones_on_both_backends(
    good: H2ImageServer,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    other_ca: str,
    backend: Backend,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", good.ca_file)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", other_ca)
    (result,) = download_all([good.image_url("b")], dest, backend=need(backend))
    assert isinstance(result.error, TransferError), result
    assert CAUSES["unknown-ca"] in str(result.error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_certificate_fails_at_once_and_names_the_cause(
    refused: tuple[str, H2ImageServer],
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    other_ca: str,
    waits: list[float],
    backend: Backend,
) -> None:
    case, server = refused
    # The unknown CA's server is checked against another CA; the others against theirs.
    monkeypatch.setenv("SSL_CERT_FILE", other_ca if case == "unknown-ca" else server.ca_file)
    server.reset()
    url = server.image_url("c")
    (result,) = download_all([url], dest, backend=need(backend), retry=RetryPolicy(attempts=3))
    assert result.status == "failed"
    assert isinstance(result.error, TransferError), result.error
    message = str(result.error)
    assert message.startswith(f"TLS error requesting {url}: "), message
    assert CAUSES[case] in message
    assert "Max retries" not in message  # urllib3's wrapper, though nothing was retried
    assert result.error.retryable is False
    assert result.attempts == 1
    assert waits == []
    assert server.paths == []
    assert listing(dest) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_https_to_http_redirect_over_tls_needs_allow_downgrade(
    good: H2ImageServer,
    plain: ImageServer,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", good.ca_file)
    target = plain.url(f"/any/{backend}.png")
    url = good.url("/redirect-to?location=" + quote(target, safe=""))
    plain.reset_hits()
    (refused,) = download_all([url], dest, backend=need(backend))
    assert isinstance(refused.error, RedirectError), refused
    assert "https to http" in str(refused.error)
    assert plain.hits(f"/any/{backend}.png") == 0
    assert listing(dest) == []
    (allowed,) = download_all([url], dest, backend=backend, allow_downgrade=True)
    assert allowed.ok, allowed.error
    assert allowed.path is not None
    assert allowed.path.read_bytes() == plain.expected(target)
    assert plain.hits(f"/any/{backend}.png") == 1
