"""Bad input against a real server: every reply is a 4xx in the dialect's own error shape
(or a clean close), never a 5xx, never a stuck connection, and the server answers normally
afterwards.

The server is this module's own (its store fills up with fuzzed creates; a 3 s read
deadline and a 256 KiB body limit keep the slow-client and huge-body cases short).
SHOAL_FUZZ_EXAMPLES raises the number of hypothesis examples per endpoint (default 12).
"""
from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from shoal.http.ollama.protocol import (ChatBody, CopyBody, CreateBody, DeleteBody, GenerateBody,
                                       PullBody, ShowBody)
from shoal.http.ollama.serving import OPTION_TYPES
from shoal.http.openai.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest,
                                       DetokenizeRequest, TokenizeRequest)

MODEL = "smollm2:135m"
BODY_LIMIT = 256 << 10
READ_TIMEOUT = 3
FUZZ_EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "12"))
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
         "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    from live_server import LiveServer

    live = LiveServer(smollm2_path, "--served-model-name", f"{MODEL},smollm2", "--max-model-len", "128",
                      "--kv-cache-bytes", "64MiB",
                      env={"SHOAL_MAX_BODY_BYTES": str(BODY_LIMIT), "SHOAL_READ_TIMEOUT": str(READ_TIMEOUT)},
                      log_path=tmp_path_factory.mktemp("bad_input") / "serve.log")
    try:
        yield live.wait_ready()
    finally:
        live.stop()


@pytest.fixture(scope="module", autouse=True)
def hello_before(server) -> str:
    """The greedy answer to HELLO before any bad input arrived (autouse: asked first)."""
    return _hello(server)


def _hello(server) -> str:
    reply = httpx.post(server.url + "/v1/chat/completions", json=HELLO, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


# ---- what a proper answer is ---------------------------------------------------------------

def dialect_of(path: str) -> str:
    return "ollama" if path.startswith("/api/") else "openai"


def assert_error_shape(response: httpx.Response, dialect: str) -> str:
    """The dialect's error body; returns its message."""
    body = response.json()
    if dialect == "ollama":
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
        return body["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error["message"]


def assert_proper_answer(response: httpx.Response, path: str) -> None:
    """No 5xx; an error is in the dialect's shape; a success is well-formed JSON/NDJSON/SSE."""
    assert response.status_code < 500, f"{path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert_error_shape(response, dialect_of(path))
        return
    kind = response.headers.get("content-type", "")
    if "ndjson" in kind:
        for line in response.text.splitlines():
            json.loads(line)
    elif "event-stream" in kind:
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-200:]
    elif response.content:
        json.loads(response.content)


def post(server, path: str, content: bytes | str, timeout: float = 60) -> httpx.Response:
    method = "DELETE" if path == "/api/delete" else "POST"
    body = content.encode() if isinstance(content, str) else content
    return httpx.request(method, server.url + path, content=body, timeout=timeout,
                         headers={"content-type": "application/json"})


# ---- malformed bodies, on every path ------------------------------------------------------

PATHS = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/api/generate",
         "/api/chat", "/api/show", "/api/pull", "/api/create", "/api/copy", "/api/delete"]

MALFORMED: dict[str, bytes] = {
    "truncated JSON": b'{"model": ',
    "invalid UTF-8": b'{"model": "\xff\xfe"}',
    "an array": b"[1, 2]",
    "a string": b'"hello"',
    "a number": b"42",
    "null": b"null",
    "true": b"true",
    "empty": b"",
    "only whitespace": b"  \n ",
    "100k nested arrays": b"[" * 100_000 + b"]" * 100_000,
    "20k nested objects": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "deep nesting inside a field": b'{"model": "smollm2", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "a 5000-digit integer": b'{"model": "smollm2", "max_tokens": ' + b"9" * 5000 + b"}",
    "two objects": b'{"model": "smollm2"} {"model": "smollm2"}',
}


@pytest.mark.parametrize("path", PATHS)
def test_malformed_bodies_are_400_in_the_dialects_shape(server, path: str) -> None:
    for name, body in MALFORMED.items():
        response = post(server, path, body)
        assert response.status_code == 400, f"{path} {name}: {response.status_code} {response.text[:200]}"
        assert_error_shape(response, dialect_of(path))


# ---- numbers out of range -------------------------------------------------------------------

def _with(base: dict[str, Any], field: str, literal: str) -> str:
    """`base` as JSON text with `field` set to a raw JSON literal (NaN, 1e400, 10**30 ...)."""
    text = json.dumps({k: v for k, v in base.items() if k != field})
    return text[:-1] + f', "{field}": {literal}}}'


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
OPENAI_NUMBERS = [  # (field, JSON literal, expected status, the param a 400 names)
    ("temperature", "NaN", 400, "temperature"),
    ("temperature", "Infinity", 400, "temperature"),
    ("temperature", "1e400", 400, "temperature"),
    ("temperature", "-1", 400, "temperature"),
    ("top_p", "-1", 400, "top_p"),
    ("top_p", "NaN", 400, "top_p"),
    ("max_tokens", str(10**30), 400, "max_tokens"),
    ("max_tokens", "-5", 400, "max_tokens"),
    ("n", "1e9", 400, "n"),
    ("n", "0", 400, "n"),
    ("min_tokens", "-1", 400, "min_tokens"),
    ("presence_penalty", "-Infinity", 400, "presence_penalty"),
    ("top_logprobs", str(10**30), 400, "top_logprobs"),
    ("logit_bias", '{"-1": 5}', 400, "logit_bias"),
    ("logit_bias", '{"5": NaN}', 400, "logit_bias"),
    ("stop_token_ids", f"[{10**30}]", 400, "stop_token_ids"),
    # NOTE: a top_k above the vocabulary once overflowed int64 in the sampler and killed the
    # engine loop for every later request; it now keeps every token, as top_k 0 does.
    ("top_k", str(10**30), 200, None),
    ("seed", str(-10**30), 200, None),
    ("priority", str(10**30), 200, None),
]


@pytest.mark.parametrize(("field", "literal", "status", "param"), OPENAI_NUMBERS)
def test_openai_numbers_out_of_range(server, field: str, literal: str, status: int,
                                     param: str | None) -> None:
    base = {**CHAT, "logprobs": True} if field == "top_logprobs" else CHAT
    response = post(server, "/v1/chat/completions", _with(base, field, literal))
    assert response.status_code == status, response.text
    if status == 400:
        assert_error_shape(response, "openai")
        assert response.json()["error"]["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200


def test_token_id_prompts_outside_the_vocabulary_are_400(server) -> None:
    for prompt in ([-12020, 7874], [10**30], [[1, 2], [-1]]):
        response = post(server, "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 2}))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "prompt"


GENERATE = {"model": MODEL, "prompt": "Hi", "stream": False}
OLLAMA_OPTIONS = [  # (option, JSON literal, expected status)
    ("temperature", "NaN", 400),
    ("temperature", "Infinity", 400),
    ("top_p", "-1", 400),
    ("num_ctx", "-5", 400),
    ("num_ctx", "1e20", 200),          # capped at the served context
    ("repeat_last_n", "-2", 400),
    ("num_predict", "1.5", 400),
    ("num_predict", "1e30", 200),      # at most the context
    ("top_k", str(10**30), 200),
    ("seed", str(10**30), 200),
    ("stop", "[1, 2]", 400),
]


@pytest.mark.parametrize(("option", "literal", "status"), OLLAMA_OPTIONS)
def test_ollama_options_out_of_range(server, option: str, literal: str, status: int) -> None:
    options = '{"num_predict": 2, "%s": %s}' % (option, literal) if option != "num_predict" \
        else '{"%s": %s}' % (option, literal)
    response = post(server, "/api/generate", _with(GENERATE, "options", options))
    assert response.status_code == status, response.text
    if status == 400:
        assert f"options.{option}" in assert_error_shape(response, "ollama")
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_fields_are_ignored(server, hello_before: str) -> None:
    extra = {"frobnicate": {"deep": [1, 2, {"x": None}]}, "zzz": "unknown"}
    response = httpx.post(server.url + "/v1/chat/completions", json={**HELLO, **extra}, timeout=120)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == hello_before
    # Ollama's defaults (a repeat penalty) differ from OpenAI's: compared with a plain request
    ollama = {"model": MODEL, "messages": HELLO["messages"], "stream": False,
              "options": {"temperature": 0, "num_predict": 8}}
    plain = httpx.post(server.url + "/api/chat", json=ollama, timeout=120).json()["message"]["content"]
    ollama = {**ollama, **extra, "options": {**ollama["options"], "not_an_option": 1}}
    response = httpx.post(server.url + "/api/chat", json=ollama, timeout=120)
    assert response.status_code == 200
    assert response.json()["message"]["content"] == plain


# ---- huge bodies ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/generate", "/api/create"])
def test_bodies_over_the_limit_are_413(server, path: str) -> None:
    big = json.dumps({"model": MODEL, "prompt": "x" * (BODY_LIMIT + 10)}).encode()
    declared = post(server, path, big)
    assert declared.status_code == 413
    assert "SHOAL_MAX_BODY_BYTES" in assert_error_shape(declared, dialect_of(path))

    def chunks() -> Iterator[bytes]:           # no Content-Length: the limit is counted as it arrives
        for start in range(0, len(big), 16 << 10):
            yield big[start:start + (16 << 10)]

    streamed = httpx.post(server.url + path, content=chunks(), timeout=60)
    assert streamed.status_code == 413
    assert_error_shape(streamed, dialect_of(path))


@pytest.mark.parametrize("path", ["/v1/models", "/api/chat"])
def test_oversized_headers_are_431(server, path: str) -> None:
    # NOTE: without the cap, uvicorn kept every header byte in memory (200 MiB took 280 MiB).
    response = httpx.post(server.url + path, headers={"X-Padding": "a" * (1 << 20)}, json={}, timeout=60)
    assert response.status_code == 431
    assert "headers are larger" in assert_error_shape(response, dialect_of(path))


def test_a_prompt_just_under_the_limit_gets_a_context_error(server) -> None:
    words = "word " * ((BODY_LIMIT - 200) // 5)
    response = httpx.post(server.url + "/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": words, "max_tokens": 2})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


# ---- wrong types everywhere (hypothesis) ----------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers()
                | st.sampled_from([2**63, -2**63 - 1, 2**64, 10**30, -10**30])
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def field_names(model: type[BaseModel]) -> list[str]:
    return sorted(f.alias or name for name, f in model.model_fields.items())


# (path, the wire model whose fields are fuzzed, a valid body the fuzzed fields replace)
ENDPOINTS: list[tuple[str, type[BaseModel], dict[str, Any]]] = [
    ("/v1/chat/completions", ChatCompletionRequest, CHAT),
    ("/v1/completions", CompletionRequest, {"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
    ("/tokenize", TokenizeRequest, {"model": MODEL, "prompt": "Hi"}),
    ("/detokenize", DetokenizeRequest, {"model": MODEL, "tokens": [1, 2]}),
    ("/api/generate", GenerateBody, {**GENERATE, "options": {"num_predict": 2}}),
    ("/api/chat", ChatBody, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                             "stream": False, "options": {"num_predict": 2}}),
    ("/api/show", ShowBody, {"model": MODEL}),
    ("/api/pull", PullBody, {"model": "nothing-here", "stream": False}),
    ("/api/create", CreateBody, {"model": "fuzz-made", "from": MODEL, "stream": False}),
    ("/api/copy", CopyBody, {"source": "nothing-here", "destination": "fuzz-copy"}),
    ("/api/delete", DeleteBody, {"model": "nothing-here"}),
]


@st.composite
def fuzzed_body(draw: st.DrawFn, model: type[BaseModel], base: dict[str, Any]) -> dict[str, Any]:
    """`base` with one to three of the model's fields (or an unknown one) set to any JSON."""
    names = field_names(model) + ["not_a_field"]
    body = dict(base)
    body.update(draw(st.dictionaries(st.sampled_from(names), JSON_VALUES, min_size=1, max_size=3)))
    if "messages" in body and draw(st.booleans()):          # a message's own fields, wrongly typed
        message = {"role": "user", "content": "Hi"}
        message.update(draw(st.dictionaries(st.sampled_from(field_names(ChatMessage)), JSON_VALUES,
                                            min_size=1, max_size=2)))
        body["messages"] = [message]
    if "options" in body and draw(st.booleans()):           # Ollama options, wrongly typed
        body["options"] = {"num_predict": 2, **draw(st.dictionaries(
            st.sampled_from(sorted(OPTION_TYPES)), JSON_VALUES, min_size=1, max_size=3))}
    return body


@pytest.mark.parametrize(("path", "model", "base"), ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_wrong_types_in_every_field(server, path: str, model: type[BaseModel],
                                    base: dict[str, Any]) -> None:
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(body=fuzzed_body(model, base))
    def check(body: dict[str, Any]) -> None:
        # NOTE: allow_nan writes NaN/Infinity literals, as sloppy clients do; ensure_ascii
        # keeps lone surrogates as \\ud800 escapes that the server must survive too.
        assert_proper_answer(post(server, path, json.dumps(body, allow_nan=True)), path)

    check()
    assert httpx.get(server.url + "/health").status_code == 200


# ---- slow and lying clients -----------------------------------------------------------------

def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; fails if it keeps the connection open."""
    sock.settimeout(READ_TIMEOUT + 30)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"the server kept the connection open; received {data[:200]!r}")
    return data


def _trickle(sock: socket.socket, byte: bytes, stop: threading.Event) -> None:
    """One byte a second until the server closes the connection (or `stop`)."""
    while not stop.wait(1.0):
        try:
            sock.sendall(byte)
        except OSError:
            return


def test_slow_and_lying_clients_are_cut_off_while_others_are_served(server, hello_before: str) -> None:
    host, port = "127.0.0.1", server.port
    head = "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    clients = {  # name -> (bytes sent at once, byte trickled each second or None)
        "silent": (b"", None),
        "slow headers": (head.format("/v1/completions").encode(), b"X"),
        "slow body": ((head + "Content-Length: 500\r\n\r\n").format("/api/generate").encode(), b" "),
        "short body": ((head + "Content-Length: 1000\r\n\r\n").format("/v1/chat/completions").encode()
                       + b'{"model": "smollm2"}', None),
        "unfinished chunks": ((head + "Transfer-Encoding: chunked\r\n\r\n").format("/v1/completions").encode()
                              + b'5\r\n{"a":\r\n', None),
    }
    stop = threading.Event()
    sockets, replies, threads = {}, {}, []
    for name, (first, byte) in clients.items():
        sock = socket.create_connection((host, port))
        sock.sendall(first)
        sockets[name] = sock
        if byte is not None:
            threads.append(threading.Thread(target=_trickle, args=(sock, byte, stop), daemon=True))
    for thread in threads:
        thread.start()
    try:
        # the stuck connections hold no worker: a normal request is answered meanwhile
        assert _hello(server) == hello_before
        for name, sock in sockets.items():
            replies[name] = _read_until_closed(sock)
    finally:
        stop.set()
        for sock in sockets.values():
            sock.close()
    # headers that never complete: the connection is closed without a reply
    assert replies["silent"] == b"" and replies["slow headers"] == b""
    # a body that never completes: 408 in the path's dialect, and the connection is closed
    for name, dialect in (("slow body", "ollama"), ("short body", "openai"), ("unfinished chunks", "openai")):
        status_line, _, rest = replies[name].partition(b"\r\n")
        assert status_line == b"HTTP/1.1 408 Request Timeout", replies[name][:200]
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert b"connection: close" in headers.lower()
        fake = httpx.Response(408, content=body)
        assert "SHOAL_READ_TIMEOUT" in assert_error_shape(fake, dialect)


# ---- afterwards ---------------------------------------------------------------------------------

def test_the_server_still_answers_correctly_afterwards(server, hello_before: str) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    assert _hello(server) == hello_before
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[log.find("Traceback") - 500:][:3000]
