"""Pull and push against a real OCI registry: Debian's `docker-registry` (the CNCF distribution
registry) on loopback, with the real SmolLM2 model, a real `shoal serve`, the official
`ollama` client and the `shoal` command line."""
from __future__ import annotations

import filecmp
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import ollama
import pytest

from live_server import LiveServer, free_port
from shoal.core.errors import UnknownModelError
from shoal.store import ModelStore, parse_name
from shoal.store.errors import RegistryError
from shoal.store.manifests import (CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MEDIA_LICENSE,
                                   MEDIA_MODEL)
from shoal.store.egress import EgressPolicy, GuardedTransport
from shoal.store.registry import RegistryClient, base_url, repository

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
PIRATE_SYSTEM = "You are a pirate. Answer in one short sentence."
_ACCESS_LOG_RE = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) (\d+)')


# ---- a real registry ----------------------------------------------------------------------

@dataclass
class Registry:
    host: str              # 127.0.0.1:<port>
    storage: Path          # its filesystem storage root
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def requests(self) -> list[tuple[str, str, int, int]]:
        """(method, path, status, bytes written) of every request in its access log so far."""
        text = self.log_path.read_text(errors="replace")
        return [(m, path.split("?", 1)[0], int(status), int(size))
                for m, path, status, size in _ACCESS_LOG_RE.findall(text)]

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, path, _, _ in self.requests() if m == method and fragment in path)

    def blob_file(self, digest: str) -> Path:
        hex_ = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not os.access(REGISTRY_BIN, os.X_OK):
        pytest.skip("the CNCF distribution registry is not installed "
                    "(`apt-get install -y docker-registry` provides /usr/bin/docker-registry)")
    folder = tmp_path_factory.mktemp("registry")
    port = free_port()
    (folder / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'storage'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    log_path = folder / "registry.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([REGISTRY_BIN, "serve", str(folder / "config.yml")],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"docker-registry did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Registry(f"127.0.0.1:{port}", folder / "storage", log_path)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def allowing(*hosts: str, **kwargs) -> RegistryClient:
    """A registry client that may reach these loopback hosts (the server's SHOAL_REGISTRY_ALLOW)."""
    return RegistryClient(egress=EgressPolicy.parse(",".join(hosts)), **kwargs)


@pytest.fixture(scope="module")
def server(registry: Registry, smollm2_path: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A `shoal serve` whose store (`server.store_dir`) starts empty; it may reach `registry`
    (and no other loopback port)."""
    folder = tmp_path_factory.mktemp("registry-server")
    live = LiveServer(smollm2_path, "--max-model-len", "1024", "--kv-cache-bytes", "64MiB",
                      env={"SHOAL_MODELS": str(folder / "store"),
                           "SHOAL_REGISTRY_ALLOW": registry.host},
                      log_path=folder / "serve.log")
    live.store_dir = folder / "store"
    try:
        yield live.wait_ready()
    finally:
        live.stop()


def upload_model(registry: Registry, repo: str, tag: str, layers: list[tuple[str, bytes]]) -> bytes:
    """Puts a model straight into the registry over its HTTP API (test set-up, not shoal's
    client); returns the manifest's bytes."""
    config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()

    def put_blob(data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        start = httpx.post(f"{registry.url}/v2/{repo}/blobs/uploads/")
        assert start.status_code == 202, start.text
        done = httpx.put(httpx.URL(start.headers["location"]).copy_merge_params({"digest": digest}),
                         content=data)
        assert done.status_code == 201, done.text
        return {"digest": digest, "size": len(data)}

    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
                "config": {"mediaType": CONFIG_MEDIA_TYPE, **put_blob(config)},
                "layers": [{"mediaType": media, **put_blob(data)} for media, data in layers]}
    data = json.dumps(manifest).encode()
    answer = httpx.put(f"{registry.url}/v2/{repo}/manifests/{tag}", content=data,
                       headers={"Content-Type": MANIFEST_MEDIA_TYPE})
    assert answer.status_code == 201, answer.text
    return data


def store_files(store: ModelStore) -> list[str]:
    """Every blob, partial and manifest file in the store (what a failed pull must not change)."""
    return sorted(str(p.relative_to(store.root)) for folder in ("blobs", "manifests")
                  for p in (store.root / folder).rglob("*") if p.is_file())


def statuses(events: list) -> list[str]:
    """The status lines that are not byte counts."""
    return [e["status"] for e in events if "completed" not in e]


# ---- faults on the wire -------------------------------------------------------------------

class _DropAfter(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, limit: int) -> None:
        self.inner, self.limit = inner, limit

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for chunk in self.inner:
            if sent + len(chunk) >= self.limit:
                yield chunk[: self.limit - sent]
                raise httpx.ReadError("connection dropped by the test")
            sent += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


class WireTap(GuardedTransport):
    """Real HTTP (to loopback, which it may reach); records the Range header of every blob GET, and drops the connection once,
    `drop_after` bytes into the first GET of `drop_digest`."""

    def __init__(self, drop_digest: str | None = None, drop_after: int = 0) -> None:
        super().__init__(EgressPolicy.parse("127.0.0.1"))
        self.drop_digest, self.drop_after = drop_digest, drop_after
        self.blob_gets: list[tuple[str, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "GET" and "/blobs/" in request.url.path:
            digest = request.url.path.rsplit("/", 1)[-1]
            self.blob_gets.append((digest, request.headers.get("range")))
            if digest == self.drop_digest:
                self.drop_digest = None
                return httpx.Response(response.status_code, headers=response.headers,
                                      stream=_DropAfter(response.stream, self.drop_after),
                                      extensions=response.extensions)
        return response


# ---- round trips --------------------------------------------------------------------------

def test_push_then_pull_into_an_empty_store_gives_the_same_model(registry, server, smollm2_path,
                                                                  tmp_path) -> None:
    name = f"{registry.host}/team/pirate:v1"
    source = ModelStore(tmp_path / "source", registry=allowing(registry.host))
    source.create(name, f"FROM {smollm2_path}\nSYSTEM {PIRATE_SYSTEM}\nPARAMETER temperature 0\n"
                        "PARAMETER num_predict 8\n")
    manifest, data, _ = source.manifests.read(parse_name(name))
    digests = {layer.digest for layer in (*manifest.layers, manifest.config)}

    events: list[dict] = []
    source.push(name, progress=events.append)
    assert statuses(events) == ["retrieving manifest", "pushing manifest", "success"]
    finished = {e["digest"] for e in events if "completed" in e and e["completed"] == e["total"]}
    assert finished == digests
    assert all(e["status"] == "pushing " + e["digest"][7:19] for e in events if "digest" in e)
    assert registry.count("POST", "/v2/team/pirate/blobs/uploads/") == len(digests)

    # a second push finds every blob there (HEAD) and uploads nothing
    heads = registry.count("HEAD", "/v2/team/pirate/blobs/")
    events.clear()
    source.push(name, progress=events.append)
    assert registry.count("POST", "/v2/team/pirate/blobs/uploads/") == len(digests)
    assert registry.count("HEAD", "/v2/team/pirate/blobs/") == heads + len(digests)
    assert all(e["completed"] == e["total"] for e in events if "completed" in e)

    # pulled into the server's store (empty until now): same manifest bytes, same blob bytes
    target = ModelStore(server.store_dir, registry=allowing(registry.host))
    assert target.list() == []
    events.clear()
    target.pull(name, progress=events.append)
    assert statuses(events) == ["pulling manifest", "verifying sha256 digest", "writing manifest",
                                "success"]
    assert target.manifests.read(parse_name(name))[1] == data
    for digest in digests:
        assert filecmp.cmp(source.blobs.path(digest), target.blobs.path(digest), shallow=False)
    assert {e["digest"] for e in events if e.get("completed") == e.get("total") and "digest" in e} \
        == digests

    # ... and it answers through the server, with its SYSTEM and PARAMETERs
    client = ollama.Client(host=server.url, timeout=300)
    shown = httpx.post(f"{server.url}/api/show", json={"model": name}, timeout=60).json()
    assert shown["system"] == PIRATE_SYSTEM and "num_predict" in shown["parameters"]
    reply = client.generate(model=name, prompt="Where is the treasure?", keep_alive=0)
    assert reply.done and 0 < reply.eval_count <= 8 and reply.response.strip()


def test_push_and_pull_through_the_api_with_the_ollama_client(registry, server, smollm2_path) -> None:
    client = ollama.Client(host=server.url, timeout=300)
    name = f"{registry.host}/web/parrot:v2"
    client.create(model=name, from_=str(smollm2_path), system="Repeat what you hear.",
                  parameters={"num_predict": 4, "temperature": 0})

    events = list(client.push(name, insecure=True, stream=True))
    assert events[0].status == "retrieving manifest"
    assert [e.status for e in events[-2:]] == ["pushing manifest", "success"]
    layers = [e for e in events if e.digest]
    assert layers and all(e.status == f"pushing {e.digest[7:19]}" for e in layers)
    assert any(e.completed == e.total and e.total > 90_000_000 for e in layers)   # the weights
    # one JSON object with stream: false
    one = httpx.post(f"{server.url}/api/push", json={"model": name, "stream": False, "insecure": True},
                     timeout=120)
    assert one.status_code == 200 and one.json() == {"status": "success"}

    client.delete(name)
    assert name not in {m.model for m in client.list().models}
    events = list(client.pull(name, insecure=True, stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    assert "writing manifest" in [e.status for e in events]
    assert name in {m.model for m in client.list().models}
    reply = client.generate(model=name, prompt="Hello there", keep_alive=0)
    assert reply.done and 0 < reply.eval_count <= 4

    # errors in Ollama's shape
    unknown = f"{registry.host}/web/parrot:no-such-tag"
    missing = httpx.post(f"{server.url}/api/pull", json={"model": unknown, "stream": False}, timeout=60)
    assert missing.status_code == 404 and missing.json() == {"error": f"model '{unknown}' not found"}
    lines = [json.loads(line) for line in httpx.post(
        f"{server.url}/api/pull", json={"model": unknown}, timeout=60).text.splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and "not found" in lines[-1]["error"]
    not_stored = httpx.post(f"{server.url}/api/push", json={"model": "never-created"}, timeout=60)
    assert not_stored.status_code == 404 and "never-created" in not_stored.json()["error"]


def test_the_server_refuses_registries_its_allow_list_lacks(registry, server, smollm2_path) -> None:
    """SHOAL_REGISTRY_ALLOW names `registry` only: another loopback port is refused with a 400
    in Ollama's shape before any progress, streamed or not, and is never connected to."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0)
    port = listener.getsockname()[1]
    try:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            name = f"{host}/team/elsewhere:v1"
            for stream in (False, True):
                answer = httpx.post(f"{server.url}/api/pull", json={"model": name, "stream": stream},
                                    timeout=60)
                assert answer.status_code == 400, answer.text
                error = answer.json()["error"]
                assert error.startswith(f"refusing to connect to {host.split(':')[0]}:{port}") and \
                    "SHOAL_REGISTRY_ALLOW" in error
        # a push: the model exists, its registry is refused
        name = f"127.0.0.1:{port}/team/elsewhere:v1"
        created = httpx.post(f"{server.url}/api/create", json={"model": name, "from": str(smollm2_path),
                                                               "stream": False}, timeout=120)
        assert created.status_code == 200, created.text
        for stream in (False, True):
            pushed = httpx.post(f"{server.url}/api/push",
                                json={"model": name, "stream": stream, "insecure": True}, timeout=60)
            assert pushed.status_code == 400 and "refusing to connect" in pushed.json()["error"]
        httpx.request("DELETE", f"{server.url}/api/delete", json={"model": name}, timeout=60)
        # a create FROM a refused registry
        made = httpx.post(f"{server.url}/api/create", json={
            "model": "from-elsewhere", "from": f"127.0.0.1:{port}/team/base:v1", "stream": False},
            timeout=60)
        assert made.status_code == 400 and "refusing to connect" in made.json()["error"]
        with pytest.raises(BlockingIOError):
            listener.accept()           # no connection ever reached the refused port
    finally:
        listener.close()
    # the allowed registry is reached: it answers that it lacks the tag
    missing = httpx.post(f"{server.url}/api/pull",
                         json={"model": f"{registry.host}/team/none:v9", "stream": False}, timeout=60)
    assert missing.status_code == 404


def test_cli_push_and_pull_print_progress(registry, server, smollm2_path, tmp_path) -> None:
    client = ollama.Client(host=server.url, timeout=300)
    name = f"{registry.host}/cli/pirate:v3"
    client.create(model=name, from_=str(smollm2_path), system=PIRATE_SYSTEM)
    env = {**os.environ, "SHOAL_HOST": server.url, "SHOAL_HOME": str(tmp_path),
           "SHOAL_NO_AUTOSTART": "1"}

    def shoal(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True,
                              text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)

    pushed = shoal("push", name, "--insecure")
    assert pushed.returncode == 0, pushed.stderr
    lines = pushed.stderr.splitlines()
    assert lines[0] == "retrieving manifest" and lines[-2:] == ["pushing manifest", "success"]
    assert any(re.fullmatch(r"pushing [0-9a-f]{12}: 100% \d{8,} bytes", line) for line in lines)

    client.delete(name)
    pulled = shoal("pull", name, "--insecure")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stderr.splitlines()[-1] == "success"
    assert name in {m.model for m in client.list().models}

    failed = shoal("pull", f"{registry.host}/cli/pirate:nope")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == \
        f"shoal: pulling '{registry.host}/cli/pirate:nope': model '{registry.host}/cli/pirate:nope' not found"


# ---- resumes and failures -----------------------------------------------------------------

def test_an_interrupted_download_resumes_with_a_range_request(registry, tmp_path) -> None:
    weights = random.Random(7).randbytes(3 << 20)
    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    upload_model(registry, "resume/model", "v1", [(MEDIA_MODEL, weights)])
    name = f"{registry.host}/resume/model:v1"

    # the connection drops 1.5 MiB into the weights and the client may not retry: the pull
    # fails, no model appears, the bytes so far stay in the partial file
    store = ModelStore(tmp_path / "store",
                       registry=RegistryClient(transport=WireTap(digest, 3 << 19), retries=0))
    with pytest.raises(RegistryError, match="interrupted after .* pull again to resume"):
        store.pull(name)
    assert store.list() == []
    have = store.blobs.partial_size(digest)
    assert 0 < have < len(weights) and not store.blobs.has(digest)

    # the next pull asks only for the rest, and the registry sent only the rest
    tap = WireTap()
    store.registry = RegistryClient(transport=tap)
    store.pull(name)
    assert (digest, f"bytes={have}-") in tap.blob_gets
    ranged = [r for r in registry.requests() if r[0] == "GET" and r[1].endswith(digest) and r[2] == 206]
    assert ranged[-1][3] == len(weights) - have
    assert store.blobs.verify(digest) and store.blobs.partial_size(digest) == 0
    assert [m.name for m in store.list()] == [parse_name(name).display]

    # with retries allowed (the default), one pull resumes by itself after a drop
    tap = WireTap(digest, 1 << 20)
    other = ModelStore(tmp_path / "other", registry=RegistryClient(transport=tap))
    other.pull(name)
    gets = [r for d, r in tap.blob_gets if d == digest]
    assert gets[0] is None and gets[1] is not None and gets[1].startswith("bytes=")
    assert other.blobs.verify(digest)


def test_a_pull_does_not_trust_a_changed_blob(registry, tmp_path) -> None:
    """A blob already in the store is skipped only if its bytes are right: one changed on disk
    (same size, so a size check passes) is fetched again, and the pull repairs it instead of
    reporting success over tampered weights."""
    weights = random.Random(13).randbytes(1 << 20)
    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    upload_model(registry, "tamper/model", "v1", [(MEDIA_MODEL, weights)])
    name = f"{registry.host}/tamper/model:v1"
    tap = WireTap()
    store = ModelStore(tmp_path / "store", registry=RegistryClient(transport=tap))
    store.pull(name)
    blob = store.blobs.path(digest)
    assert blob.stat().st_mode & 0o777 == 0o444          # blobs are read-only

    # an unchanged blob is not fetched again
    store.pull(name)
    assert [d for d, _ in tap.blob_gets].count(digest) == 1

    os.chmod(blob, 0o644)                                # changed in place by someone
    with open(blob, "r+b") as f:
        f.write(b"EVIL")
    assert store.verify(name) == [digest]
    store.pull(name)
    assert [d for d, _ in tap.blob_gets].count(digest) == 2
    assert store.verify(name) == [] and blob.read_bytes() == weights
    assert blob.stat().st_mode & 0o777 == 0o444


def test_failed_pulls_and_pushes_leave_the_store_untouched(registry, tmp_path) -> None:
    store = ModelStore(tmp_path / "store", registry=allowing("127.0.0.1"))
    upload_model(registry, "fail/good", "v1", [(MEDIA_MODEL, b"GGUF good weights")])
    store.pull(f"{registry.host}/fail/good:v1")
    before = store_files(store)

    # a blob whose bytes changed in the registry's storage (same size): refused, nothing kept
    weights = b"GGUF weights that will be corrupted"
    upload_model(registry, "fail/corrupt", "v1", [(MEDIA_MODEL, weights)])
    blob = registry.blob_file("sha256:" + hashlib.sha256(weights).hexdigest())
    blob.write_bytes(weights.replace(b"GGUF", b"FUGG"))
    with pytest.raises(RegistryError, match="wrong content .*content has digest"):
        store.pull(f"{registry.host}/fail/corrupt:v1")
    assert store_files(store) == before

    with pytest.raises(UnknownModelError):
        store.pull(f"{registry.host}/fail/good:no-such-tag")
    upload_model(registry, "fail/license-only", "v1", [(MEDIA_LICENSE, b"just a license")])
    with pytest.raises(RegistryError, match="is not a model"):
        store.pull(f"{registry.host}/fail/license-only:v1")
    with pytest.raises(RegistryError, match=r"cannot reach the registry 127\.0\.0\.1:\d+"):
        store.pull(f"127.0.0.1:{free_port()}/fail/good:v1")
    assert store_files(store) == before

    with pytest.raises(UnknownModelError):
        store.push(f"{registry.host}/fail/never-made:v1")
    nowhere = f"127.0.0.1:{free_port()}/fail/good:v1"
    store.copy(f"{registry.host}/fail/good:v1", nowhere)
    with pytest.raises(RegistryError, match="cannot reach"):
        store.push(nowhere)


def test_plain_names_go_to_ollamas_registry_with_a_clear_error_offline(tmp_path) -> None:
    def offline(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)

    store = ModelStore(tmp_path / "store", registry=RegistryClient(transport=httpx.MockTransport(offline)))
    with pytest.raises(RegistryError) as info:
        store.pull("llama3.2:1b")
    message = str(info.value)
    assert "registry.ollama.ai" in message and "llama3.2:1b" in message and "PyPI" in message
    assert store.list() == []


def test_registry_urls() -> None:
    assert base_url(parse_name("localhost:5000/team/m:v1")) == "http://localhost:5000"
    assert base_url(parse_name("127.0.0.1:5000/m")) == "http://127.0.0.1:5000"
    assert base_url(parse_name("example.com/team/m")) == "https://example.com"
    assert base_url(parse_name("example.com/team/m"), insecure=True) == "http://example.com"
    assert base_url(parse_name("llama3")) == "https://registry.ollama.ai"
    assert repository(parse_name("llama3")) == "library/llama3"
    assert repository(parse_name("example.com/Team/MyModel:V1")) == "team/mymodel"


# ---- a token-protected registry -----------------------------------------------------------

class _Gate(BaseHTTPRequestHandler):
    """Docker's token flow in front of the registry: without `Bearer letmein`, a 401 challenge
    (Basic for the `basic/` namespace); `/token` hands out the token; the rest is forwarded."""

    upstream = ""
    token_requests: list[dict[str, str]] = []

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        url = httpx.URL(self.path)
        host = self.headers["Host"]
        if url.path == "/token":
            self.token_requests.append(dict(url.params))
            self._answer(200, {"Content-Type": "application/json"}, b'{"token": "letmein"}')
            return
        if self.headers.get("Authorization") != "Bearer letmein":
            repo = url.path.split("/")[2:4]
            challenge = (f'Bearer realm="http://{host}/token",service="gate",'
                         f'scope="repository:{"/".join(repo)}:pull"')
            if repo[0] == "basic":
                challenge = 'Basic realm="gate"'
            self._answer(401, {"WWW-Authenticate": challenge}, b'{"errors":[]}')
            return
        answer = httpx.request(self.command, self.upstream + self.path,
                               headers={k: v for k, v in self.headers.items()
                                        if k.lower() in ("accept", "range")})
        keep = ("content-type", "docker-content-digest", "content-range")
        self._answer(answer.status_code, {k: v for k, v in answer.headers.items() if k in keep},
                     answer.content)

    do_HEAD = do_GET


def test_a_bearer_token_challenge_is_answered(registry, tmp_path) -> None:
    upload_model(registry, "locked/model", "v1", [(MEDIA_MODEL, b"GGUF locked weights")])
    gate = ThreadingHTTPServer(("127.0.0.1", 0), type("Gate", (_Gate,), {"upstream": registry.url,
                                                                         "token_requests": []}))
    thread = threading.Thread(target=gate.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"127.0.0.1:{gate.server_address[1]}"
        store = ModelStore(tmp_path / "store", registry=allowing(host))
        store.pull(f"{host}/locked/model:v1")
        assert gate.RequestHandlerClass.token_requests == [
            {"service": "gate", "scope": "repository:locked/model:pull"}]
        assert store.resolve(f"{host}/locked/model:v1").weights.read_bytes() == b"GGUF locked weights"
        with pytest.raises(RegistryError, match="asks for basic authentication"):
            store.pull(f"{host}/basic/model:v1")
    finally:
        gate.shutdown()
        gate.server_close()
