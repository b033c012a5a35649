"""Where pulls and pushes may connect (issue 13, finding 3: SSRF through a model name).

No test here opens a connection to anything but loopback: `network` patches socket connect to
fail the test for any other address, and answers DNS from a table (never the real resolver).
The registries are small HTTP servers on loopback (or httpx's MockTransport, no sockets)."""
from __future__ import annotations

import hashlib
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from shoal.store import ModelStore
from shoal.store.egress import EgressPolicy, GuardedTransport, never_allowed
from shoal.store.errors import EgressRefusedError, RegistryError
from shoal.store.manifests import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MEDIA_MODEL
from shoal.store.registry import RegistryClient

WEIGHTS = b"GGUF egress test weights"
SECRET = "SECRET-FROM-THE-REMOTE-BODY"


# ---- the network: loopback only, DNS from a table ----------------------------------------------

@dataclass
class Network:
    dns: dict[str, Callable[[], list[str]]] = field(default_factory=dict)
    connects: list[tuple] = field(default_factory=list)

    def name(self, host: str, *addresses: str) -> None:
        self.dns[host] = lambda: list(addresses)


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Iterator[Network]:
    net = Network()
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        host = host.decode() if isinstance(host, bytes) else str(host)
        if host.lower() in net.dns or host.lower() == "localhost":
            addresses = net.dns[host.lower()]() if host.lower() in net.dns else ["127.0.0.1"]
            out = []
            for address in addresses:
                if ipaddress.ip_address(address).version == 6:
                    out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
                else:
                    out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
            return out
        # numbers only (127.0.0.1, 2852039166, ::1): never a query to a real resolver
        return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    def connect(sock, address):
        net.connects.append(address)
        if not ipaddress.ip_address(address[0]).is_loopback:
            pytest.fail(f"a test tried to connect to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield net
    assert all(ipaddress.ip_address(a[0]).is_loopback for a in net.connects), net.connects


# ---- a registry on loopback ---------------------------------------------------------------------

Answer = tuple[int, dict[str, str], bytes]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _serve(self) -> None:
        server: FakeRegistry = self.server.owner       # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        server.seen.append((self.command, path, dict(self.headers)))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        route = server.routes.get((self.command, path)) or server.routes.get(("*", path))
        status, headers, body = route(self) if callable(route) else route or (
            404, {"Content-Type": "application/json"},
            b'{"errors":[{"code":"NAME_UNKNOWN","message":"no such thing"}]}')
        self.send_response(status, headers.pop("X-Reason", None))
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = _serve


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def verify_request(self, request, client_address) -> bool:
        self.owner.connections += 1     # type: ignore[attr-defined]
        return True


class FakeRegistry:
    """An HTTP server on 127.0.0.1 answering `routes[(method, path)]` (an Answer or a function
    of the request handler); it counts connections and records requests."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[tuple[str, str], Answer | Callable[[_Handler], Answer]] = {}
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.connections = 0
        self._server = _CountingServer(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.owner = self       # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve_model(self, repo: str, tag: str) -> dict[str, str]:
        """A small valid model under repo:tag; returns {"manifest": path, "blob": path}."""
        config = json.dumps({"model_format": "gguf"}).encode()
        digests = {}
        for data in (config, WEIGHTS):
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            digests[data] = digest
            self.routes[("GET", f"/v2/{repo}/blobs/{digest}")] = (200, {}, data)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": digests[config], "size": len(config)},
            "layers": [{"mediaType": MEDIA_MODEL, "digest": digests[WEIGHTS], "size": len(WEIGHTS)}],
        }).encode()
        self.routes[("GET", f"/v2/{repo}/manifests/{tag}")] = (
            200, {"Content-Type": MANIFEST_MEDIA_TYPE}, manifest)
        return {"manifest": f"/v2/{repo}/manifests/{tag}", "blob": f"/v2/{repo}/blobs/{digests[WEIGHTS]}"}


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    fake = FakeRegistry()
    try:
        yield fake
    finally:
        fake.close()


def store_at(root: Path, *allow: str) -> ModelStore:
    return ModelStore(root, registry=RegistryClient(egress=EgressPolicy.parse(",".join(allow)),
                                                    retries=0))


# ---- the policy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["169.254.169.254", "169.254.0.1", "fe80::1", "fd00:ec2::254",
                                     "100.100.100.200", "::ffff:169.254.169.254", "::a9fe:a9fe",
                                     "64:ff9b::a9fe:a9fe"])
def test_link_local_and_metadata_addresses_are_refused_even_when_listed(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert never_allowed(ip)
    policy = EgressPolicy.parse(f"{address if ip.version == 4 else f'[{address}]'},metadata.test")
    assert policy.refusal("metadata.test", 80, ip)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.0.0.8", "172.16.5.4", "192.168.1.20",
                                     "100.64.1.1", "fc00::1", "fd12:3456::1", "0.0.0.0", "::",
                                     "224.0.0.1", "ff02::1", "240.0.0.1", "::ffff:10.0.0.1",
                                     "198.18.0.1"])
def test_private_loopback_and_reserved_addresses_need_the_allow_list(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert "SHOAL_REGISTRY_ALLOW" in EgressPolicy().refusal("reg.test", 5000, ip)
    for entry in ("reg.test:5000", "reg.test", f"[{address}]:5000" if ip.version == 6 else f"{address}:5000"):
        assert EgressPolicy.parse(entry).refusal("reg.test", 5000, ip) is None, entry
    assert EgressPolicy.parse("reg.test:5001").refusal("reg.test", 5000, ip)     # another port


def test_public_addresses_pass_and_bad_allow_entries_are_named() -> None:
    for address in ("93.184.216.34", "2606:4700::1"):
        assert EgressPolicy().refusal("example.com", 443, ipaddress.ip_address(address)) is None
    assert EgressPolicy.parse(" a.test:5000 , [::1]:6000,b.test ,").allowed == frozenset(
        {("a.test", 5000), ("::1", 6000), ("b.test", None)})
    for bad in ("host:port", "host:70000", "http://host", "a b", "[::1]x"):
        with pytest.raises(ValueError, match="entry|port"):
            EgressPolicy.parse(bad)


# ---- refusals never connect ---------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "169.254.169.254/latest/meta-data:x", "169.254.169.254:80/a/b", "2852039166/a/b",
    "metadata.google.internal/computemetadata/v1", "metadata.test/a/b", "fd00-ec2.test/a/b",
    "10.0.0.8:5000/a/b", "192.168.1.20/a/b", "172.16.5.4/a/b", "100.64.1.1/a/b",
    "private.test/a/b", "linklocal6.test/a/b", "mixed.test/a/b", "localhost:1/a/b"])
@pytest.mark.parametrize("insecure", [False, True])
def test_refused_registries_are_never_connected_to(network: Network, tmp_path: Path, name: str,
                                                   insecure: bool) -> None:
    network.name("metadata.test", "169.254.169.254")
    network.name("fd00-ec2.test", "fd00:ec2::254")
    network.name("private.test", "10.1.2.3")
    network.name("linklocal6.test", "fe80::1")
    network.name("mixed.test", "93.184.216.34", "10.0.0.1")   # one public address is not enough
    # the allow list never opens link-local or metadata addresses
    store = store_at(tmp_path / "store", "169.254.169.254", "metadata.test", "linklocal6.test",
                     "metadata.google.internal", "[fd00:ec2::254]")
    with pytest.raises(EgressRefusedError, match="refusing to connect to"):
        store.check_destination(name, insecure)
    with pytest.raises(EgressRefusedError, match="refusing to connect to"):
        store.pull(name, insecure=insecure)
    assert store.list() == [] and network.connects == []


def test_a_push_to_a_refused_registry_sends_nothing(network: Network, registry: FakeRegistry,
                                                    tmp_path: Path) -> None:
    registry.serve_model("team/model", "v1")
    store = store_at(tmp_path / "store", registry.host)
    store.pull(f"{registry.host}/team/model:v1")
    network.connects.clear()
    for target in ("169.254.169.254/team/model:v1", "10.0.0.8:5000/team/model:v1",
                   f"127.0.0.1:{registry.port + 1}/team/model:v1"):
        store.copy(f"{registry.host}/team/model:v1", target)
        with pytest.raises(EgressRefusedError):
            store.push(target, insecure=True)
    assert network.connects == []


def test_a_loopback_registry_needs_the_allow_list(network: Network, registry: FakeRegistry,
                                                  tmp_path: Path) -> None:
    registry.serve_model("team/model", "v1")
    name = f"{registry.host}/team/model:v1"
    with pytest.raises(EgressRefusedError, match=r"SHOAL_REGISTRY_ALLOW"):
        store_at(tmp_path / "refused").pull(name)
    assert registry.connections == 0
    # an address entry admits any name that resolves to it; a name entry, that name
    local = f"localhost:{registry.port}/team/model:v1"
    for allow, pulled in ((registry.host, name), ("127.0.0.1", name), (registry.host, local),
                          (f"localhost:{registry.port}", local)):
        store = store_at(tmp_path / f"{allow}-{pulled}".replace(":", "_").replace("/", "_"), allow)
        store.pull(pulled)
        assert store.resolve(pulled).weights.read_bytes() == WEIGHTS
    with pytest.raises(EgressRefusedError):
        store_at(tmp_path / "by-name", f"localhost:{registry.port}").pull(name)


def test_connections_go_to_the_address_that_was_checked(network: Network, registry: FakeRegistry,
                                                        tmp_path: Path) -> None:
    registry.serve_model("team/model", "v1")
    answer = ["127.0.0.1"]
    network.dns["rebind.test"] = lambda: answer
    store = store_at(tmp_path / "store", f"rebind.test:{registry.port}")
    name = f"rebind.test:{registry.port}/team/model:v1"
    store.check_destination(name, insecure=True)
    store.pull(name, insecure=True)     # the name, not the address, reaches the server
    assert {c[0] for c in network.connects} == {"127.0.0.1"}
    assert all(h.get("Host") == f"rebind.test:{registry.port}" for _, _, h in registry.seen)
    # the name now answers with the metadata address: refused at connect time (DNS rebinding)
    answer[0], count = "169.254.169.254", len(network.connects)
    with pytest.raises(EgressRefusedError, match="metadata"):
        store_at(tmp_path / "second", f"rebind.test:{registry.port}").pull(name, insecure=True)
    assert len(network.connects) == count


def test_tls_checks_the_name_while_connecting_to_the_checked_address(network: Network,
                                                                    tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=tls.test", "-addext", "subjectAltName=DNS:tls.test"],
                   check=True, capture_output=True)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    names_sent: list[str | None] = []
    server_tls.sni_callback = lambda _sock, name, _ctx: names_sent.append(name)
    registry = FakeRegistry(tls=server_tls)
    try:
        registry.serve_model("team/model", "v1")
        network.name("tls.test", "127.0.0.1")
        network.name("other.test", "127.0.0.1")
        policy = EgressPolicy.parse("127.0.0.1")
        trusting = ssl.create_default_context(cafile=str(cert))

        def store(root: str, tls: ssl.SSLContext | None = None) -> ModelStore:
            return ModelStore(tmp_path / root, registry=RegistryClient(
                transport=GuardedTransport(policy, tls), retries=0))

        name = f"tls.test:{registry.port}/team/model:v1"
        store("ok", trusting).pull(name)
        assert set(names_sent) == {"tls.test"}
        assert {c[0] for c in network.connects} == {"127.0.0.1"}
        # the certificate is verified: an unknown CA, or the right CA for another name, fails
        with pytest.raises(RegistryError, match="cannot reach"):
            store("untrusted").pull(name)
        with pytest.raises(RegistryError, match="cannot reach .*Hostname mismatch"):
            store("other-name", trusting).pull(f"other.test:{registry.port}/team/model:v1")
        assert names_sent[-1] == "other.test"
    finally:
        registry.close()


# ---- redirects, the token realm, the upload location ---------------------------------------------

def _redirect(location: str, status: int = 307) -> Answer:
    return (status, {"Location": location}, b"")


def test_redirects_on_the_registry_host_are_followed(network: Network, registry: FakeRegistry,
                                                     tmp_path: Path) -> None:
    paths = registry.serve_model("team/model", "v1")
    registry.routes[("GET", "/moved/blob")] = registry.routes.pop(("GET", paths["blob"]))
    registry.routes[("GET", paths["blob"])] = _redirect("/moved/blob")
    store = store_at(tmp_path / "store", registry.host)
    store.pull(f"{registry.host}/team/model:v1")
    assert ("GET", "/moved/blob") in [(m, p) for m, p, _ in registry.seen]


@pytest.mark.parametrize("location, error", [
    ("http://localhost:{other}/v2/x", "another host over plain http"),
    ("http://169.254.169.254/latest/meta-data/", "another host over plain http"),
    ("https://169.254.169.254/latest/meta-data/", "cloud metadata address"),
    ("https://private.test/blob", "private, loopback"),
    ("https://linklocal6.test/blob", "link-local"),
    ("file:///etc/passwd", "not an http"),
])
def test_redirects_may_not_leave_the_registry(network: Network, registry: FakeRegistry,
                                              tmp_path: Path, location: str, error: str) -> None:
    network.name("private.test", "10.1.2.3")
    network.name("linklocal6.test", "fe80::1")
    other = FakeRegistry()
    try:
        paths = registry.serve_model("team/model", "v1")
        registry.routes[("GET", paths["manifest"])] = _redirect(location.format(other=other.port), 302)
        store = store_at(tmp_path / "store", registry.host)
        with pytest.raises(RegistryError, match=error):
            store.pull(f"{registry.host}/team/model:v1")
        assert other.connections == 0 and store.list() == []
        assert {c[0] for c in network.connects} == {"127.0.0.1"}
    finally:
        other.close()


def test_endless_redirects_end(network: Network, registry: FakeRegistry, tmp_path: Path) -> None:
    paths = registry.serve_model("team/model", "v1")
    registry.routes[("GET", paths["manifest"])] = _redirect(paths["manifest"])
    with pytest.raises(RegistryError, match="redirected more than"):
        store_at(tmp_path / "store", registry.host).pull(f"{registry.host}/team/model:v1")


@pytest.mark.parametrize("realm, error", [
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "another host over plain http"),
    ("https://169.254.169.254/token", "cloud metadata address"),
    ("https://metadata.google.internal/token", "cloud metadata service"),
    ("http://localhost:{other}/token", "another host over plain http"),
    ("not a url at all", "not an http"),
])
def test_the_token_realm_may_not_leave_the_registry(network: Network, registry: FakeRegistry,
                                                    tmp_path: Path, realm: str, error: str) -> None:
    other = FakeRegistry()
    try:
        paths = registry.serve_model("team/model", "v1")
        challenge = f'Bearer realm="{realm.format(other=other.port)}",service="x"'
        registry.routes[("GET", paths["manifest"])] = (401, {"WWW-Authenticate": challenge}, b"")
        with pytest.raises(RegistryError, match=error):
            store_at(tmp_path / "store", registry.host).pull(f"{registry.host}/team/model:v1")
        assert other.connections == 0
    finally:
        other.close()


def test_a_push_upload_location_may_not_leave_the_registry(network: Network, registry: FakeRegistry,
                                                           tmp_path: Path) -> None:
    registry.serve_model("team/model", "v1")
    store = store_at(tmp_path / "store", registry.host)
    store.pull(f"{registry.host}/team/model:v1")
    store.copy(f"{registry.host}/team/model:v1", f"{registry.host}/team/pushed:v1")
    registry.routes[("POST", "/v2/team/pushed/blobs/uploads/")] = (
        202, {"Location": "http://169.254.169.254/latest/user-data"}, b"")
    with pytest.raises(RegistryError, match="a blob upload .* another host over plain http"):
        store.push(f"{registry.host}/team/pushed:v1")
    assert not any(m == "PUT" for m, _, _ in registry.seen)


def test_the_token_stays_on_the_registry_and_blobs_may_come_from_an_https_cdn(tmp_path: Path) -> None:
    """Docker's flow with blob storage elsewhere, on httpx's MockTransport (no sockets at all)."""
    config = json.dumps({"model_format": "gguf"}).encode()
    blobs = {"sha256:" + hashlib.sha256(d).hexdigest(): d for d in (config, WEIGHTS)}
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": next(iter(blobs)), "size": len(config)},
        "layers": [{"mediaType": MEDIA_MODEL, "digest": list(blobs)[1], "size": len(WEIGHTS)}]}).encode()
    seen: list[tuple[str, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        url = request.url
        if url.host == "auth.example":
            return httpx.Response(200, json={"token": "T0KEN"})
        if url.host == "cdn.example":
            return httpx.Response(200, content=blobs[url.params["d"]])
        if request.headers.get("authorization") != "Bearer T0KEN":
            return httpx.Response(401, headers={
                "WWW-Authenticate": 'Bearer realm="https://auth.example/token",scope="pull"'})
        if "/manifests/" in url.path:
            return httpx.Response(200, content=manifest, headers={"Content-Type": MANIFEST_MEDIA_TYPE})
        digest = url.path.rsplit("/", 1)[1]
        return httpx.Response(307, headers={"Location": f"https://cdn.example/b?d={digest}"})

    store = ModelStore(tmp_path / "store",
                       registry=RegistryClient(transport=httpx.MockTransport(answer)))
    store.pull("registry.example/team/model:v1")
    assert store.resolve("registry.example/team/model:v1").weights.read_bytes() == WEIGHTS
    assert all(auth is None for url, auth in seen if not url.startswith("https://registry.example/"))
    assert any(url.startswith("https://cdn.example/") for url, _ in seen)

    # https -> http on the registry's own host is a downgrade, not followed
    def downgrade(request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "http":
            pytest.fail("followed a downgrade to http")
        return httpx.Response(301, headers={"Location": f"http://registry.example{request.url.path}"})

    store.registry = RegistryClient(transport=httpx.MockTransport(downgrade))
    with pytest.raises(RegistryError, match="downgrade from https to http"):
        store.pull("registry.example/team/other:v1")


# ---- errors carry the status, never the body ---------------------------------------------------

@pytest.mark.parametrize("answer, shown", [
    ((500, {"Content-Type": "text/html", "X-Reason": SECRET}, f"<html>{SECRET}</html>".encode()),
     "HTTP 500 Internal Server Error"),
    ((403, {"Content-Type": "application/json"},
      json.dumps({"errors": [{"code": "DENIED", "message": SECRET, "detail": SECRET}]}).encode()),
     "HTTP 403 Forbidden (DENIED)"),
    ((400, {}, json.dumps({"errors": [{"code": SECRET.lower(), "message": "x"}]}).encode()),
     "HTTP 400 Bad Request"),
    ((599, {}, SECRET.encode() * 1000), "HTTP 599"),
])
def test_a_registry_error_body_is_not_echoed(network: Network, registry: FakeRegistry,
                                             tmp_path: Path, answer: Answer, shown: str) -> None:
    paths = registry.serve_model("team/model", "v1")
    registry.routes[("GET", paths["manifest"])] = answer
    with pytest.raises(RegistryError) as info:
        store_at(tmp_path / "store", registry.host).pull(f"{registry.host}/team/model:v1")
    message = str(info.value)
    assert message.endswith(shown) and SECRET not in message and SECRET.lower() not in message


def test_an_unusual_auth_scheme_is_not_echoed(network: Network, registry: FakeRegistry,
                                              tmp_path: Path) -> None:
    paths = registry.serve_model("team/model", "v1")
    registry.routes[("GET", paths["manifest"])] = (401, {"WWW-Authenticate": f"{SECRET} x=1"}, b"")
    with pytest.raises(RegistryError, match="asks for an unnamed authentication") as info:
        store_at(tmp_path / "store", registry.host).pull(f"{registry.host}/team/model:v1")
    assert SECRET not in str(info.value)
    token = f"http://{registry.host}/token"
    registry.routes[("GET", paths["manifest"])] = (401, {"WWW-Authenticate": f'Bearer realm="{token}"'}, b"")
    registry.routes[("GET", "/token")] = (403, {}, SECRET.encode())
    with pytest.raises(RegistryError, match=r"refused an anonymous token .*HTTP 403") as info:
        store_at(tmp_path / "store", registry.host).pull(f"{registry.host}/team/model:v1")
    assert SECRET not in str(info.value)
