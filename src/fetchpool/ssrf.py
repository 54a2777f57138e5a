"""The SSRF guard (``block_private=``): which addresses a download may connect to.

A service that downloads URLs its users submit must not be turned against its own
network. With ``block_private=True`` each backend checks, at connect time, every
address it is about to connect to (after DNS resolution, for every hop of a redirect
chain) with :meth:`AddressPolicy.refusal`, skips the refused ones, and fails the
attempt with :class:`Refusal` (a ``BlockedAddressError`` on the result) when none is
left: the address checked is the one connected to, so DNS rebinding has no window.

The classifier is written with explicit tables rather than ``ipaddress``'s
``is_global``/``is_private``, whose answers for IPv4-mapped and some special ranges
changed between Python 3.10 and 3.13: here every Python gives the same answer.
"""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Literal

__all__ = [
    "ALLOW_PROXY",
    "AddressPolicy",
    "AllowEntry",
    "BlockPrivate",
    "Refusal",
    "blocked_reason",
    "environment_proxies",
    "make_policy",
    "parse_allow_host",
    "parse_allow_hosts",
]

#: The ``block_private`` value that lets URLs go through a proxy from the environment.
ALLOW_PROXY: Literal["allow-proxy"] = "allow-proxy"
BlockPrivate = bool | Literal["allow-proxy"]
IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
#: One ``allow_hosts`` entry, normalised: a network, or a host name (``*.`` for its subdomains).
AllowEntry = str | IPv4Network | IPv6Network


def _v4(table: Iterable[tuple[str, str]]) -> tuple[tuple[IPv4Network, str], ...]:
    return tuple((IPv4Network(net), why) for net, why in table)


def _v6(table: Iterable[tuple[str, str]]) -> tuple[tuple[IPv6Network, str], ...]:
    return tuple((IPv6Network(net), why) for net, why in table)


# IANA's special-purpose registry, where an address is not globally reachable.
# Documentation ranges are blocked too: nothing public answers there.
_V4_BLOCKED = _v4(
    (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved (IETF protocol assignments)"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved (6to4 relay anycast)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)
# Outside 2000::/3 (global unicast) every address is refused; these name the reason.
_V6_GLOBAL = IPv6Network("2000::/3")
_V6_NAMED = _v6(
    (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("100::/64", "reserved (discard-only)"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
_V6_BLOCKED_GLOBAL = _v6(
    (
        ("2001::/23", "reserved (IETF protocol assignments, Teredo)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
    )
)
# IPv6 forms that carry an IPv4 address in their low 32 bits: judged by that address.
_V6_EMBEDDING = _v6(
    (
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("64:ff9b::/96", "NAT64"),
        ("::/96", "IPv4-compatible"),
    )
)
_V6_6TO4 = IPv6Network("2002::/16")


def _v4_reason(address: IPv4Address) -> str | None:
    for net, why in _V4_BLOCKED:
        if address in net:
            return why
    return None


def blocked_reason(address: IPAddress) -> str | None:
    """Return why ``block_private`` refuses ``address`` (``"loopback"``...), or ``None``.

    IPv6 addresses that embed an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``,
    IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged
    by the IPv4 address they carry.
    """
    if isinstance(address, IPv4Address):
        return _v4_reason(address)
    for net, why in _V6_NAMED:
        if address in net:
            return why
    for net, form in _V6_EMBEDDING:
        if address in net:
            embedded = IPv4Address(int(address) & 0xFFFFFFFF)
            reason = _v4_reason(embedded)
            return None if reason is None else f"{reason}, {form} {embedded}"
    if address in _V6_6TO4:
        embedded = IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
        reason = _v4_reason(embedded)
        return None if reason is None else f"{reason}, 6to4 {embedded}"
    if address not in _V6_GLOBAL:
        return "reserved"
    for net, why in _V6_BLOCKED_GLOBAL:
        if address in net:
            return why
    return None


class Refusal(Exception):
    """A connection the guard refused; the backends report it as ``BlockedAddressError``.

    Attributes:
        host: the URL's host (never user-info).
        address: the address refused, as the resolver gave it (``""`` for a proxy).
    """

    def __init__(self, host: str, address: str, text: str) -> None:
        super().__init__(host, address, text)
        self.host = host
        self.address = address
        self.text = text

    def __str__(self) -> str:
        return self.text


def _host_of(host: str) -> str:
    name = host.strip("[]").rstrip(".").lower()
    if not name.isascii():
        try:
            return name.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return name


def _literal(host: str) -> IPAddress | None:
    """The address a host written as an IP literal stands for, in any spelling the
    C resolver takes (``2130706433``, ``0177.0.0.1``, ``127.1``), or ``None``."""
    try:
        return ip_address(host)
    except ValueError:
        pass
    try:
        return IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class AddressPolicy:
    """What ``block_private`` refuses, with the caller's exceptions (picklable, hashable).

    Attributes:
        allow_proxy: URLs may go through a proxy from the environment (the guard then
            checks only hosts written as IP literals, and ``localhost`` names).
        networks: addresses allowed whatever the host.
        names: host names allowed whatever their address.
        suffixes: ``.example.com`` allows every subdomain of ``example.com``.
    """

    allow_proxy: bool = False
    networks: tuple[IPNetwork, ...] = ()
    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()

    def _allowed_name(self, host: str) -> bool:
        return host in self.names or host.endswith(self.suffixes)

    def _allowed_address(self, address: IPAddress) -> bool:
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            mapped = address.ipv4_mapped
            if any(mapped in net for net in self.networks):
                return True
        return any(address in net for net in self.networks)

    def refusal(self, host: str, address: str) -> Refusal | None:
        """Return the refusal of connecting to ``address`` for a URL's ``host``, or ``None``.

        Args:
            host: the URL's host, as in the URL.
            address: the numeric address about to be connected to (an IPv6 one may
                carry a ``%scope``).
        """
        name = _host_of(host)
        if self._allowed_name(name):
            return None
        try:
            parsed = ip_address(address.partition("%")[0])
        except ValueError:
            return Refusal(host, address, f"{host} resolves to {address}, not an IP address")
        reason = blocked_reason(parsed)
        if reason is None or self._allowed_address(parsed):
            return None
        where = address if name == address.lower() else f"{host} resolves to {address}"
        return Refusal(host, address, f"{where} ({reason})")

    def proxied(self, host: str) -> Refusal | None:
        """Return the refusal of sending a request for ``host`` through a proxy, or ``None``.

        The proxy resolves the name and connects: the guard cannot see that address.
        Without ``allow_proxy`` every such request is refused; with it, a host written as
        an IP literal is still checked, and so are ``localhost`` names.
        """
        name = _host_of(host)
        if not self.allow_proxy:
            return Refusal(
                host,
                "",
                f"{host} would be reached through a proxy, where block_private cannot see "
                f"the address (block_private='{ALLOW_PROXY}' lets it through)",
            )
        if self._allowed_name(name):
            return None
        literal = _literal(name)
        if literal is not None:
            return self.refusal(host, str(literal))
        if name == "localhost" or name.endswith(".localhost"):
            return Refusal(host, "", f"{host} is a loopback name")
        return None


# -- options ----------------------------------------------------------------------------

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_NUMERIC = re.compile(r"[0-9.]+|0x[0-9a-f.x]*", re.IGNORECASE)


def parse_allow_host(text: str) -> AllowEntry:
    """Normalise one ``allow_hosts`` entry: a network, an address, or a host name.

    ``"10.0.0.0/8"`` and ``"127.0.0.1"`` (or ``"[::1]"``) become networks; a name is
    lowered (IDNA-encoded where not ASCII); ``"*.example.com"`` allows the subdomains of
    ``example.com``.

    Raises:
        ValueError: not a network, an address or a host name (a port, a scheme, a network
            with host bits set, a number that is no address...).
    """
    entry = text.strip().strip("[]").rstrip(".")
    if "/" in entry:
        try:
            return ip_network(entry, strict=True)
        except ValueError as exc:
            raise ValueError(f"allow_hosts: {text!r} is not a network: {exc}") from None
    try:
        return ip_network(ip_address(entry))
    except ValueError:
        pass
    wildcard = entry.startswith("*.")
    name = entry[2:] if wildcard else entry
    try:
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"allow_hosts: {text!r} is not a host name") from None
    if _NUMERIC.fullmatch(name):
        raise ValueError(f"allow_hosts: {text!r} is not an IP address or a host name")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(
            f"allow_hosts: {text!r} is not a host name or a network (no port or scheme)"
        )
    return f"*.{name}" if wildcard else name


def parse_allow_hosts(value: object) -> tuple[AllowEntry, ...]:
    """Normalise ``allow_hosts``: an iterable of names, addresses and networks.

    Raises:
        TypeError: a ``str`` (one name: wrap it in a list) or a non-iterable; an entry
            of another type.
        ValueError: an entry that is none of them (see :func:`parse_allow_host`).
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        kind = type(value).__name__
        raise TypeError(f"allow_hosts must be an iterable of names or networks, not {kind}")
    entries: list[AllowEntry] = []
    for item in value:
        if isinstance(item, (IPv4Network, IPv6Network)):
            entry: AllowEntry = item
        elif isinstance(item, (IPv4Address, IPv6Address)):
            entry = ip_network(item)
        elif isinstance(item, str):
            entry = parse_allow_host(item)
        else:
            raise TypeError(f"allow_hosts entries must be str, not {type(item).__name__}")
        if entry not in entries:
            entries.append(entry)
    return tuple(entries)


def environment_proxies() -> dict[str, str]:
    """The http, https and all proxies the environment sets (what both backends use).

    A ``no_proxy`` of ``*`` turns them all off.
    """
    proxies = urllib.request.getproxies()
    if proxies.get("no", "").strip() == "*":
        return {}
    return {k: v for k, v in proxies.items() if k in ("http", "https", "all") and v}


def make_policy(
    block_private: BlockPrivate, allow_hosts: tuple[AllowEntry, ...]
) -> AddressPolicy | None:
    """Return the policy the options ask for, or ``None`` where nothing is blocked.

    Raises:
        ValueError: ``block_private=True`` while the environment sets a proxy.
    """
    if not block_private:
        return None
    allow_proxy = block_private == ALLOW_PROXY
    if not allow_proxy:
        proxies = environment_proxies()
        if proxies:
            names = ", ".join(sorted(f"{k}_proxy" for k in proxies))
            raise ValueError(
                f"block_private=True cannot check addresses through a proxy ({names} set "
                f"in the environment): unset it, set no_proxy='*', or pass "
                f"block_private='{ALLOW_PROXY}' to check only what bypasses the proxy"
            )
    return AddressPolicy(
        allow_proxy=allow_proxy,
        networks=tuple(e for e in allow_hosts if not isinstance(e, str)),
        names=frozenset(e for e in allow_hosts if isinstance(e, str) and e[:2] != "*."),
        suffixes=tuple(e[1:] for e in allow_hosts if isinstance(e, str) and e[:2] == "*."),
    )
