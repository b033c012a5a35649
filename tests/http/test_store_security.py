"""The model store through the Ollama API as an attacker would use it (issue 13): what /api/create
may read from the server's disk and what its errors tell, blob uploads (size limit, digest
mismatch), and what a `kill -9` mid-upload leaves behind. Real `shoal serve` processes of a
tiny model, each on a store of its own."""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from live_server import LiveServer
from shoal.access.principal import Principal, current_principal
from shoal.store import ModelStore
from shoal.store.create import GENERIC_PATH_PROBLEM

SECRET = b"SHOAL_ADMIN_KEY=a-secret-the-store-must-never-hold-0123456789"
ADMIN_KEY = "store-security-admin-key-0123456789"
BLOB_LIMIT = 4 << 20


def start(model: Path, root: Path, **env: str) -> LiveServer:
    root.mkdir(parents=True, exist_ok=True)
    server = LiveServer(model, "--max-model-len", "256", "--kv-cache-bytes", "16MiB",
                        env={"SHOAL_MODELS": str(root / "models"), "SHOAL_HOME": str(root / "home"),
                             "SHOAL_CACHE_DIR": str(root / "cache"), **env},
                        log_path=root / f"serve-{time.monotonic_ns()}.log")
    server.store = ModelStore(root / "models")
    return server.wait_ready()


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The loopback default (no keys), blob uploads capped at 4 MiB."""
    live = start(tiny_llama_gguf, tmp_path_factory.mktemp("store-security"),
                 SHOAL_MAX_BLOB_BYTES=str(BLOB_LIMIT))
    try:
        yield live
    finally:
        live.stop()


def create(server: LiveServer, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + "/api/create", json={"stream": False, **body}, headers=headers,
                      timeout=120)


def blobs_hold(store: ModelStore, data: bytes) -> bool:
    return any(data in store.blobs.path(d).read_bytes() for d in store.blobs.digests())


def model_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---- what /api/create reads --------------------------------------------------------------------

def test_a_model_directory_cannot_smuggle_a_secret_into_the_store(server, tiny_llama_dir,
                                                                  tmp_path) -> None:
    """FROM <dir> with `stolen.json -> secret` and `special_tokens_map.json -> secret` (or
    -> /proc/self/environ): the secret is never stored, so no push can send it anywhere."""
    secret = tmp_path / "secret.env"
    secret.write_bytes(SECRET)
    folder = model_dir(tiny_llama_dir, tmp_path / "model")
    (folder / "stolen.json").symlink_to(secret)
    reply = create(server, {"model": "innocent", "from": str(folder)})
    assert reply.status_code == 200, reply.text           # stolen.json is no model file
    assert not blobs_hold(server.store, SECRET)

    for target in (secret, Path("/proc/self/environ")):
        (folder / "special_tokens_map.json").unlink(missing_ok=True)
        (folder / "special_tokens_map.json").symlink_to(target)
        reply = create(server, {"model": "thief", "from": str(folder)})
        assert reply.status_code == 400
        assert reply.json() == {"error": f"modelfile: line 1, column 1: FROM {str(folder)!r}: "
                                         f"{GENERIC_PATH_PROBLEM}"}
    assert not blobs_hold(server.store, SECRET) and not blobs_hold(server.store, ADMIN_KEY.encode())
    assert "thief:latest" not in [m["name"] for m in
                                  httpx.get(server.url + "/api/tags").json()["models"]]


def test_create_errors_do_not_tell_which_files_exist(server, tmp_path) -> None:
    """A missing file, a readable file that is no model, a directory, `../../..`: one message,
    naming nothing of the server's disk (its working directory included)."""
    (tmp_path / "notes.gguf").write_text("not a model")
    messages = set()
    for value in ("/no/such/file.gguf", str(tmp_path / "notes.gguf"), "/etc/hostname.gguf",
                  str(tmp_path), "../../..", "~/.ssh/id_rsa.gguf"):
        reply = create(server, {"model": "x", "from": value})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert str(Path.cwd()) not in error and "no such file" not in error
        messages.add(error.replace(repr(value), "VALUE"))
    assert len(messages) == 1, messages


def test_uploaded_files_make_a_model_for_anyone(server, tiny_llama_dir) -> None:
    """Ollama's way (and `shoal create`'s): the files as blobs, then `files` names them; a model
    directory's several files included."""
    files = {}
    for path in sorted(tiny_llama_dir.iterdir()):
        data = path.read_bytes()
        reply = httpx.post(f"{server.url}/api/blobs/{digest_of(data)}", content=data, timeout=60)
        assert reply.status_code in (200, 201), reply.text      # 200: it was there already
        files[path.name] = digest_of(data)
    reply = create(server, {"model": "uploaded-hf", "files": files, "system": "hi"})
    assert reply.status_code == 200, reply.text
    shown = httpx.post(server.url + "/api/show", json={"model": "uploaded-hf"}, timeout=60).json()
    assert shown["details"]["format"] == "safetensors" and shown["system"] == "hi"
    generated = httpx.post(server.url + "/api/generate", timeout=120, json={
        "model": "uploaded-hf", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    assert generated.status_code == 200, generated.text
    blob = server.store.blobs.path(files["config.json"])
    assert blob.stat().st_mode & 0o777 == 0o444


# ---- blob uploads ------------------------------------------------------------------------------

def test_a_blob_with_the_wrong_bytes_is_a_400_naming_no_file(server) -> None:
    data = b"GGUF these bytes do not hash to the digest in the URL"
    reply = httpx.post(f"{server.url}/api/blobs/sha256:{'0' * 64}", content=data, timeout=60)
    assert reply.status_code == 400
    assert reply.json() == {"error": "digest mismatch"}
    assert not list(server.store.blobs.dir.glob(".tmp-*"))
    assert not list(server.store.root.glob(".upload-*"))
    reply = httpx.post(f"{server.url}/api/blobs/sha256:nothex", content=data, timeout=60)
    assert reply.status_code == 400 and "not a sha256 digest" in reply.json()["error"]


def test_blob_uploads_over_the_limit_are_refused_as_they_arrive(server) -> None:
    """SHOAL_MAX_BLOB_BYTES: a declared Content-Length over it is refused at once; a chunked
    upload (no length) is cut off once it passes it; nothing is kept either way."""
    data = os.urandom(BLOB_LIMIT + 1)
    reply = httpx.post(f"{server.url}/api/blobs/{digest_of(data)}", content=data, timeout=60)
    assert reply.status_code == 413 and "SHOAL_MAX_BLOB_BYTES" in reply.json()["error"]

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 1 << 16):
            yield data[i:i + (1 << 16)]

    try:
        reply = httpx.post(f"{server.url}/api/blobs/{digest_of(data)}", content=chunks(),
                           timeout=60)
        assert reply.status_code == 413
    except httpx.HTTPError:
        pass        # the server may close the connection while the client still sends
    assert not server.store.blobs.has(digest_of(data))
    assert not list(server.store.blobs.dir.glob(".tmp-*"))
    small = os.urandom(1000)
    assert httpx.post(f"{server.url}/api/blobs/{digest_of(small)}", content=small).status_code == 201


# ---- kill -9 -----------------------------------------------------------------------------------

def test_a_killed_upload_leaves_nothing_after_a_restart(tiny_llama_gguf, tmp_path) -> None:
    root = tmp_path / "server"
    server = start(tiny_llama_gguf, root)
    blobs = root / "models" / "blobs"
    data = os.urandom(1 << 20)
    sending = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield data[:1 << 16]
        sending.set()
        time.sleep(60)                            # the server is killed meanwhile
        yield data[1 << 16:]

    def upload() -> None:
        try:
            httpx.post(f"{server.url}/api/blobs/{digest_of(data)}", content=slow_body(),
                       timeout=90)
        except httpx.HTTPError:
            pass

    threading.Thread(target=upload, daemon=True).start()
    try:
        assert sending.wait(30)
        deadline = time.monotonic() + 30
        while not [p for p in blobs.glob(".tmp-*") if p.stat().st_size]:
            assert time.monotonic() < deadline, "the upload never reached the store"
            time.sleep(0.05)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
    finally:
        server.stop()
    assert list(blobs.glob(".tmp-*"))
    (root / "models" / ".upload-legacy").write_bytes(b"x" * 1000)   # where an older shoal put them
    time.sleep(2.5)                               # older than the scratch clean-up's grace
    server = start(tiny_llama_gguf, root)
    try:
        assert list(blobs.glob(".tmp-*")) == []
        assert list((root / "models").glob(".upload-*")) == []
        reply = httpx.post(f"{server.url}/api/blobs/{digest_of(data)}", content=data, timeout=60)
        assert reply.status_code == 201
    finally:
        server.stop()


# ---- who may read the server's disk ------------------------------------------------------------

@pytest.fixture(scope="module")
def locked_down(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[LiveServer]:
    """Keys on (loopback too) and SHOAL_ALLOW_LOCAL_PATHS=0."""
    live = start(tiny_llama_gguf, tmp_path_factory.mktemp("locked-down"), SHOAL_AUTH="on",
                 SHOAL_ADMIN_KEY=ADMIN_KEY, SHOAL_ALLOW_LOCAL_PATHS="0")
    try:
        yield live
    finally:
        live.stop()


def test_local_paths_can_be_turned_off(locked_down, tiny_llama_gguf) -> None:
    """Even an admin cannot make the server read its own disk; uploaded blobs still work."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    reply = create(locked_down, {"model": "x", "from": str(tiny_llama_gguf)}, admin)
    assert reply.status_code == 403 and "SHOAL_ALLOW_LOCAL_PATHS=0" in reply.json()["error"]
    reply = create(locked_down, {"model": "x", "modelfile": "FROM ./weights.gguf\n"}, admin)
    assert reply.status_code == 403
    data = tiny_llama_gguf.read_bytes()
    assert httpx.post(f"{locked_down.url}/api/blobs/{digest_of(data)}", content=data,
                      headers=admin).status_code == 201
    reply = create(locked_down, {"model": "x", "files": {"w.gguf": digest_of(data)}}, admin)
    assert reply.status_code == 200, reply.text
    assert create(locked_down, {"model": "y", "files": {"w.gguf": digest_of(data)}}
                  ).status_code == 401


def _policy(settings: dict, required: bool, principal: Principal):
    from shoal.http.ollama.model_management import local_paths_policy

    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
        settings=SimpleNamespace(**settings), authenticator=SimpleNamespace(required=required))))
    token = current_principal.set(principal)
    try:
        return local_paths_policy(request)
    finally:
        current_principal.reset(token)


def test_who_may_name_paths_and_who_learns_why_they_fail() -> None:
    anonymous, user, admin = Principal(), Principal("k1", "user"), Principal("k2", "root", admin=True)
    on, off = {"allow_local_paths": True}, {"allow_local_paths": False}
    # loopback without keys: anyone may name paths, nobody learns why one failed
    assert _policy(on, False, anonymous).refusal is None
    assert not _policy(on, False, anonymous).detailed
    # keys on: admins only (on loopback too), and they get the reasons
    assert "admin key" in _policy(on, True, user).refusal
    assert _policy(on, True, admin).refusal is None and _policy(on, True, admin).detailed
    # turned off: nobody
    for required, principal in ((False, anonymous), (True, admin)):
        assert "SHOAL_ALLOW_LOCAL_PATHS=0" in _policy(off, required, principal).refusal
