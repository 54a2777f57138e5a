"""The SSRF guard (``block_private=``, ``allow_hosts=``) on both backends.

No traffic leaves 127.0.0.1: names are resolved by fakes (``socket.getaddrinfo`` for the
requests backend, ``CURLOPT_RESOLVE`` for libcurl) to loopback or to addresses that the
guard refuses before any connect, and the test server counts what reached it.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path

import pytest
import requests

import fetchpool
from fetchpool import BlockedAddressError, Downloader, FetchError, download_all
from fetchpool.cli import main
from fetchpool.options import make_options
from fetchpool.retry import is_retryable
from fetchpool.ssrf import AddressPolicy, blocked_reason, make_policy, parse_allow_hosts
from fetchpool.testing import ImageServer

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

Resolve = Callable[..., None]


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy from the environment of whoever runs the tests."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(n_images=0) as srv:
        yield srv


@pytest.fixture
def fresh(server: ImageServer) -> ImageServer:
    """The module's server with its counters at zero."""
    server.reset_hits()
    return server


def port_of(server: ImageServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def on(server: ImageServer, host: str, path: str = "/any/cat.png") -> str:
    """The URL of ``path`` on the test server, reached by the name ``host``."""
    return f"http://{host}:{port_of(server)}{path}"


@pytest.fixture
def resolve(each_backend: str, monkeypatch: pytest.MonkeyPatch, server: ImageServer) -> Resolve:
    """Fake DNS for the backend under test: ``{name: [address, ...]}``, for ``port`` (curl
    needs one: the server's by default)."""

    def install(names: dict[str, list[str]], port: int | None = None) -> None:
        if each_backend == "requests":
            real = socket.getaddrinfo

            def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> object:
                if not isinstance(host, str) or host not in names:
                    return real(host, port, *args, **kwargs)  # type: ignore[arg-type]
                assert isinstance(port, int)
                return [
                    (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0))
                    if ":" in a
                    else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in names[host]
                ]

            monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        else:
            pycurl = pytest.importorskip("pycurl")
            from fetchpool.backends import curl

            entries = [
                f"{host}:{port or port_of(server)}:"
                + ",".join(f"[{a}]" if ":" in a else a for a in addresses)
                for host, addresses in names.items()
            ]
            make = curl._Slot.__init__

            def init(slot: curl._Slot, transport: curl.CurlTransport) -> None:
                make(slot, transport)
                slot.easy.setopt(pycurl.RESOLVE, entries)

            monkeypatch.setattr(curl._Slot, "__init__", init)

    return install


def blocked(result: fetchpool.DownloadResult) -> BlockedAddressError:
    assert result.status == "failed", result
    assert isinstance(result.error, BlockedAddressError), repr(result.error)
    return result.error


# --------------------------------------------------------------------------- the classifier


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("10.1.2.3", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("169.254.169.254", "link-local"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.0.0.8", "reserved"),
        ("192.0.2.1", "documentation"),
        ("192.88.99.1", "6to4 relay"),
        ("192.168.1.1", "private"),
        ("198.18.0.1", "benchmarking"),
        ("198.19.255.255", "benchmarking"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.7", "documentation"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback, IPv4-mapped 127.0.0.1"),
        ("::ffff:169.254.169.254", "link-local, IPv4-mapped"),
        ("::ffff:10.0.0.1", "private, IPv4-mapped"),
        ("::127.0.0.1", "loopback, IPv4-compatible"),
        ("::10.0.0.1", "private, IPv4-compatible"),
        ("64:ff9b::7f00:1", "loopback, NAT64 127.0.0.1"),
        ("64:ff9b::a9fe:a9fe", "link-local, NAT64 169.254.169.254"),
        ("64:ff9b:1::1", "reserved"),
        ("2002:7f00:1::1", "loopback, 6to4 127.0.0.1"),
        ("2002:c0a8:101::", "private, 6to4 192.168.1.1"),
        ("100::1", "discard-only"),
        ("2001::1", "Teredo"),
        ("2001:db8::1", "documentation"),
        ("3fff::1", "documentation"),
        ("fc00::1", "unique local"),
        ("fd12:3456::1", "unique local"),
        ("fe80::1", "link-local"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("4000::1", "reserved"),
        ("5f00::1", "reserved"),
    ],
)
def test_the_classifier_refuses_every_non_public_range(address: str, reason: str) -> None:
    found = blocked_reason(ip_address(address))
    assert found is not None, address
    assert reason in found


@pytest.mark.parametrize(
    "address",
    [
        "1.1.1.1",
        "8.8.8.8",
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.1.1",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "2606:4700:4700::1111",
        "2a00:1450::1",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_the_classifier_lets_public_addresses_through(address: str) -> None:
    assert blocked_reason(ip_address(address)) is None


def test_allow_hosts_admits_names_subdomains_and_networks() -> None:
    policy = make_policy(
        True, parse_allow_hosts(["intranet.example", "*.corp.example", "10.0.0.0/8", "::1"])
    )
    assert policy is not None
    assert policy.refusal("intranet.example", "192.168.1.1") is None
    assert policy.refusal("INTRANET.example.", "192.168.1.1") is None
    assert policy.refusal("a.b.corp.example", "127.0.0.1") is None
    assert policy.refusal("corp.example", "127.0.0.1") is not None
    assert policy.refusal("evilcorp.example", "127.0.0.1") is not None
    assert policy.refusal("anything", "10.9.8.7") is None
    assert policy.refusal("anything", "::1") is None
    refusal = policy.refusal("anything", "11.0.0.1%eth0")
    assert refusal is None  # public, scope id or not
    refusal = policy.refusal("anything", "192.168.0.1")
    assert refusal is not None
    assert str(refusal) == "anything resolves to 192.168.0.1 (private)"
    assert (refusal.host, refusal.address) == ("anything", "192.168.0.1")


def test_an_allowed_network_admits_its_ipv4_mapped_form() -> None:
    policy = make_policy(True, parse_allow_hosts(["127.0.0.1"]))
    assert policy is not None
    assert policy.refusal("x", "::ffff:127.0.0.1") is None
    assert policy.refusal("x", "::ffff:127.0.0.2") is not None


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("127.0.0.1", IPv4Network("127.0.0.1/32")),
        ("[::1]", IPv6Network("::1/128")),
        ("10.0.0.0/8", IPv4Network("10.0.0.0/8")),
        ("fd00::/8", IPv6Network("fd00::/8")),
        ("Intranet.Example.", "intranet.example"),
        ("*.Corp.example", "*.corp.example"),
        ("b\u00fccher.example", "xn--bcher-kva.example"),
    ],
)
def test_allow_hosts_entries_are_normalised(given: str, normalised: object) -> None:
    assert parse_allow_hosts([given]) == (normalised,)


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "10.0.0.1/8",
        "10.0.0.0/33",
        "intranet:8080",
        "http://intranet/",
        "user@intranet",
        "bad name",
        "-bad.example",
        "2130706433",
        "0177.0.0.1",
        "0x7f.1",
        "*.",
    ],
)
def test_junk_in_allow_hosts_is_a_value_error(junk: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allow_hosts"):
        Downloader(tmp_path, block_private=True, allow_hosts=[junk])


def test_allow_hosts_must_be_an_iterable_of_names(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="allow_hosts must be an iterable"):
        Downloader(tmp_path, block_private=True, allow_hosts="intranet.example")  # type: ignore[typeddict-item]
    with pytest.raises(TypeError, match="entries must be str"):
        Downloader(tmp_path, block_private=True, allow_hosts=[b"x"])  # type: ignore[list-item]


def test_allow_hosts_without_block_private_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no effect without block_private"):
        Downloader(tmp_path, allow_hosts=["intranet.example"])


@pytest.mark.parametrize(("value", "error"), [("yes", ValueError), (1, TypeError)])
def test_block_private_takes_a_bool_or_allow_proxy(
    value: object, error: type[Exception], tmp_path: Path
) -> None:
    with pytest.raises(error, match="block_private must be True, False or 'allow-proxy'"):
        Downloader(tmp_path, block_private=value)  # type: ignore[typeddict-item]


def test_the_options_stay_hashable_and_picklable() -> None:
    options = make_options({"block_private": True, "allow_hosts": ["10.0.0.0/8", "a.example"]})
    assert options.allow_hosts == (IPv4Network("10.0.0.0/8"), "a.example")
    assert pickle.loads(pickle.dumps(options.allow_hosts)) == options.allow_hosts
    policy = make_policy(options.block_private, options.allow_hosts)
    assert isinstance(policy, AddressPolicy)
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert hash(policy) == hash(make_policy(True, parse_allow_hosts(["10.0.0.0/8", "a.example"])))


# --------------------------------------------------------------------------- the error


def test_blocked_address_error_is_exported_pickles_and_is_never_retried() -> None:
    assert "BlockedAddressError" in fetchpool.__all__
    error = BlockedAddressError("refused", url="http://h/x", host="h", address="10.0.0.1")
    assert isinstance(error, FetchError)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.url, copy.host, copy.address) == (
        BlockedAddressError,
        "refused",
        "http://h/x",
        "h",
        "10.0.0.1",
    )
    assert not is_retryable(error)


# --------------------------------------------------------------------------- both backends


@pytest.mark.usefixtures("each_backend")
def test_the_loopback_server_is_refused_and_nothing_reaches_it(
    fresh: ImageServer, dest: Path, waits: list[float]
) -> None:
    url = fresh.url("/any/cat.png")
    [result] = download_all([url], dest, block_private=True)
    error = blocked(result)
    assert result.attempts == 1
    assert waits == []  # not retried
    assert (error.host, error.address) == ("127.0.0.1", "127.0.0.1")
    assert str(error) == (
        f"connection refused by block_private requesting {url}: 127.0.0.1 (loopback)"
    )
    assert fresh.total_connections == 0
    assert list(dest.iterdir()) == []


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("allow", ["127.0.0.1", "127.0.0.0/8"])
def test_allow_hosts_lets_the_loopback_server_through(
    fresh: ImageServer, dest: Path, allow: str
) -> None:
    url = fresh.url("/any/cat.png")
    [result] = download_all([url], dest, block_private=True, allow_hosts=[allow])
    assert result.status == "downloaded", result.error
    assert result.path is not None
    assert result.path.read_bytes() == fresh.expected(url)


def test_a_public_looking_name_that_resolves_to_loopback_is_refused(
    fresh: ImageServer, dest: Path, resolve: Resolve
) -> None:
    resolve({"images.example.com": ["127.0.0.1"]})
    url = on(fresh, "images.example.com").replace("http://", "http://user:s3cret@")
    [result] = download_all([url], dest, block_private=True)
    error = blocked(result)
    assert (error.host, error.address) == ("images.example.com", "127.0.0.1")
    assert "images.example.com resolves to 127.0.0.1 (loopback)" in str(error)
    assert "s3cret" not in str(error)
    assert "s3cret" not in error.url
    assert fresh.total_connections == 0


def test_an_allowed_name_goes_through_whatever_it_resolves_to(
    fresh: ImageServer, dest: Path, resolve: Resolve
) -> None:
    resolve({"images.example.com": ["127.0.0.1"]})
    url = on(fresh, "images.example.com")
    [result] = download_all([url], dest, block_private=True, allow_hosts=["*.example.com"])
    assert result.status == "downloaded", result.error


@pytest.mark.parametrize("addresses", [["127.0.0.2"], ["127.0.0.3", "::1"], ["::ffff:127.0.0.4"]])
def test_every_address_blocked_is_refused_naming_one(
    fresh: ImageServer, dest: Path, resolve: Resolve, addresses: list[str]
) -> None:
    # Loopback stands for every blocked range here (the classifier's tests cover them):
    # a broken guard must not send packets anywhere but to this machine.
    resolve({"metadata.example": addresses})
    [result] = download_all([on(fresh, "metadata.example")], dest, block_private=True)
    # The first refused, in the order the backend tries them (libcurl: IPv6 first).
    assert blocked(result).address in addresses
    assert result.attempts == 1


@pytest.fixture
def trap(server: ImageServer) -> Iterator[socket.socket]:
    """A listener on 127.0.0.2 at the server's port: whatever connects there is caught."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.2", port_of(server)))
    except OSError as exc:
        sock.close()
        pytest.skip(f"cannot listen on 127.0.0.2: {exc}")
    sock.listen(8)
    sock.setblocking(False)
    with sock:
        yield sock


def caught(trap: socket.socket) -> bool:
    try:
        conn, _ = trap.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def past_the_trap(server: ImageServer, host: str, dest: Path) -> fetchpool.DownloadResult:
    """Download from ``server`` by ``host``, 127.0.0.1 alone allowed; a connect to the
    trap gets no answer, so it is given up on soon and not retried."""
    [result] = download_all(
        [on(server, host)],
        dest,
        block_private=True,
        allow_hosts=["127.0.0.1"],
        timeout=5,
        retry=1,
    )
    return result


def test_a_name_with_blocked_and_allowed_addresses_connects_to_an_allowed_one(
    fresh: ImageServer, dest: Path, resolve: Resolve, trap: socket.socket
) -> None:
    # Blocked addresses are skipped, never connected to: 127.0.0.2 comes first (and
    # listens), the download reaches the server by 127.0.0.1 alone.
    resolve({"mixed.example": ["127.0.0.2", "127.0.0.1"]})
    result = past_the_trap(fresh, "mixed.example", dest)
    assert result.status == "downloaded", result.error
    assert not caught(trap)
    assert fresh.total_connections == 1


@pytest.mark.requests_only
def test_the_name_is_resolved_once_and_that_address_connected_to(
    fresh: ImageServer,
    dest: Path,
    each_backend: str,
    monkeypatch: pytest.MonkeyPatch,
    trap: socket.socket,
) -> None:
    # A rebinding DNS server: the first answer is allowed, any later one is not. The
    # address checked must be the address connected to, with no second lookup.
    real = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> object:
        if host != "rebind.example":
            return real(host, port, *args, **kwargs)  # type: ignore[arg-type]
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    result = past_the_trap(fresh, "rebind.example", dest)
    assert result.status == "downloaded", result.error
    assert lookups == ["rebind.example"]
    assert not caught(trap)


def test_a_redirect_from_an_allowed_host_to_a_blocked_address_is_refused(
    fresh: ImageServer, dest: Path, resolve: Resolve
) -> None:
    resolve({"allowed.example": ["127.0.0.1"], "inside.example": ["127.0.0.1"]})
    target = on(fresh, "inside.example", "/any/secret.png")
    url = on(fresh, "allowed.example", f"/redirect-to?location={target}")
    [result] = download_all([url], dest, block_private=True, allow_hosts=["allowed.example"])
    error = blocked(result)
    assert error.host == "inside.example"
    assert f"requesting {url}: inside.example resolves to 127.0.0.1 (loopback)" in str(error)
    assert fresh.hits("/redirect-to") == 1
    assert fresh.hits("/any/secret.png") == 0
    # The kept-alive connection to allowed.example (same address and port) is not
    # handed to inside.example either.
    assert fresh.total_requests == 1


def test_a_connection_kept_for_an_allowed_host_is_not_reused_for_a_blocked_one(
    fresh: ImageServer, dest: Path, resolve: Resolve
) -> None:
    resolve({"allowed.example": ["127.0.0.1"], "inside.example": ["127.0.0.1"]})
    with Downloader(dest, workers=1, block_private=True, allow_hosts=["allowed.example"]) as dl:
        first = dl.submit(on(fresh, "allowed.example", "/any/a.png")).result()
        second = dl.submit(on(fresh, "inside.example", "/any/b.png")).result()
    assert first.status == "downloaded", first.error
    blocked(second)
    assert (fresh.total_connections, fresh.total_requests) == (1, 1)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("[::1]", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ("[::ffff:7f00:1]", "::ffff:127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
    ],
)
def test_other_spellings_of_loopback_are_refused_before_any_request(
    fresh: ImageServer, dest: Path, host: str, address: str
) -> None:
    [result] = download_all([on(fresh, host)], dest, block_private=True)
    error = blocked(result)
    assert error.address == address
    assert fresh.total_connections == 0


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("host", ["[::ffff:127.0.0.1]", "2130706433", "0177.0.0.1"])
def test_the_same_spellings_reach_the_server_where_allowed(
    fresh: ImageServer, dest: Path, host: str
) -> None:
    # The refusals above are the guard's: these URLs do reach loopback without it.
    [result] = download_all(
        [on(fresh, host)], dest, block_private=True, allow_hosts=["127.0.0.0/8"]
    )
    assert result.status == "downloaded", result.error
    assert fresh.total_requests == 1


# --------------------------------------------------------------------------- proxies


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "https_proxy", "ALL_PROXY"])
def test_a_proxy_in_the_environment_is_a_value_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    monkeypatch.setenv(variable, "http://user:pw@proxy.example:3128")
    with pytest.raises(ValueError, match="cannot check addresses through a proxy") as info:
        Downloader(tmp_path / "d", block_private=True)
    assert "pw" not in str(info.value)
    assert not (tmp_path / "d").exists()
    Downloader(tmp_path / "d", block_private="allow-proxy").close()
    monkeypatch.setenv("NO_PROXY", "*")
    Downloader(tmp_path / "d", block_private=True).close()


def test_allow_proxy_sends_names_through_the_proxy_but_checks_literals_and_what_bypasses_it(
    fresh: ImageServer, dest: Path, resolve: Resolve, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test server is the proxy: it answers absolute-form requests as its own.
    resolve({"bypass.example": ["127.0.0.1"]})
    monkeypatch.setenv("HTTP_PROXY", fresh.base_url)
    monkeypatch.setenv("NO_PROXY", "bypass.example")
    through = "http://images.example.com/any/cat.png"
    urls = [
        through,
        "http://127.0.0.1:9/x.png",
        "http://localhost/x.png",
        on(fresh, "bypass.example"),
    ]
    results = download_all(urls, dest, block_private="allow-proxy")
    assert results[0].status == "downloaded", results[0].error
    assert "127.0.0.1 (loopback)" in str(blocked(results[1]))
    assert "localhost is a loopback name" in str(blocked(results[2]))
    assert blocked(results[3]).host == "bypass.example"
    assert fresh.total_requests == 1


def test_a_proxy_set_after_construction_is_refused_without_allow_proxy(
    fresh: ImageServer, dest: Path, monkeypatch: pytest.MonkeyPatch, each_backend: str
) -> None:
    with Downloader(dest, block_private=True, allow_hosts=["127.0.0.1"]) as dl:
        monkeypatch.setenv("HTTP_PROXY", fresh.base_url)
        result = dl.submit("http://images.example.com/any/cat.png").result()
    assert "through a proxy" in str(blocked(result))
    assert fresh.total_connections == 0


# --------------------------------------------------------------------------- the command


def test_the_command_takes_block_private_and_allow_host(
    fresh: ImageServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = fresh.url("/any/cat.png")
    args = [url, "-d", str(tmp_path / "a"), "--backend", "requests", "--retries", "0"]
    assert main([*args, "--block-private"]) == 1
    assert "refused by block_private" in capsys.readouterr().err
    assert fresh.total_connections == 0
    args[2] = str(tmp_path / "b")
    assert main([*args, "--block-private", "--allow-host", "127.0.0.1"]) == 0
    assert (tmp_path / "b" / "cat.png").exists()


def test_the_command_refuses_junk_and_proxies_as_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["http://x.example/a.png", "-d", str(tmp_path), "--backend", "requests"]
    assert main([*args, "--block-private", "--allow-host", "intranet:80"]) == 2
    assert "--allow-host" in capsys.readouterr().err
    assert main([*args, "--block-private=yes"]) == 2
    assert main([*args, "--allow-host", "intranet"]) == 2
    assert "no effect without block_private" in capsys.readouterr().err
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert main([*args, "--block-private"]) == 2
    assert "https_proxy" in capsys.readouterr().err


@pytest.mark.requests_only
@pytest.mark.usefixtures("each_backend")
def test_a_session_whose_connections_the_guard_cannot_see_is_refused(
    fresh: ImageServer, dest: Path
) -> None:
    from requests.adapters import BaseAdapter

    class Opaque(BaseAdapter):  # not requests' HTTPAdapter: its own connections
        def send(self, *args: object, **kwargs: object) -> requests.Response:
            raise AssertionError("never used")

        def close(self) -> None:
            pass

    def factory() -> requests.Session:
        session = requests.Session()
        session.mount("http://", Opaque())
        return session

    # Found on the worker thread that makes the session: that URL fails, unsent.
    [result] = download_all(
        [fresh.url("/any/cat.png")],
        dest,
        block_private=True,
        allow_hosts=["127.0.0.1"],
        session_factory=factory,
    )
    assert result.status == "failed"
    assert "block_private needs the session's adapters" in str(result.error)
    assert fresh.total_connections == 0


def test_over_tls_the_certificate_is_checked_against_the_name_not_the_address(
    dest: Path, resolve: Resolve, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("hypercorn")
    from _h2server import H2ImageServer

    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    # The certificate names localhost and 127.0.0.1: the guard connects to the address
    # it checked, and TLS must still see the name (SNI, certificate check).
    with H2ImageServer() as tls:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls.ca_file)
        resolve({"localhost": ["127.0.0.1"], "other.example": ["127.0.0.1"]}, tls.port)
        urls = [
            f"https://localhost:{tls.port}/img/a.png",
            f"https://other.example:{tls.port}/img/a.png",
        ]
        good, wrong = download_all(urls, dest, block_private=True, allow_hosts=["127.0.0.1"])
    assert good.status == "downloaded", good.error
    assert good.path is not None
    assert good.path.read_bytes() == H2ImageServer.expected("a")
    assert isinstance(wrong.error, fetchpool.TransferError)
    assert "TLS error" in str(wrong.error)
    assert wrong.attempts == 1
