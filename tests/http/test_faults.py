"""Faults: `kill -9` of the server mid-work and a restart on the same home; weights files
that vanish or shrink under a running server.

One home (SHOAL_HOME / SHOAL_MODELS / a Hugging Face cache) lives through the whole module;
`lab.crash_and_restart()` kills the current server with SIGKILL and starts a new one on it.
After every restart each check in STATE_CHECKS must pass.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from shoal.store import ModelStore

MODEL = "smollm2:135m"
ADMIN_KEY = "faults-lab-admin-key-0123456789"     # SHOAL_ADMIN_KEY of every server in the lab
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
HF_REPO = "test/smol-GGUF"            # served from an offline Hugging Face cache built below
HF_NAME = f"hf.co/{HF_REPO}:latest"


class Lab:
    """A server home that outlives the servers started on it."""

    def __init__(self, root: Path, smollm2: Path) -> None:
        self.root = root
        self.models = root / "models"
        self.hf_cache = root / "hf"
        # NOTE: private copies: the tests truncate them.
        self.pinned = self.copy_of(smollm2, "pinned.gguf")
        self.smollm2 = smollm2
        self.server = None
        self._logs = 0
        # keys the server acknowledged creating (id -> key), and those it acknowledged revoking
        self.keys: dict[str, str] = {}
        self.revoked: set[str] = set()

    def copy_of(self, source: Path, name: str) -> Path:
        target = self.root / "files" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        shutil.copyfile(source, target)
        return target

    def start(self):
        from live_server import LiveServer

        self._logs += 1
        env = {"SHOAL_HOME": str(self.root), "SHOAL_MODELS": str(self.models),
               "HF_HUB_CACHE": str(self.hf_cache), "HF_HUB_OFFLINE": "1",
               "SHOAL_MAX_LOADED_MODELS": "6",     # every model stays loaded between checks
               "SHOAL_ADMIN_KEY": ADMIN_KEY}
        self.server = LiveServer(self.pinned, "--served-model-name", f"{MODEL},smollm2",
                                 "--max-model-len", "256", "--kv-cache-bytes", "64MiB", env=env,
                                 log_path=self.root / f"serve-{self._logs}.log").wait_ready()
        return self.server

    def crash_and_restart(self, after_kill: Callable[[], None] | None = None):
        self.server.process.kill()              # SIGKILL: no cleanup of any kind runs
        self.server.process.wait(30)
        if after_kill is not None:
            after_kill()
        self.server.stop()
        server = self.start()
        for check in STATE_CHECKS:
            check(self)
        return server

    @property
    def store(self) -> ModelStore:
        return ModelStore(self.models)


@pytest.fixture(scope="module")
def lab(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("faults"), smollm2_path)
    lab.start()
    try:
        yield lab
    finally:
        lab.server.stop()


# ---- what must survive a crash ----------------------------------------------------------------

_BLOB = re.compile(r"sha256-[0-9a-f]{64}")


def store_is_intact(lab: Lab) -> None:
    """Every stored model's blobs are all there and hash to their digests, and every file
    named as a blob holds exactly those bytes (a crash may leave temp/partial files only)."""
    store = lab.store
    for model in store.list():
        assert store.verify(model.name) == [], f"{model.name} has damaged blobs after a crash"
    for path in (lab.models / "blobs").iterdir():
        if _BLOB.fullmatch(path.name):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name[7:], path


def keys_are_intact(lab: Lab) -> None:
    """The keys DB passes SQLite's integrity check; every key the server acknowledged creating
    still authenticates (revoked ones are refused), and the running server lists them all."""
    from shoal.core.errors import AuthenticationError
    from shoal.access.auth import Authenticator

    path = lab.root / "keys.db"
    if not lab.keys:
        return
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    auth = Authenticator(path, required=True)
    try:
        for key_id, key in lab.keys.items():
            if key_id in lab.revoked:
                with pytest.raises(AuthenticationError, match="revoked"):
                    auth.authenticate(f"Bearer {key}")
            else:
                assert auth.authenticate(f"Bearer {key}").key_id == key_id
    finally:
        auth.close()
    listed = httpx.get(lab.server.url + "/admin/keys", headers=ADMIN, timeout=60)
    assert listed.status_code == 200, listed.text
    assert set(lab.keys) <= {k["id"] for k in listed.json()["keys"]}


# NOTE: one entry per durable file the server writes.
STATE_CHECKS: list[Callable[[Lab], None]] = [store_is_intact, keys_are_intact]


# ---- helpers ------------------------------------------------------------------------------------

def tags(server) -> set[str]:
    return {m["name"] for m in httpx.get(server.url + "/api/tags", timeout=60).json()["models"]}


def generate(server, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "The sky is", "stream": False, "raw": True,
            "options": {"temperature": 0, "num_predict": 6}, **extra}
    return httpx.post(server.url + "/api/generate", json=body, timeout=300)


def assert_every_model_generates(server) -> None:
    for name in tags(server) | {MODEL}:
        reply = generate(server, name)
        assert reply.status_code == 200, f"{name}: {reply.text}"
        assert reply.json()["done"] is True and reply.json()["eval_count"] > 0


def create(server, name: str, source: Path) -> None:
    reply = httpx.post(server.url + "/api/create", timeout=300,
                       json={"model": name, "from": str(source), "stream": False})
    assert reply.status_code == 200 and reply.json()["status"] == "success", reply.text


def stream_until(server, path: str, body: dict, stop: Callable[[dict], bool]) -> dict:
    """Streams NDJSON from `path` until a line satisfies `stop`, then kills the server."""
    with httpx.stream("POST", server.url + path, json=body, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            event = json.loads(line)
            assert "error" not in event, event
            if stop(event):
                server.process.kill()
                return event
    pytest.fail(f"{path} finished before the kill")


def build_hf_cache(lab: Lab) -> None:
    """An offline Hugging Face cache holding HF_REPO (one GGUF), as huggingface_hub lays it out."""
    repo = lab.hf_cache / ("models--" + HF_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "blobs").mkdir(exist_ok=True)
    shutil.copyfile(lab.smollm2, repo / "blobs" / "weights")
    (snapshot / "smol-Q4_1.gguf").symlink_to(Path("../../blobs/weights"))


# ---- (a) kill -9 mid-work ----------------------------------------------------------------------

def test_kill_mid_stream_then_restart(lab: Lab) -> None:
    server = lab.server
    create(server, "smol-copy", lab.copy_of(lab.smollm2, "import-me.gguf"))
    before = tags(server)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "options": {"num_predict": 200}}
    stream_until(server, "/api/generate", body, lambda event: len(event.get("response", "")) > 0)
    server = lab.crash_and_restart()
    assert tags(server) == before
    assert_every_model_generates(server)


def test_kill_mid_pull_then_restart(lab: Lab) -> None:
    build_hf_cache(lab)
    before = tags(lab.server)
    # killed as the downloaded file is being hashed into the store
    stream_until(lab.server, "/api/pull", {"model": HF_NAME},
                 lambda event: event["status"] == "verifying sha256 digest")
    server = lab.crash_and_restart()
    # no half-pulled model is listed (unless the kill came after the manifest was written)
    assert tags(server) - before <= {HF_NAME}
    assert_every_model_generates(server)
    # pulling again completes it
    reply = httpx.post(server.url + "/api/pull", json={"model": HF_NAME, "stream": False}, timeout=300)
    assert reply.json() == {"status": "success"}
    assert HF_NAME in tags(server)
    assert generate(server, HF_NAME).status_code == 200


def test_kill_mid_create_then_restart(lab: Lab) -> None:
    before = tags(lab.server)
    source = lab.copy_of(lab.smollm2, "create-me.gguf")
    stream_until(lab.server, "/api/create", {"model": "made", "from": str(source)},
                 lambda event: event["status"].startswith("copying file"))
    server = lab.crash_and_restart()
    assert tags(server) - before <= {"made:latest"}
    assert_every_model_generates(server)
    create(server, "made", source)
    assert generate(server, "made").status_code == 200


class KeyChurn(threading.Thread):
    """Creates and revokes keys through /admin/keys until stopped (or the server dies),
    recording in the lab only what the server acknowledged."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(daemon=True)
        self.lab, self.url = lab, lab.server.url
        self.acknowledged = threading.Event()      # set once a create and a revoke succeeded

    def run(self) -> None:
        with httpx.Client(headers=ADMIN, timeout=30) as client:
            for n in range(10_000):
                try:
                    made = client.post(self.url + "/admin/keys", json={"name": f"churn-{n}", "rpm": 60})
                    if made.status_code != 201:
                        return
                    key = made.json()
                    self.lab.keys[key["id"]] = key["key"]
                    if n % 2:
                        if client.delete(f"{self.url}/admin/keys/{key['id']}").status_code != 200:
                            return
                        self.lab.revoked.add(key["id"])
                        self.acknowledged.set()
                except httpx.HTTPError:
                    return                  # the server was killed


def test_kill_mid_key_writes_then_restart(lab: Lab) -> None:
    churn = KeyChurn(lab)
    churn.start()
    assert churn.acknowledged.wait(120), "no key was created and revoked"
    def churn_has_stopped() -> None:
        churn.join(60)
        assert not churn.is_alive()

    server = lab.crash_and_restart(after_kill=churn_has_stopped)     # keys_are_intact runs here
    assert len(lab.keys) >= 2 and lab.revoked
    # the restarted server still writes: one more key, usable at once
    made = httpx.post(server.url + "/admin/keys", headers=ADMIN, json={"name": "after"}, timeout=60)
    assert made.status_code == 201, made.text
    lab.keys[made.json()["id"]] = made.json()["key"]
    keys_are_intact(lab)


# ---- (b) weights that vanish or shrink ----------------------------------------------------------

def assert_damaged(server, name: str) -> None:
    """Requests for `name` get a clear 404 in each dialect; the model is no longer listed;
    the other models keep serving."""
    ollama = generate(server, name)
    assert ollama.status_code == 404, ollama.text
    assert "missing or damaged" in ollama.json()["error"]
    assert "pull or create the model again" in ollama.json()["error"]
    openai = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert openai.status_code == 404, openai.text
    assert openai.json()["error"]["code"] == "model_not_found"
    assert httpx.post(server.url + "/api/show", json={"model": name}, timeout=60).status_code == 404
    assert name not in tags(server)
    assert httpx.get(server.url + "/health").status_code == 200
    assert_every_model_generates(server)
    assert "Traceback" not in server.log_path.read_text(errors="replace")


def unload(server, name: str) -> None:
    reply = httpx.post(server.url + "/api/generate", json={"model": name, "keep_alive": 0}, timeout=60)
    assert reply.status_code == 200
    ps = httpx.get(server.url + "/api/ps").json()["models"]
    assert name not in {m["name"] for m in ps}


def test_weights_that_vanish_or_shrink(lab: Lab, tiny_llama_gguf: Path) -> None:
    server, victim = lab.server, "victim:latest"
    # a second stored model with weights of its own (equal bytes would share one blob)
    create(server, victim, lab.copy_of(tiny_llama_gguf, "victim.gguf"))
    weights = lab.store.resolve(victim).weights
    assert generate(server, victim).status_code == 200          # loaded now

    weights.unlink()                                             # gone under a loaded model
    assert_damaged(server, victim)

    create(server, victim, lab.copy_of(tiny_llama_gguf, "victim.gguf"))   # repairs it
    assert generate(server, victim).status_code == 200
    unload(server, victim)
    os.chmod(weights, 0o644)                                     # (blobs are read-only)
    os.truncate(weights, weights.stat().st_size // 2)            # shrunk under an unloaded model
    assert_damaged(server, victim)

    create(server, victim, lab.copy_of(tiny_llama_gguf, "victim.gguf"))   # the shrunk blob is replaced
    assert lab.store.verify(victim) == []
    assert generate(server, victim).status_code == 200          # loaded again
    os.chmod(weights, 0o644)
    os.truncate(weights, 1000)                                   # shrunk under a loaded model
    assert_damaged(server, victim)


def test_the_pinned_model_file_truncated_under_the_server(lab: Lab) -> None:
    """`serve --model`'s weights live in memory once loaded: the server keeps answering."""
    server = lab.server
    before = generate(server, MODEL).json()["response"]
    os.truncate(lab.pinned, 4096)
    after = generate(server, MODEL)
    assert after.status_code == 200 and after.json()["response"] == before
    assert httpx.get(server.url + "/health").status_code == 200
