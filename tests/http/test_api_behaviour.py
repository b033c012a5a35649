"""Server behaviour under real use: disconnects, concurrency, overload, and /metrics."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "smollm2:135m"
PROMPTS = ["Write a haiku about the sea.", "List three prime numbers.", "What is a noun?",
           "Describe a cat in one sentence.", "Name a famous bridge.", "Say hi.",
           "Explain rain to a child.", "What colour is grass?"]


def metrics(server) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(snapshot: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
    return snapshot.get(key, 0.0)


def wait_idle(server, timeout: float = 10.0) -> dict:
    """Polls /metrics until nothing runs or waits and no KV block is held."""
    deadline = time.monotonic() + timeout
    while True:
        snap = metrics(server)
        idle = (value(snap, "shoal:num_requests_running") == 0
                and value(snap, "shoal:num_requests_waiting") == 0
                and value(snap, "shoal:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            return snap
        time.sleep(0.05)


def test_metrics_move_by_the_right_amounts(shoal_server) -> None:
    before = wait_idle(shoal_server)
    usages = []
    for prompt, max_tokens in (("Say hi.", 5), ("Count to three.", 7)):
        r = httpx.post(shoal_server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).json()
        usages.append(r["usage"])
    after = wait_idle(shoal_server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    assert delta("shoal:prompt_tokens_total") == prompt_tokens
    assert delta("shoal:generation_tokens_total") == 12
    assert delta("shoal:request_success_total", finished_reason="length") == 2
    assert delta("shoal:time_to_first_token_seconds_count") == 2
    assert delta("shoal:e2e_request_latency_seconds_count") == 2
    assert delta("shoal:request_queue_time_seconds_count") == 2
    assert delta("shoal:request_prefill_time_seconds_count") == 2
    assert delta("shoal:request_decode_time_seconds_count") == 2
    assert delta("shoal:inter_token_latency_seconds_count") == 12 - 2   # gaps between tokens
    assert delta("shoal:request_prompt_tokens_sum") == prompt_tokens
    assert delta("shoal:request_generation_tokens_sum") == 12
    # the two prompts share the template's system prefix: at least one block was a cache hit
    assert delta("shoal:prefix_cache_queries_total") >= prompt_tokens - 16
    assert delta("shoal:prefix_cache_hits_total") >= 16
    # end-to-end covers time to first token
    assert delta("shoal:e2e_request_latency_seconds_sum") >= delta("shoal:time_to_first_token_seconds_sum")


def _long_request(stream: bool) -> dict:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def test_disconnect_mid_stream_aborts_and_frees_blocks(shoal_server) -> None:
    before = wait_idle(shoal_server)
    with httpx.stream("POST", shoal_server.url + "/v1/completions", json=_long_request(True),
                      timeout=60) as response:
        lines = response.iter_lines()
        got = [line for _, line in zip(range(6), lines)]
        assert any(line.startswith("data: {") for line in got)
        snap = metrics(shoal_server)
        assert value(snap, "shoal:num_requests_running") == 1
        assert value(snap, "shoal:kv_cache_usage_perc") > 0
    # leaving the block closed the connection mid-stream
    after = wait_idle(shoal_server, timeout=5)
    assert value(after, "shoal:num_requests_running") == 0
    assert value(after, "shoal:kv_cache_usage_perc") == 0
    assert value(after, "shoal:request_success_total", finished_reason="abort") == \
        value(before, "shoal:request_success_total", finished_reason="abort") + 1
    generated = value(after, "shoal:generation_tokens_total") - value(before, "shoal:generation_tokens_total")
    assert generated < 1500         # it did not run on to the end


def test_disconnect_while_waiting_for_a_non_streamed_answer(shoal_server) -> None:
    before = wait_idle(shoal_server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(shoal_server.url + "/v1/completions", json=_long_request(False), timeout=1.0)
    after = wait_idle(shoal_server, timeout=5)
    assert value(after, "shoal:kv_cache_usage_perc") == 0
    assert value(after, "shoal:request_success_total", finished_reason="abort") == \
        value(before, "shoal:request_success_total", finished_reason="abort") + 1
    generated = value(after, "shoal:generation_tokens_total") - value(before, "shoal:generation_tokens_total")
    assert generated < 1500


async def _stream_chat(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[str, list[float]]:
    """Streams one chat answer; returns its text and the arrival time of each content chunk."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    text, times = "", []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                text += delta
                times.append(time.monotonic())
    return text, times


def test_concurrent_streams_interleave_and_match_their_solo_answers(shoal_server) -> None:
    async def run() -> tuple[list[str], list[tuple[str, list[float]]]]:
        async with httpx.AsyncClient(base_url=shoal_server.url, timeout=120) as client:
            solo = [(await _stream_chat(client, p, 24))[0] for p in PROMPTS]
            together = await asyncio.gather(*(_stream_chat(client, p, 24) for p in PROMPTS))
        return solo, together

    solo, together = asyncio.run(run())
    # batch invariance over HTTP: greedy answers are the same alone or among eight
    assert [t for t, _ in together] == solo
    # fair interleaving: every stream had its first token before any stream finished
    first_tokens = [times[0] for _, times in together if times]
    last_tokens = [times[-1] for _, times in together if len(times) > 1]
    assert max(first_tokens) < min(last_tokens)


@pytest.fixture(scope="module")
def busy_server(smollm2_path, tmp_path_factory):
    """A server that runs one request at a time and queues none."""
    from live_server import LiveServer

    server = LiveServer(smollm2_path, "--max-num-seqs", "1", "--max-queue", "0", "--kv-cache-bytes", "64MiB",
                        "--max-model-len", "2048",
                        log_path=tmp_path_factory.mktemp("busy") / "serve.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_overload_gets_503_with_retry_after_in_both_dialects(busy_server) -> None:
    name = httpx.get(busy_server.url + "/v1/models").json()["data"][0]["id"]
    with httpx.stream("POST", busy_server.url + "/v1/completions",
                      json={**_long_request(True), "model": name, "max_tokens": 400}, timeout=60) as held:
        lines = held.iter_lines()         # (kept: dropping the iterator closes the response)
        next(lines)                       # the one slot is taken while this streams
        openai_style = httpx.post(busy_server.url + "/v1/chat/completions", timeout=10, json={
            "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert openai_style.status_code == 503
        assert int(openai_style.headers["retry-after"]) >= 1
        assert openai_style.json()["error"]["code"] == "server_busy"
        ollama_style = httpx.post(busy_server.url + "/api/generate", timeout=10, json={
            "model": name, "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
        assert ollama_style.status_code == 503
        assert int(ollama_style.headers["retry-after"]) >= 1
        assert "busy" in ollama_style.json()["error"]
    # once the slot is free again the server answers normally, and counted the refusals
    ok = httpx.post(busy_server.url + "/v1/completions", timeout=60,
                    json={"model": name, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200
    rejected = [v for (n, labels), v in metrics(busy_server).items() if n == "shoal:requests_rejected_total"]
    assert sum(rejected) == 2


def _raw_stream_request(server, body: dict):
    """A streaming request on a raw socket that reads nothing until told to (a stalled reader)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    return sock


def _read_sse_text(sock) -> str:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    text = ""
    for line in data.decode().split("\n"):
        if line.startswith("data: {"):
            text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_a_stalled_reader_neither_stalls_the_engine_nor_loses_text(shoal_server) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "stream": True}
    # NOTE: generous timeouts for the 300-token answers: on a loaded 2-core machine they take
    # minutes; what this test holds to a time is the other requests, served meanwhile (< 30 s).
    expected = httpx.post(shoal_server.url + "/v1/completions", timeout=300,
                          json={**body, "stream": False}).json()["choices"][0]["text"]
    sock = _raw_stream_request(shoal_server, body)
    try:
        # while that reader sleeps, other requests are served and the stalled one keeps generating
        started = time.monotonic()
        for _ in range(3):
            r = httpx.post(shoal_server.url + "/v1/completions", timeout=30,
                           json={"model": MODEL, "prompt": "Hello", "max_tokens": 8})
            assert r.status_code == 200
        assert time.monotonic() - started < 30
        deadline = time.monotonic() + 300
        while value(metrics(shoal_server), "shoal:num_requests_running") > 0:
            assert time.monotonic() < deadline, "the stalled reader's request never finished"
            time.sleep(0.1)
        # the reader wakes up: it gets everything, merged into fewer chunks, nothing lost
        assert _read_sse_text(sock) == expected
    finally:
        sock.close()
