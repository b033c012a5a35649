"""What the server answers before any route runs: the Host names it serves (DNS rebinding) and
how many connections it holds open at once."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import ollama
import pytest
from live_server import LiveServer

from shoal.http.connection_limits import RESERVED_FDS, fitting_cap
from shoal.http.hosts import AllowedHosts, host_of

CAP = 8


@pytest.fixture(scope="module")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("hosts") / "serve.log"
    server = LiveServer(smollm2_path, "--max-model-len", "512", "--kv-cache-bytes", "32MiB",
                        env={"SHOAL_MAX_CONNECTIONS": str(CAP),
                             "SHOAL_ALLOWED_HOSTS": "myhost.lan, *.corp.example"}, log_path=log)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _get(server: LiveServer, path: str, host: str) -> httpx.Response:
    return httpx.get(server.url + path, headers={"Host": host}, timeout=30)


# ---- DNS rebinding ------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example",
                                  "127.0.0.1.nip.io", "corp.example", "myhost.lan.evil.example",
                                  "internal.evil.example"])
def test_a_page_that_rebinds_its_name_to_loopback_gets_403(server: LiveServer, host: str) -> None:
    host = host.format(port=server.port)
    ollama_reply = _get(server, "/api/tags", host)
    assert ollama_reply.status_code == 403
    assert "DNS rebinding" in ollama_reply.json()["error"]
    openai_reply = _get(server, "/v1/models", host)
    assert openai_reply.status_code == 403 and openai_reply.json()["error"]["code"] == "host_not_allowed"
    for path in ("/health", "/metrics"):
        assert _get(server, path, host).status_code == 403
    generate = httpx.post(server.url + "/api/generate", headers={"Host": host}, timeout=30,
                          json={"model": "smollm2", "prompt": "Hi", "stream": False})
    assert generate.status_code == 403 and "response" not in generate.json()


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.", "[::1]:{port}",
                                  "app.localhost", "192.168.1.20", "myhost.lan", "a.b.corp.example",
                                  "host.docker.internal:{port}", "printer.local", socket.gethostname()])
def test_local_names_ip_addresses_and_listed_names_are_served(server: LiveServer, host: str) -> None:
    reply = _get(server, "/api/tags", host.format(port=server.port))
    assert reply.status_code == 200 and "models" in reply.json()


def test_real_clients_are_served(server: LiveServer) -> None:
    assert ollama.Client(host=server.url).list().models
    assert ollama.Client(host=f"http://localhost:{server.port}").list().models


def test_who_checks_host_names() -> None:
    assert host_of("[::1]:11434") == "::1" and host_of("Example.COM.:80") == "example.com"
    assert host_of("::1") == "::1" and host_of("") == ""
    # as Ollama: a server on other addresses checks nothing unless names are given
    assert AllowedHosts.for_server("0.0.0.0", None) is None
    assert AllowedHosts.for_server("127.0.0.1", "*") is None
    listed = AllowedHosts.for_server("0.0.0.0", "api.example")
    assert listed is not None and listed.allows("api.example") and not listed.allows("evil.example")
    loopback = AllowedHosts.for_server("::1", None)
    assert loopback is not None and loopback.allows("localhost") and not loopback.allows("evil.example")


# ---- the connection cap -------------------------------------------------------------------------

def test_connections_beyond_the_cap_get_503_with_retry_after_and_a_warning(server: LiveServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(CAP)]
    try:
        time.sleep(0.5)
        for path, dialect in (("/api/tags", "ollama"), ("/v1/models", "openai")):
            reply = httpx.get(server.url + path, timeout=30)
            assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
            error = reply.json()["error"]
            message = error if dialect == "ollama" else error["message"]
            assert "SHOAL_MAX_CONNECTIONS" in message
        # a connection beyond the cap that sends nothing is not kept either
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            extra.settimeout(10)
            started = time.monotonic()
            assert extra.recv(100) == b""
            assert time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/api/tags", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the server did not recover once the idle connections left"
        time.sleep(0.2)
    log = server.log_path.read_text(errors="replace")
    assert "WARNING shoal.http.connection_limits: refused" in log and "(SHOAL_MAX_CONNECTIONS)" in log


def test_the_open_file_limit_is_raised_and_the_cap_fits_it(server: LiveServer) -> None:
    limits = Path(f"/proc/{server.process.pid}/limits").read_text()
    soft, hard = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
    assert soft == hard
    assert fitting_cap(1024, None) == 1024 and fitting_cap(1024, 4096) == 1024
    assert fitting_cap(1024, 1024) == 1024 - RESERVED_FDS
