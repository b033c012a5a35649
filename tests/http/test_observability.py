"""Request ids, JSON logs, the access and audit logs, per-key metrics, traces and CORS.

Every test talks to a real `shoal serve` (or, for traces, a real uvicorn server in this
process, so the SDK's in-memory exporter can be read) with the real SmolLM2 model.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from live_server import LiveServer, free_port
from prometheus_client.parser import text_string_to_metric_families

from shoal.core.errors import InvalidParameterError
from shoal.http.tracing import RequestTracer, tracer_from_settings
from shoal.serving.settings import ServerSettings

MODEL = "smollm2:135m"
SERVER_FLAGS = ("--max-model-len", "2048", "--kv-cache-bytes", "256MiB")
HEX_ID = re.compile(r"[0-9a-f]{32}")
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6}


def wait_for(find: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Polls until `find` returns something truthy (records are written as requests end,
    which can be a moment after the client has read the last byte)."""
    deadline = time.monotonic() + timeout
    while True:
        found = find()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def line_for(path: Path, request_id: str, logger: str | None = "shoal.http.access") -> dict | None:
    def find() -> dict | None:
        for entry in json_lines(path):
            if entry.get("request_id") == request_id and (logger is None or entry.get("logger") == logger):
                return entry
        return None
    return wait_for(find)


@pytest.fixture(scope="module")
def observed(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server with JSON logs at info level, an audit log (counts only) and one extra origin."""
    root = tmp_path_factory.mktemp("observed")
    server = LiveServer(smollm2_path, *SERVER_FLAGS, log_path=root / "serve.log", env={
        "SHOAL_LOG_LEVEL": "info", "SHOAL_LOG_FORMAT": "json",
        "SHOAL_AUDIT_LOG": str(root / "audit" / "audit.jsonl"), "SHOAL_ORIGINS": "https://app.example"})
    server.audit_path = root / "audit" / "audit.jsonl"
    try:
        yield server.wait_ready()
    finally:
        server.stop()


# ---- request ids -----------------------------------------------------------------------------

def test_request_id_is_echoed_generated_or_replaced(observed: LiveServer) -> None:
    with httpx.Client(base_url=observed.url, timeout=60) as http:
        echoed = http.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "client-id-1"})
        assert echoed.status_code == 200 and echoed.headers["x-request-id"] == "client-id-1"
        assert HEX_ID.fullmatch(http.get("/v1/models").headers["x-request-id"])
        for bad in ("has space", "x" * 200, b"caf\xc3\xa9"):
            reply = http.get("/v1/models", headers={"X-Request-Id": bad})
            assert HEX_ID.fullmatch(reply.headers["x-request-id"]), bad
        # errors, unknown endpoints and streams carry one too
        missing = http.post("/api/generate", json={"model": "no-such-model", "prompt": "hi"})
        assert missing.status_code == 404 and HEX_ID.fullmatch(missing.headers["x-request-id"])
        assert HEX_ID.fullmatch(http.get("/no/such/endpoint").headers["x-request-id"])
        with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"X-Request-Id": "stream-id-1"}) as stream:
            assert stream.headers["x-request-id"] == "stream-id-1"
            assert "[DONE]" in "".join(stream.iter_text())
    assert line_for(observed.log_path, "client-id-1")["status"] == 200
    assert line_for(observed.log_path, "stream-id-1")["status"] == 200


def test_log_lines_are_json_and_name_the_request_they_were_written_for(observed: LiveServer) -> None:
    client = ollama.Client(host=observed.url, headers={"X-Request-Id": "warned-1"})
    client.generate(model="smollm2", prompt="Hi", options={"num_predict": 2, "not_an_option": 1})
    warning = line_for(observed.log_path, "warned-1", logger="shoal.http.ollama.serving")
    assert warning["level"] == "WARNING" and "not_an_option" in warning["message"]
    assert line_for(observed.log_path, "warned-1")["endpoint"] == "/api/generate"
    lines = observed.log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]   # every line is one object
    assert {"time", "level", "logger", "message", "request_id"} <= set(entries[0])
    assert any(e["logger"].startswith("uvicorn") for e in entries)   # uvicorn's lines too


def test_access_record_counts_are_the_usage_the_client_got(observed: LiveServer) -> None:
    client = openai.OpenAI(base_url=observed.url + "/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=CHAT["messages"], max_tokens=7, extra_headers={"X-Request-Id": "usage-1"})
    usage = raw.parse().usage
    stream = client.chat.completions.create(model="smollm2", messages=CHAT["messages"], max_tokens=5,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_headers={"X-Request-Id": "usage-2"})
    streamed = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    reply = ollama.Client(host=observed.url, headers={"X-Request-Id": "usage-3"}).chat(
        model="smollm2", messages=CHAT["messages"], options={"num_predict": 4})
    for request_id, prompt, completion in (
            ("usage-1", usage.prompt_tokens, usage.completion_tokens),
            ("usage-2", streamed.prompt_tokens, streamed.completion_tokens),
            ("usage-3", reply.prompt_eval_count, reply.eval_count)):
        access = line_for(observed.log_path, request_id)
        assert (access["prompt_tokens"], access["completion_tokens"]) == (prompt, completion), request_id
        assert access["model"] == MODEL and access["key_id"] is None and access["class"] == "interactive"
        assert access["e2e_s"] >= access["decode_s"] >= 0 and access["queue_s"] >= 0
        assert access["prefill_s"] > 0
    assert line_for(observed.log_path, "usage-3")["dialect"] == "ollama"


# ---- the audit log -------------------------------------------------------------------------

AUDITED = [  # (request id, path, body, status)
    ("a-oai-200", "/v1/chat/completions", CHAT, 200),
    ("a-oai-400", "/v1/chat/completions", {**CHAT, "temperature": "warm"}, 400),
    ("a-oai-404", "/v1/chat/completions", {**CHAT, "model": "no-such-model"}, 404),
    ("a-oll-200", "/api/generate", {"model": "smollm2", "prompt": "Hi", "stream": False,
                                    "options": {"num_predict": 3}}, 200),
    ("a-oll-400", "/api/chat", {"model": "smollm2", "messages": "not a list"}, 400),
    ("a-oll-404", "/api/generate", {"model": "no-such-model", "prompt": "Hi"}, 404),
]


def test_audit_lines_for_served_and_refused_requests(observed: LiveServer) -> None:
    replies = {}
    with httpx.Client(base_url=observed.url, timeout=60) as http:
        for request_id, path, body, status in AUDITED:
            reply = http.post(path, json=body, headers={"X-Request-Id": request_id})
            assert reply.status_code == status, reply.text
            replies[request_id] = reply.json()
    def audited() -> dict[str, dict] | None:
        found = {e["request_id"]: e for e in json_lines(observed.audit_path) if e["request_id"] in replies}
        return found if len(found) == len(AUDITED) else None

    lines = wait_for(audited)
    for request_id, path, _body, status in AUDITED:
        line = lines[request_id]
        assert (line["endpoint"], line["status"], line["client"]) == (path, status, "127.0.0.1")
        assert line["key_id"] is None and line["latency_s"] > 0
        assert "prompts" not in line and "completions" not in line   # no text unless enabled
        if status == 200:
            assert line["model"] == MODEL and line["reason"] is None
        else:
            assert line["reason"] and line["prompt_tokens"] == line["completion_tokens"] == 0
    assert lines["a-oai-200"]["completion_tokens"] == replies["a-oai-200"]["usage"]["completion_tokens"]
    assert lines["a-oll-200"]["prompt_tokens"] == replies["a-oll-200"]["prompt_eval_count"]
    assert lines["a-oll-200"]["dialect"] == "ollama" and lines["a-oai-400"]["dialect"] == "openai"
    assert "temperature" in lines["a-oai-400"]["reason"] and lines["a-oai-400"]["model"] == MODEL
    for request_id in ("a-oai-404", "a-oll-404"):
        assert lines[request_id]["model"] is None and lines[request_id]["requested_model"] == "no-such-model"
    # a request that is not a model request (and not refused by the guardrails) is not audited
    httpx.get(observed.url + "/api/tags", headers={"X-Request-Id": "a-tags"})
    assert line_for(observed.log_path, "a-tags")
    assert all(e["request_id"] != "a-tags" for e in json_lines(observed.audit_path))
    assert oct(observed.audit_path.stat().st_mode & 0o777) == oct(0o600)


def test_a_client_that_hangs_up_is_audited_with_what_it_cost(observed: LiveServer) -> None:
    payload = json.dumps({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 1000,
                          "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", observed.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: hung-up-1\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        running = 'shoal:num_requests_running{model_name="smollm2:135m"} 1.0'
        assert wait_for(lambda: running in httpx.get(observed.url + "/metrics").text, timeout=60)
    # the record waits for the aborted generation, so it has the prompt and what was generated
    line = wait_for(lambda: next((e for e in json_lines(observed.audit_path)
                                  if e["request_id"] == "hung-up-1"), None))
    assert line["status"] == 499 and line["finish_reason"] == "abort"
    assert line["prompt_tokens"] > 0 and 0 <= line["completion_tokens"] < 1000


def test_echoed_input_is_cut_and_kept_on_one_line_in_the_access_and_audit_logs(observed: LiveServer) -> None:
    name = "m" * 60_000 + "\u2028\u2029\x85"     # a name no line reader may split
    option = "o" * 5_000
    with httpx.Client(base_url=observed.url, timeout=60) as http:
        for request_id, path, body in (
                ("long-oai", "/v1/chat/completions", {**CHAT, "model": name}),
                ("long-oll", "/api/generate", {"model": name, "prompt": "Hi"})):
            reply = http.post(path, json=body, headers={"X-Request-Id": request_id})
            assert 400 <= reply.status_code < 500 and len(reply.content) < 200_000
        http.post("/api/generate", headers={"X-Request-Id": "long-option"}, json={
            "model": "smollm2", "prompt": "Hi", "stream": False, "options": {option: 1, "num_predict": 1}})
    for request_id in ("long-oai", "long-oll"):
        audit = wait_for(lambda rid=request_id: next((e for e in json_lines(observed.audit_path)
                                                      if e["request_id"] == rid), None))
        for entry in (line_for(observed.log_path, request_id), audit):
            long_values = {k: v for k, v in entry.items() if isinstance(v, str) and len(v) > 300}
            assert not long_values, {k: len(v) for k, v in long_values.items()}
            if "requested_model" in entry:
                assert entry["requested_model"] == "m" * 256 + "… (59747 more characters)"
    warning = line_for(observed.log_path, "long-option", logger="shoal.http.ollama.serving")
    assert "'ooo" in warning["message"] and len(warning["message"]) < 400
    # every line of both files is one JSON object (json_lines fails on a line cut in two)
    for path in (observed.log_path, observed.audit_path):
        assert all(len(line) < 20_000 for line in path.read_text().splitlines())
        json_lines(path)


def test_the_log_file_rotates_by_size_and_keeps_a_few(smollm2_path: Path, tmp_path: Path) -> None:
    """SHOAL_LOG_FILE (the auto-started server's ~/.shoal/logs/server.log): rotated, bounded."""
    log_file = tmp_path / "logs" / "server.log"
    server = LiveServer(smollm2_path, *SERVER_FLAGS, "--log-file", str(log_file),
                        log_path=tmp_path / "stdout.log",
                        env={"SHOAL_LOG_LEVEL": "info", "SHOAL_LOG_MAX_BYTES": "4KiB",
                             "SHOAL_LOG_BACKUPS": "2"})
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for i in range(80):
                http.get("/api/tags", headers={"X-Request-Id": f"rotate-{i}"})
        assert wait_for(lambda: "rotate-79" in log_file.read_text())
    finally:
        server.stop()
    files = sorted(p.name for p in log_file.parent.iterdir())
    assert files == ["server.log", "server.log.1", "server.log.2"]     # the oldest ones dropped
    for path in log_file.parent.iterdir():
        assert path.stat().st_size <= 4096 + 1024, path       # a line may pass the size once
    # the process's own output follows the log: nothing is left on the stream it was started with
    assert "shoal.http.access" not in (tmp_path / "stdout.log").read_text(errors="replace")


# ---- metrics -------------------------------------------------------------------------------

def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_per_key_counters_move_by_the_traffic(observed: LiveServer) -> None:
    caller = (("class", "interactive"), ("key", "anonymous"))

    def requests(model: str, status: str) -> tuple:
        return ("shoal:requests_total", tuple(sorted((*caller, ("model_name", model), ("status", status)))))

    def tokens(kind: str) -> tuple:
        return ("shoal:tokens_total", tuple(sorted((*caller, ("kind", kind), ("model_name", MODEL)))))

    before = _samples(observed.url)
    client = openai.OpenAI(base_url=observed.url + "/v1", api_key="unused")
    usages = [client.chat.completions.create(model="smollm2", messages=CHAT["messages"],
                                             max_tokens=n).usage for n in (3, 5)]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT["messages"])
    httpx.get(observed.url + "/v1/models")      # not a model request: not counted
    after = wait_for(lambda: (s := _samples(observed.url)).get(requests("", "404"), 0)
                     > before.get(requests("", "404"), 0) and s)
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    assert delta[requests(MODEL, "200")] == 2
    assert delta[requests("", "404")] == 1
    assert delta[tokens("prompt")] == sum(u.prompt_tokens for u in usages)
    assert delta[tokens("generation")] == sum(u.completion_tokens for u in usages)


# ---- CORS ----------------------------------------------------------------------------------

def _preflight(url: str, path: str, origin: str) -> httpx.Response:
    return httpx.options(url + path, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang"})


def test_cors_allows_local_and_configured_origins_only(observed: LiveServer) -> None:
    for path in ("/v1/chat/completions", "/api/chat"):
        allowed = _preflight(observed.url, path, "http://localhost:3000")
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "POST" in allowed.headers["access-control-allow-methods"]
        refused = _preflight(observed.url, path, "https://evil.example")
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    added = _preflight(observed.url, "/api/chat", "https://app.example")   # SHOAL_ORIGINS
    assert added.status_code == 200 and added.headers["access-control-allow-origin"] == "https://app.example"
    assert _preflight(observed.url, "/api/chat", "tauri://localhost").status_code == 200
    with httpx.Client(base_url=observed.url, timeout=60) as http:
        served = http.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
        assert served.status_code == 200
        assert served.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in served.headers["access-control-expose-headers"].lower()
        # a simple request (no preflight) from another origin is refused, not just unreadable
        for path, shape in (("/api/delete", lambda body: body["error"]),
                            ("/v1/chat/completions", lambda body: body["error"]["message"])):
            refused = http.request("POST" if path.startswith("/v1") else "DELETE", path,
                                   json={"model": "smollm2"}, headers={"Origin": "https://evil.example"})
            assert refused.status_code == 403 and "evil.example" in shape(refused.json())
    assert httpx.post(observed.url + "/api/show", json={"model": "smollm2"}).status_code == 200


# ---- audit content and rotation -------------------------------------------------------------

def test_audit_content_when_enabled_and_rotation(smollm2_path: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    server = LiveServer(smollm2_path, *SERVER_FLAGS, log_path=tmp_path / "serve.log", env={
        "SHOAL_AUDIT_LOG": str(audit), "SHOAL_AUDIT_CONTENT": "1",
        "SHOAL_AUDIT_MAX_BYTES": "1600", "SHOAL_AUDIT_BACKUPS": "2"})
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        answers = {}
        for i in range(8):
            words = f"Repeat after me: audit line number {i}."
            reply = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": words}], max_tokens=8,
                extra_headers={"X-Request-Id": f"content-{i}"})
            answers[f"content-{i}"] = (words, reply.choices[0].message.content)
        files = [audit, audit.with_name("audit.jsonl.1"), audit.with_name("audit.jsonl.2")]
        wait_for(lambda: any(e["request_id"] == "content-7" for e in json_lines(audit)))
    finally:
        server.stop()
    assert all(f.exists() for f in files) and not audit.with_name("audit.jsonl.3").exists()
    assert all(f.stat().st_size <= 1600 for f in files)
    kept = [e for f in reversed(files) for e in json_lines(f)]
    ids = [e["request_id"] for e in kept]
    assert ids == sorted(ids, key=lambda i: int(i.split("-")[1])) and ids[-1] == "content-7"
    assert len(ids) < 8                                    # the oldest lines rotated away
    for entry in kept:
        words, answer = answers[entry["request_id"]]
        assert words in entry["prompts"][0]                 # the rendered prompt, template and all
        assert entry["completions"] == [answer]


def test_audit_keeps_every_request_through_a_graceful_stop(smollm2_path: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    server = LiveServer(smollm2_path, *SERVER_FLAGS, log_path=tmp_path / "serve.log",
                        env={"SHOAL_AUDIT_LOG": str(audit)}).wait_ready()
    started = threading.Barrier(5)

    def stream(request_id: str) -> None:
        with httpx.stream("POST", server.url + "/api/generate", timeout=60,
                          json={"model": "smollm2", "prompt": f"Count to ten ({request_id}).",
                                "options": {"num_predict": 24}},
                          headers={"X-Request-Id": request_id}) as reply:
            lines = reply.iter_lines()
            next(lines)
            started.wait()
            try:
                for _ in lines:     # the rest, as far as the shutdown lets it run
                    pass
            except httpx.HTTPError:
                pass

    threads = [threading.Thread(target=stream, args=(f"stop-{i}",)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        started.wait(timeout=120)           # every stream is producing tokens
        server.process.terminate()          # SIGTERM: uvicorn finishes what is in flight
        for thread in threads:
            thread.join(timeout=120)
        server.process.wait(timeout=60)
    finally:
        server.stop()
    logged = {e["request_id"]: e for e in json_lines(audit)}
    assert set(logged) == {f"stop-{i}" for i in range(4)}
    assert all(e["status"] == 200 and e["completion_tokens"] > 0 for e in logged.values())


# ---- traces --------------------------------------------------------------------------------

def test_one_request_becomes_a_span_tree_from_the_engine_timings(smollm2_path: Path) -> None:
    import uvicorn
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shoal.http.app import create_app
    from shoal.serving.model_loading import make_residency
    from shoal.core.config import EngineConfig

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = ServerSettings(port=free_port())
    residency = make_residency(EngineConfig(model=str(smollm2_path), max_model_len=2048,
                                            kv_cache_bytes=256 << 20), settings)
    app = create_app(residency, settings)
    app.state.recorder.sinks.append(RequestTracer(provider))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, timeout=60)
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        reply = httpx.post(f"http://127.0.0.1:{settings.port}/v1/chat/completions", json=CHAT, timeout=60,
                           headers={"traceparent": f"00-{trace_id}-{parent_id}-01",
                                    "X-Request-Id": "traced-1"})
        spans = wait_for(lambda: len(exporter.get_finished_spans()) >= 4 and exporter.get_finished_spans())
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    by_name = {span.name: span for span in spans}
    root = by_name["POST /v1/chat/completions"]
    assert set(by_name) == {root.name, "queue", "prefill", "decode"}
    assert format(root.context.trace_id, "032x") == trace_id       # the caller's trace continues
    assert format(root.parent.span_id, "016x") == parent_id
    usage = reply.json()["usage"]
    assert root.attributes["gen_ai.request.model"] == MODEL
    assert root.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert root.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert root.attributes["shoal.request_id"] == "traced-1"
    queue, prefill, decode = by_name["queue"], by_name["prefill"], by_name["decode"]
    assert all(s.parent.span_id == root.context.span_id for s in (queue, prefill, decode))
    assert root.start_time <= queue.start_time <= queue.end_time == prefill.start_time
    assert prefill.end_time == decode.start_time <= decode.end_time <= root.end_time


def test_tracing_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "console"}
    assert tracer_from_settings(None, {}) is None
    assert tracer_from_settings(False, endpoint) is None            # SHOAL_OTEL=0 wins
    tracer = tracer_from_settings(None, endpoint)                   # the endpoint turns it on
    assert isinstance(tracer, RequestTracer)
    tracer.close()
    with pytest.raises(InvalidParameterError, match="OTEL_TRACES_EXPORTER"):
        tracer_from_settings(True, {"OTEL_TRACES_EXPORTER": "zipkin"})
    assert ServerSettings.from_env({"SHOAL_OTEL": "0"}).otel is False
    assert ServerSettings.from_env({}).otel is None
    for bad in ({"SHOAL_LOG_FORMAT": "xml"}, {"SHOAL_AUDIT_MAX_BYTES": "lots"}, {"SHOAL_AUDIT_BACKUPS": "-1"}):
        with pytest.raises(InvalidParameterError):
            ServerSettings.from_env(bad)


def test_tracing_without_the_extra_stops_the_server_before_it_loads(smollm2_path: Path) -> None:
    # NOTE: a None entry in sys.modules makes the import fail as for an absent package.
    code = ("import sys; sys.modules['opentelemetry.sdk'] = None; from shoal.cli import main; "
            f"sys.exit(main(['serve', '--model', {str(smollm2_path)!r}, '--port', '{free_port()}']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SHOAL_OTEL": "1", "SHOAL_LOG_LEVEL": "info"})
    assert done.returncode == 1
    assert "shoal[otel]" in done.stderr and "SHOAL_OTEL" in done.stderr
    assert "loaded in" not in done.stderr       # it stopped before loading the model ("model ... loaded in Xs")
