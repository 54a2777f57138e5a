"""The ``backend`` option: its validation, and what each backend needs to be there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from fetchpool import Downloader, download_all
from fetchpool.testing import ImageServer


def test_unknown_backend_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backend must be one of 'requests', 'curl'"):
        Downloader(tmp_path / "d", backend="httpx")  # type: ignore[typeddict-item]
    assert not (tmp_path / "d").exists()


def test_session_factory_needs_the_requests_backend(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="session_factory needs backend='requests'"):
        download_all([], tmp_path, backend="curl", session_factory=requests.Session)


def test_unknown_option_names_itself(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'retries'"):
        Downloader(tmp_path, retries=3)  # type: ignore[call-arg]


def test_curl_without_pycurl_is_an_import_error_before_anything_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes "import pycurl" fail, as on a machine without it.
    monkeypatch.setitem(sys.modules, "pycurl", None)
    monkeypatch.delitem(sys.modules, "fetchpool.backends.curl", raising=False)
    dest = tmp_path / "never"
    with pytest.raises(ImportError, match=r'pip install "fetchpool\[curl\]"'):
        Downloader(dest, backend="curl")
    assert not dest.exists()


def test_both_backends_give_the_same_bytes_and_names(tmp_path: Path) -> None:
    pytest.importorskip("pycurl")
    with ImageServer(n_images=30) as server:
        urls = [
            *server.urls,
            server.url("/any/caf\u00e9.png"),
            server.url("/any/na\u00efve%2Bplus.png"),
            server.url("/any/a/../b.png"),
        ]
        by_backend = {}
        for backend in ("requests", "curl"):
            dest = tmp_path / backend
            results = download_all(urls, dest, workers=4, backend=backend)
            assert [r.status for r in results] == ["downloaded"] * len(urls), results.failed
            by_backend[backend] = [
                (r.path.relative_to(dest), r.path.read_bytes()) for r in results if r.path
            ]
    assert by_backend["requests"] == by_backend["curl"]


def _cli(*args: str, cwd: Path, hide_pycurl: bool = False) -> subprocess.CompletedProcess[str]:
    hide = "import sys; sys.modules['pycurl'] = None; " if hide_pycurl else ""
    code = f"{hide}import sys; from fetchpool.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("backend", ["requests", "curl"])
def test_cli_backend_is_chosen_and_said_with_v(tmp_path: Path, backend: str) -> None:
    if backend == "curl":
        pytest.importorskip("pycurl")
    with ImageServer(n_images=3) as server:
        done = _cli("--backend", backend, "-v", "-d", "out", *server.urls, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"backend: {backend}" in done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        u.rsplit("/", 1)[-1] for u in server.urls
    )


def test_cli_auto_falls_back_to_requests_without_pycurl(tmp_path: Path) -> None:
    with ImageServer(n_images=2) as server:
        done = _cli("-v", "-d", "out", *server.urls, cwd=tmp_path, hide_pycurl=True)
    assert done.returncode == 0, done.stderr
    assert "backend: requests" in done.stderr
    version = _cli("--version", cwd=tmp_path, hide_pycurl=True)
    assert "(backend auto: requests " in version.stdout


def test_cli_curl_without_pycurl_is_a_usage_error(tmp_path: Path) -> None:
    done = _cli(
        "--backend", "curl", "-d", "out", "http://127.0.0.1:9/a.png", cwd=tmp_path, hide_pycurl=True
    )
    assert done.returncode == 2
    assert 'pip install "fetchpool[curl]"' in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("bypass", [False, True])
def test_proxy_from_the_environment_as_requests_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bypass: bool
) -> None:
    # Two loopback servers: one stands in for the proxy (an absolute-URI GET is routed by
    # its path), the other is the target. no_proxy decides which of them is asked.
    with ImageServer(n_images=1) as proxy, ImageServer(n_images=1) as target:
        for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("http_proxy", proxy.url(""))
        if bypass:
            monkeypatch.setenv("no_proxy", "127.0.0.1")
        url = target.url("/any/proxied.png")
        (result,) = download_all([url], tmp_path)
        assert result.ok, result.error
        via_proxy, direct = proxy.hits("/any/proxied.png"), target.hits("/any/proxied.png")
    assert (via_proxy, direct) == ((0, 1) if bypass else (1, 0))
