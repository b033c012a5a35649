"""Which hosts the server may connect to on a caller's behalf (pulls and pushes), and a
transport that connects only there.

A model name chooses the registry host (`10.0.0.5:5000/team/m`), so without a guard any
caller could make the server talk to the cloud metadata service, to localhost's admin ports
or into the private network (SSRF). The rule, applied to every address a host resolves to:

* link-local (169.254.0.0/16, fe80::/10) and the cloud metadata services (by address and by
  name) are refused always;
* other non-public addresses (loopback, RFC 1918, fc00::/7, CGNAT 100.64.0.0/10,
  unspecified, multicast, reserved) are refused unless the host, or host:port, is listed in
  the policy's allow list (`SHOAL_REGISTRY_ALLOW` in the server's settings);
* public addresses are allowed.

A host is refused when any of its addresses is: a name with one public and one private
address is more likely a trick than a registry.

`GuardedTransport` checks at connect time and connects to the very addresses it checked,
so a DNS answer that changes between a check and the connection (DNS rebinding) cannot
slip through; TLS still verifies the certificate for the host name (SNI unchanged).
"""
from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from shoal.store.errors import EgressRefusedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# NOTE: the metadata addresses inside 169.254/16 are refused as link-local anyway; listed
# so the refusal names them.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",      # AWS, GCP, Azure, OpenStack, Oracle...
    "169.254.170.2",        # AWS ECS task metadata
    "fd00:ec2::254",        # AWS over IPv6
    "100.100.100.200",      # Alibaba Cloud
    "192.0.0.192",          # Oracle Cloud (classic)
))
METADATA_HOSTNAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "metadata.azure.internal",
    "instance-data", "instance-data.ec2.internal",
})
_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")

ALLOW_SETTING = "SHOAL_REGISTRY_ALLOW"


def _port_of(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {entry!r}")
    return int(text)


def _split_entry(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address -> (host, port)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad entry {entry!r}")
        return host, _port_of(rest[1:], entry) if rest else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _port_of(port, entry)
    return entry, None


def _canonical_host(host: str) -> str:
    """Lower case, no brackets, no trailing dot; an IP address in its compressed form."""
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _plain(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped ::ffff:a.b.c.d, compatible ::a.b.c.d,
    NAT64, 6to4), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64 or address in _COMPATIBLE:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


def never_allowed(address: IPAddress) -> str | None:
    """Why no setting may open `address` (link-local, metadata), or None."""
    address = _plain(address)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if any(address in net for net in _LINK_LOCAL if net.version == address.version):
        return "a link-local address"
    return None


def is_public(address: IPAddress) -> bool:
    address = _plain(address)
    return (address.is_global and not (address.is_multicast or address.is_reserved)
            and address not in _CGNAT)


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """The allow list: (host, port) pairs, port None for any; hosts compared by name and by
    resolved address, so `127.0.0.1:5000` also admits `localhost:5000`."""

    allowed: frozenset[tuple[str, int | None]] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, text: str | None) -> EgressPolicy:
        """`host[:port],...` (IPv6 as `[addr]:port`); raises ValueError naming a bad entry."""
        entries = [e.strip() for e in (text or "").split(",") if e.strip()]
        allowed = set()
        for entry in entries:
            host, port = _split_entry(entry)
            if not host or any(c.isspace() or c in "/@?#" for c in host):
                raise ValueError(f"bad entry {entry!r}: expected host or host:port")
            allowed.add((_canonical_host(host), port))
        return cls(frozenset(allowed))

    def _listed(self, host: str, port: int, address: IPAddress) -> bool:
        names = {_canonical_host(host), str(address), str(_plain(address))}
        return any(h in names and p in (None, port) for h, p in self.allowed)

    def refusal(self, host: str, port: int, address: IPAddress) -> str | None:
        """Why `host:port` may not be reached at `address`, or None when it may."""
        reason = never_allowed(address)
        if reason is not None:
            return reason
        if is_public(address) or self._listed(host, port, address):
            return None
        return (f"a private, loopback or otherwise non-public address (list it in "
                f"{ALLOW_SETTING} to use a registry there)")

    def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """The getaddrinfo entries of `host:port`, every one checked; raises
        EgressRefusedError when any is refused, OSError when the name does not resolve."""
        name = _canonical_host(host)
        if name in METADATA_HOSTNAMES:
            raise EgressRefusedError(host, port, "a cloud metadata service")
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            reason = self.refusal(host, port, address)
            if reason is not None:
                raise EgressRefusedError(host, port, reason)
        return infos

    def check(self, host: str, port: int) -> None:
        """Raises EgressRefusedError when `host:port` is refused; a name that does not
        resolve passes (the connection then fails in its usual way)."""
        try:
            self.resolve(host, port)
        except OSError:
            pass


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to addresses the policy admits: the host is
    resolved and checked here, and the socket opened to the checked address."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        try:
            infos = self.policy.resolve(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        error: Exception = httpcore.ConnectError(f"{host} has no address")
        for info in infos:
            try:
                return super().connect_tcp(str(info[4][0]), port, timeout, local_address,
                                           socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not a registry")


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport (TLS verified for the host name, env CA settings) on GuardedBackend.
    Proxies from the environment are not used: a proxy would make the connections the
    policy checks."""

    def __init__(self, policy: EgressPolicy, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__()
        # NOTE: HTTPTransport takes no network backend; its pool is replaced by one that has
        # ours (same defaults otherwise).
        self._pool = httpcore.ConnectionPool(ssl_context=ssl_context or httpx.create_ssl_context(),
                                             network_backend=GuardedBackend(policy))
