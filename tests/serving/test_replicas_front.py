"""The HTTP front over two engine replicas on a real local Ray cluster (tiny model): session
affinity by header, the replicas in /api/ps and in /metrics' engine series, and replicas
killed or hung under a stream, seen by clients of both dialects."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")

from live_server import LiveServer

MODEL = "tiny"
PS_FIELDS = {"replica", "node", "pid", "up", "in_flight", "running", "waiting", "kv_usage"}


@pytest.fixture(scope="module")
def front(cluster, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    home = tmp_path_factory.mktemp("replica_front")
    # NOTE: round robin, so that requests without a session surely alternate between the replicas
    server = LiveServer(tiny_llama_dir, "--replicas", "2", "--ray-address", cluster, "--replica-cpus", "0.5",
                        "--routing", "round_robin", "--served-model-name", MODEL,
                        env={"SHOAL_HOME": str(home)}, log_path=home / "serve.log")
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.stop()


def _replicas(http: httpx.Client) -> list[dict]:
    return http.get("/v1/replicas").json()["data"]


def _routed(http: httpx.Client) -> dict[str, int]:
    return {r["replica"]: r["routed"] for r in _replicas(http)}


def _all_up(http: httpx.Client, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _replicas(http)
        if all(r["up"] for r in rows):
            return rows
        time.sleep(0.3)
    pytest.fail(f"replicas not all up: {rows}")


def _series(metrics: str, family: str) -> dict[frozenset, float]:
    """{labels: value} of one family's samples in a /metrics text."""
    found = {}
    for line in metrics.splitlines():
        if line.startswith(family + "{"):
            labels, value = line[len(family) + 1:].rsplit("} ", 1)
            found[frozenset(tuple(pair.split("=", 1)) for pair in labels.split(","))] = float(value)
    return found


def _chat(http: httpx.Client, text: str, session: str | None = None, **extra) -> httpx.Response:
    headers = {"X-Session-ID": session} if session else {}
    return http.post("/v1/chat/completions", headers=headers, json={
        "model": MODEL, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": text}], **extra})


def _ollama_chat(http: httpx.Client, text: str, session: str | None = None) -> httpx.Response:
    headers = {"x-session-id": session} if session else {}     # header names are case-blind
    return http.post("/api/chat", headers=headers, json={
        "model": MODEL, "stream": False, "options": {"num_predict": 3, "temperature": 0},
        "messages": [{"role": "user", "content": text}]})


def test_a_session_header_keeps_a_session_on_one_replica(front: LiveServer) -> None:
    with httpx.Client(base_url=front.url, timeout=60) as http:
        _all_up(http)
        before = _routed(http)
        for turn in range(3):       # a multi-turn chat in both dialects, one session
            assert _chat(http, f"turn {turn}", session="chat-42").status_code == 200
            assert _ollama_chat(http, f"turn {turn}", session="chat-42").status_code == 200
        after = _routed(http)
        assert sorted(after[r] - before[r] for r in after) == [0, 6], (before, after)
        # without the header the policy (round robin here) spreads the same requests
        for turn in range(2):
            assert _chat(http, f"turn {turn}").status_code == 200
            assert _ollama_chat(http, f"turn {turn}").status_code == 200
        spread = _routed(http)
        assert sorted(spread[r] - after[r] for r in spread) == [2, 2], (after, spread)
        decisions = _series(http.get("/metrics").text, "shoal:router_decisions_total")
        assert decisions[frozenset({("model_name", '"tiny"'), ("decision", '"session"')})] >= 5


def test_api_ps_and_metrics_show_each_replica(front: LiveServer) -> None:
    with httpx.Client(base_url=front.url, timeout=60) as http:
        rows = _all_up(http)
        ps = http.get("/api/ps").json()
        (model,) = [m for m in ps["models"] if m["name"] == MODEL]
        assert model["size"] > 0 and model["context_length"] > 0        # Ollama's fields stay
        assert [r["replica"] for r in model["replicas"]] == ["r0", "r1"]
        for row, listed in zip(model["replicas"], rows):
            assert set(row) == PS_FIELDS and row["up"] is True
            assert (row["node"], row["pid"]) == (listed["node"], listed["pid"]) and row["pid"] > 0
            assert 0.0 <= row["kv_usage"] <= 1.0
        # the engine families: one series per replica, labelled, and none without the label
        time.sleep(1.5)             # the front polls the replicas' stats every 0.5 s: earlier requests in
        prompt_before = _series(http.get("/metrics").text, "shoal:prompt_tokens_total")
        used = [_chat(http, "count my tokens", max_tokens=2).json()["usage"]["prompt_tokens"] for _ in range(2)]
        time.sleep(1.5)             # the front polls the replicas' stats every 0.5 s
        metrics = http.get("/metrics").text
        prompt_after = _series(metrics, "shoal:prompt_tokens_total")
        keys = {frozenset({("model_name", '"tiny"'), ("replica", f'"{r}"')}) for r in ("r0", "r1")}
        assert set(prompt_after) == keys, prompt_after
        # round robin: one request on each replica, each counted by its own replica's series
        assert sorted(prompt_after[k] - prompt_before.get(k, 0.0) for k in keys) == sorted(used)
        for family in ("shoal:num_requests_running", "shoal:kv_cache_usage_perc", "shoal:prefix_cache_queries_total",
                       "shoal:generation_tokens_total"):
            assert set(_series(metrics, family)) == keys, family


def _first_token(lines: Iterator[str], dialect: str) -> None:
    """Reads a stream until it has carried a generated token (it can no longer be retried)."""
    for line in lines:
        if dialect == "openai" and line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return
        if dialect == "ollama" and line and json.loads(line).get("response"):
            return
    pytest.fail("the stream ended before its first token")


def _error_at_the_end(lines: list[str], dialect: str) -> str:
    """The error a stream ended with, checked to be in its dialect's shape."""
    if dialect == "openai":
        events = [line[6:] for line in lines if line.startswith("data: ")]
        if events and events[-1] == "[DONE]":
            events.pop()
        error = json.loads(events[-1])["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error", error
        return error["message"]
    last = json.loads(lines[-1])
    assert set(last) == {"error"} and isinstance(last["error"], str), last
    return last["error"]


def _open_stream(http: httpx.Client, dialect: str, session: str):
    if dialect == "openai":
        return http.stream("POST", "/v1/chat/completions", headers={"X-Session-ID": session}, json={
            "model": MODEL, "stream": True, "max_tokens": 220, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "tell me a long story"}]})
    return http.stream("POST", "/api/generate", headers={"X-Session-ID": session}, json={
        "model": MODEL, "stream": True, "raw": True, "prompt": "the cat sat on the mat and then",
        "options": {"num_predict": 220, "temperature": 0}})


def _stream_on_a_stopped_replica(http: httpx.Client, dialect: str, session: str):
    """Opens a stream and, once it has carried a token, stops (SIGSTOP) the replica it runs on
    so that it cannot finish; returns (response, its line iterator, that replica's row)."""
    rows = _all_up(http)
    context = _open_stream(http, dialect, session)
    response = context.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    _first_token(lines, dialect)
    for row in rows:            # both at once (microseconds): the stream cannot run ahead
        os.kill(row["pid"], signal.SIGSTOP)
    (home,) = [r for r in _replicas(http) if r["in_flight"] == 1]
    for row in rows:
        if row["pid"] != home["pid"]:
            os.kill(row["pid"], signal.SIGCONT)
    return context, lines, home


def _in_thread(call) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
def test_a_stream_whose_replica_is_killed_ends_with_an_error_and_nothing_else_fails(
        front: LiveServer, dialect: str) -> None:
    with httpx.Client(base_url=front.url, timeout=60) as http:
        session = f"killed-{dialect}"
        context, lines, home = _stream_on_a_stopped_replica(http, dialect, session)
        try:
            retries = _series(http.get("/metrics").text, "shoal:router_retries_total")
            # a request of the same session waits on that replica, not yet streamed ...
            waiting, answer = _in_thread(lambda: _chat(http, "are you there", session=session))
            time.sleep(0.5)
            os.kill(home["pid"], signal.SIGKILL)
            message = _error_at_the_end(list(lines), dialect)
            assert "died while streaming" in message, message
            # ... and is answered by the other replica
            waiting.join(60)
            assert answer and answer[0].status_code == 200, answer
            after = _series(http.get("/metrics").text, "shoal:router_retries_total")
            assert sum(after.values()) == sum(retries.values()) + 1
            # requests sent just after the kill, both dialects: none fails
            for turn in range(3):
                assert _chat(http, f"after {turn}").status_code == 200
                assert _ollama_chat(http, f"after {turn}").status_code == 200
        finally:
            context.__exit__(None, None, None)
        _all_up(http)           # Ray restarts the replica and the front takes it back


def test_a_hung_replica_is_killed_its_stream_ends_with_an_error_and_its_waiting_request_moves(
        cluster, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A replica whose process stops answering (SIGSTOP: a real hang of the whole process)
    while requests wait on it is treated as dead after SHOAL_REPLICA_HANG_TIMEOUT."""
    server = LiveServer(tiny_llama_dir, "--replicas", "2", "--ray-address", cluster, "--replica-cpus", "0.5",
                        "--served-model-name", MODEL, env={"SHOAL_HOME": str(tmp_path),
                                                           "SHOAL_REPLICA_HANG_TIMEOUT": "2s"},
                        log_path=tmp_path / "serve.log")
    try:
        server.wait_ready(timeout=240)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            context, lines, home = _stream_on_a_stopped_replica(http, "ollama", "hung")
            try:
                started = time.monotonic()
                waiting, answer = _in_thread(lambda: _ollama_chat(http, "still there?", session="hung"))
                message = _error_at_the_end(list(lines), "ollama")     # no SIGKILL: the front's doing
                assert "died while streaming" in message, message
                # the poll times out after 5 s; the hang timeout (2 s) has passed by then
                assert time.monotonic() - started < 20
                waiting.join(60)
                assert answer and answer[0].status_code == 200, answer
                hangs = _series(http.get("/metrics").text, "shoal:replica_hangs_total")
                assert hangs[frozenset({("model_name", '"tiny"'), ("replica", f'"{home["replica"]}"')})] == 1
            finally:
                context.__exit__(None, None, None)
            rows = _all_up(http)
            assert next(r for r in rows if r["replica"] == home["replica"])["pid"] != home["pid"]
    finally:
        server.stop()
