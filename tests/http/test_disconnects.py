"""Clients that hang up, many at once: each is one info line (499, finish_reason=abort), never a
5xx or a traceback, and the engine frees what their requests held."""
from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer

MODEL = "smollm2:135m"
RUNNING = 8             # the server's running batch; most of the 100 requests wait in the queue
ACCESS_LINE = re.compile(r" INFO shoal\.http\.access: POST (\S+) (\d{3}) .*")


@pytest.fixture(scope="module")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("disconnects") / "serve.log"
    # NOTE: no queue timeout: on a slow machine waiting requests must not become 503s first
    server = LiveServer(smollm2_path, "--max-num-seqs", str(RUNNING), "--max-model-len", "1024",
                        "--kv-cache-bytes", "128MiB", "--queue-timeout", "0",
                        env={"SHOAL_LOG_LEVEL": "info"}, log_path=log)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _requests(n: int) -> list[tuple[str, dict]]:
    """Both dialects, streamed and not, one prompt and several: every way a request can wait."""
    chat = [{"role": "user", "content": "Tell me a long story."}]
    kinds = [
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 500, "stream": True}),
        ("/v1/completions", {"prompt": ["Once upon a time", "Long ago"], "max_tokens": 500,
                             "ignore_eos": True, "stream": True}),
        ("/api/generate", {"prompt": "Once upon a time", "options": {"num_predict": 500}}),
        ("/api/chat", {"messages": chat, "options": {"num_predict": 500}, "stream": False}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 500}),
    ]
    return [(path, {"model": MODEL, **body}) for path, body in (kinds[i % len(kinds)] for i in range(n))]


def _gauges(server: LiveServer) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out = {}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        match = re.search(rf'^shoal:{name}{{model_name="{MODEL}"}} (\S+)$', text, re.M)
        out[name] = float(match.group(1)) if match else 0.0
    return out


def _wait_for(check, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


async def _open_and_drop(server: LiveServer, requests: list[tuple[str, dict]]) -> int:
    """Sends every request on its own connection, waits until the engine is full and some
    streams have begun, then closes every connection at once; returns how many had begun."""
    connections = []
    for path, body in requests:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        data = json.dumps(body).encode()
        writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
        connections.append((reader, writer))
    await asyncio.gather(*(w.drain() for _, w in connections))
    # the first two are streams, first in the queue: their first bytes come once they run
    began = await asyncio.gather(*(asyncio.wait_for(r.read(1), 60) for r, _ in connections[:2]),
                                 return_exceptions=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gauges = await asyncio.to_thread(_gauges, server)
        if gauges["num_requests_running"] > 0 and gauges["num_requests_waiting"] > 0:
            break
        await asyncio.sleep(0.2)
    for _, writer in connections:
        writer.transport.abort()        # the client dies: every socket closes at once
    return sum(isinstance(b, bytes) and len(b) == 1 for b in began)


def test_a_hundred_clients_leaving_at_once_are_499s_without_tracebacks(server: LiveServer) -> None:
    requests = _requests(100)
    assert asyncio.run(_open_and_drop(server, requests)) > 0
    log = server.log_path

    def access_lines() -> list[tuple[str, str]]:
        lines = [ACCESS_LINE.search(line) for line in log.read_text(errors="replace").splitlines()]
        found = [(m.group(1), m.group(2)) for m in lines if m]
        return found if len(found) >= len(requests) else []

    lines = _wait_for(access_lines, 60)
    text = log.read_text(errors="replace")
    assert len(lines) == len(requests), text[-3000:]
    assert {status for _, status in lines} == {"499"}, \
        "\n".join(line for line in text.splitlines() if ACCESS_LINE.search(line) and " 499 " not in line)
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    assert all("finish_reason=abort" in line and 'reason="the client disconnected"' in line
               for line in text.splitlines() if ACCESS_LINE.search(line))
    # the engine let go of every request and every KV block
    assert _wait_for(lambda: not any(_gauges(server).values()), 30), _gauges(server)
    # and goes on serving
    answer = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3})
    assert answer.status_code == 200
