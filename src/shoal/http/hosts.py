"""Which Host names the server answers to: the defence against DNS rebinding.

A web page can have its own domain name resolve to 127.0.0.1 once it has loaded (DNS
rebinding); its scripts then reach a server on loopback as the page's own origin, which CORS
does not stop, and read the answers (the models, and on a keyless loopback server, all of the
API). The browser still names the page's domain in the Host header, so a server on loopback
answers only to names that mean this machine: localhost and *.localhost, the machine's host
name, the address it listens on, any IP address (a rebinding needs a domain name), names under
the private-use .internal and .local (mDNS) domains, which nobody can register on the internet
(Docker Desktop's host.docker.internal reaches the host's loopback), as Ollama allows, and the
names SHOAL_ALLOWED_HOSTS adds ('*.example.com' wildcards allowed). Any other Host gets 403.

As Ollama does, the check applies only when the server listens on loopback alone: a server on
other addresses is reached by names nobody can list in advance, and requires API keys unless
SHOAL_AUTH=off, which a rebinding page does not have. Setting SHOAL_ALLOWED_HOSTS to names
turns the check on whatever the address; '*' turns it off.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.access.auth import is_loopback


def _name(entry: str) -> str:
    return entry.strip().strip("\"'").strip().lower().rstrip(".")


def host_of(header: str) -> str:
    """The host name of a Host header value: lower case, without the port, brackets or a final dot."""
    value = header.strip().lower()
    if value.startswith("["):                       # [::1]:11434
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:                        # localhost:11434 (more colons: a bare IPv6)
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class AllowedHosts:
    """The Host names one server answers to (see the module doc); None from `for_server`
    when every name is allowed."""

    def __init__(self, names: set[str], suffixes: tuple[str, ...]) -> None:
        self.names = names
        self.suffixes = suffixes

    @classmethod
    def for_server(cls, bind_host: str, extra: str | None) -> AllowedHosts | None:
        entries = [_name(e) for e in (extra or "").split(",")]
        entries = [e for e in entries if e]
        if "*" in entries or (not entries and not is_loopback(bind_host)):
            return None
        names = {"localhost", _name(bind_host).strip("[]")}
        try:
            names.add(_name(socket.gethostname()))
        except OSError:
            pass
        names.update(e for e in entries if not e.startswith("*."))
        suffixes = (".localhost", ".internal", ".local", *(e[1:] for e in entries if e.startswith("*.")))
        return cls(names, suffixes)

    def allows(self, host: str) -> bool:
        if not host or host in self.names or host.endswith(self.suffixes):
            return True
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            return False


class HostPolicy:
    """Pure ASGI: requests naming a host outside `allowed` get `refuse(path, host)` (403)."""

    def __init__(self, app: ASGIApp, allowed: AllowedHosts | None,
                 refuse: Callable[[str, str], Response]) -> None:
        self.app = app
        self.allowed = allowed
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allowed is not None and scope["type"] == "http":
            header = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"")
            host = host_of(header.decode("latin-1"))
            if not self.allowed.allows(host):
                await self.refuse(scope.get("path", ""), host)(scope, receive, send)
                return
        await self.app(scope, receive, send)
