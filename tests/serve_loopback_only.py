"""`shoal serve` that cannot reach past loopback, in a scratch working directory.

For servers that tests feed arbitrary input (tests/http/test_fuzz.py): a fuzzed model name in
/api/pull or /api/push may name any registry host, and tests may open connections only on
loopback. Here every name lookup other than a loopback one fails at once, and so does every
connect to a non-loopback address, so such a pull or push is refused quickly and nothing
leaves the machine. Each refusal is logged to stderr ("loopback-only: refused ..."), which
is the server's log. The working directory is a fresh temporary one, so a fuzzed relative
path in /api/create resolves to an empty directory rather than the repository.

Usage (as LiveServer's `entry`): python tests/serve_loopback_only.py serve --model ...
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tempfile

from shoal.cli import main

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _is_loopback(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%")[0]
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse(what: str) -> None:
    print(f"loopback-only: refused {what}", file=sys.stderr, flush=True)


def _loopback_getaddrinfo(host, *args, **kwargs):
    if not _is_loopback(host):
        _refuse(f"name lookup of {host!r}")
        raise socket.gaierror(socket.EAI_NONAME, "name lookups past loopback are off in this test server")
    return _getaddrinfo(host, *args, **kwargs)


def _checked(sock: socket.socket, address) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
        _refuse(f"connection to {address!r}")
        raise ConnectionRefusedError(f"connections past loopback are off in this test server: {address!r}")


def _loopback_connect(self, address):
    _checked(self, address)
    return _connect(self, address)


def _loopback_connect_ex(self, address):
    _checked(self, address)
    return _connect_ex(self, address)


if __name__ == "__main__":
    socket.getaddrinfo = _loopback_getaddrinfo
    socket.socket.connect = _loopback_connect
    socket.socket.connect_ex = _loopback_connect_ex
    os.chdir(tempfile.mkdtemp(prefix="shoal-loopback-only-cwd-"))
    sys.exit(main(sys.argv[1:]))
