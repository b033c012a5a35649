"""Admission control over real HTTP: queue bounds by requests and by prompt tokens, priority
classes, queue timeout, global token limits, the config file, and the SIGTERM drain.

The servers run SmolLM2 in exact mode (quick to load, and slow enough that a long stream
holds the one running slot while a test sends its other requests).
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from live_server import LiveServer

MODEL = "smollm2"
TESTS = Path(__file__).resolve().parents[1]
WITH_TEST_PRINCIPAL = (str(TESTS / "serve_with_test_principal.py"),)
BATCH_HEADER = {"X-Test-Priority-Class": "batch"}
LONG_PROMPT = "word " * 200          # ~200 tokens: over the tight server's queued-token bound
HUGE_PROMPT = "word " * 700          # over its prompt limit

TIGHT_CONFIG = """
[server]
max_queue = 7            # the flag wins
max_queue_batch = 5      # SHOAL_MAX_QUEUE_BATCH wins
max_queued_tokens = 120
max_prompt_tokens = 600
max_tokens = 1800
batch_aging = "10m"
queue_timeout = "5m"

[engine]
max_num_seqs = 1
compute = "exact"
"""


def metrics(server: LiveServer) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(server: LiveServer, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
    return metrics(server).get(key, 0.0)


def queued(server: LiveServer, priority_class: str = "interactive") -> float:
    return metric(server, "shoal:num_requests_queued", priority_class=priority_class)


def rejected(server: LiveServer, reason: str) -> float:
    return metric(server, "shoal:requests_rejected_total", reason=reason)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def openai_client(server: LiveServer, **headers: str) -> openai.OpenAI:
    # NOTE: max_retries=0: the client would otherwise honour Retry-After and try again.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120,
                         default_headers=headers or None)


def chat(client: openai.OpenAI, text: str = "Say hi.", **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                          **kwargs)


@contextlib.contextmanager
def holding_slots(server: LiveServer, count: int = 1, max_tokens: int = 1800) -> Iterator[None]:
    """Long streamed completions running (their first chunk read) until the block ends."""
    readers = []      # NOTE: kept: dropping a line iterator closes its response
    with contextlib.ExitStack() as stack:
        for i in range(count):
            response = stack.enter_context(httpx.stream(
                "POST", server.url + "/v1/completions", timeout=300, json={
                    "model": MODEL, "prompt": f"Story {i}: once upon a time", "stream": True,
                    "max_tokens": max_tokens, "ignore_eos": True}))
            assert response.status_code == 200
            readers.append(response.iter_lines())
            next(readers[-1])
        yield


def busy_status(exc_info: pytest.ExceptionInfo) -> tuple[int, int, str]:
    """(status, Retry-After, message) of a refused openai-client call."""
    response = exc_info.value.response
    return response.status_code, int(response.headers["retry-after"]), exc_info.value.message


# ---- the admission rules, without a server ------------------------------------------------

def test_queue_bounds_apply_beyond_the_free_slots() -> None:
    from shoal.core.errors import ServerBusyError
    from shoal.serving.admission import AdmissionControl, QueueLimits

    admission = AdmissionControl(QueueLimits(max_queue=1, max_queue_batch=2, max_queued_tokens=100))
    # two free slots: admitted whatever their size, queued only until the engine takes them
    slots = [admission.admit("m", 2, "interactive", 500) for _ in range(2)]
    with pytest.raises(ServerBusyError) as tokens:
        admission.admit("m", 2, "interactive", 50)     # 1000 prompt tokens wait already
    assert tokens.value.reason == "queue_tokens_full" and "SHOAL_MAX_QUEUED_TOKENS" in str(tokens.value)
    for slot in slots:
        slot.scheduled()
    queued_one = admission.admit("m", 2, "interactive", 50)    # the queue's one place
    with pytest.raises(ServerBusyError) as full:
        admission.admit("m", 2, "interactive", 1)
    assert full.value.reason == "queue_full" and "SHOAL_MAX_QUEUE" in str(full.value)
    # batch has places of its own, behind interactive ones, but shares the token bound
    with pytest.raises(ServerBusyError):
        admission.admit("m", 2, "batch", 60)
    batch = [admission.admit("m", 2, "batch", 20) for _ in range(2)]
    with pytest.raises(ServerBusyError) as batch_full:
        admission.admit("m", 2, "batch", 1)
    assert "SHOAL_MAX_QUEUE_BATCH" in str(batch_full.value)
    assert admission.queue("m").waiting == {"interactive": 1, "batch": 2}
    assert admission.queue("m").waiting_tokens == {"interactive": 50, "batch": 40}
    slots[0].release()
    slots[0].release()          # idempotent
    queued_one.scheduled()
    assert admission.queue("m").running == 2 and admission.queue("m").waiting["interactive"] == 0
    for slot in (slots[1], queued_one, *batch):
        slot.release()
    assert admission.in_flight() == 0


def test_duration_settings() -> None:
    import math

    from shoal.serving.settings import ServerSettings

    settings = ServerSettings.from_env({"SHOAL_QUEUE_TIMEOUT": "0", "SHOAL_BATCH_AGING": "-1",
                                        "SHOAL_DRAIN_TIMEOUT": "2m", "SHOAL_MAX_TOKENS": "64"})
    assert math.isinf(settings.queue_timeout) and math.isinf(settings.batch_aging)
    assert settings.drain_timeout == 120.0 and settings.max_tokens == 64


# ---- the tight server: one running slot, a queue of one per class, 120 queued tokens ---------

@pytest.fixture(scope="module")
def tight(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("tight")
    config = home / "shoal.toml"
    config.write_text(TIGHT_CONFIG)
    server = LiveServer(smollm2_path, "--config", str(config), "--max-queue", "1", "--verbose",
                        "--served-model-name", MODEL, "--max-model-len", "2048",
                        "--kv-cache-bytes", "160MiB",
                        env={"SHOAL_MAX_QUEUE": "9", "SHOAL_MAX_QUEUE_BATCH": "1",
                             "SHOAL_LOG_LEVEL": "info"},
                        log_path=home / "serve.log", entry=WITH_TEST_PRINCIPAL)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_the_config_file_sits_between_defaults_and_the_environment(tight: LiveServer) -> None:
    log = tight.log_path.read_text()
    assert "effective policy (defaults < config file" in log
    for line in ("server.max_queue = 1 (flag)", "server.max_queue_batch = 1 (env)",
                 "server.max_queued_tokens = 120 (file)", "server.max_prompt_tokens = 600 (file)",
                 "engine.max_num_seqs = 1 (file)", "engine.compute = 'exact' (file)",
                 "server.drain_timeout = 30.0 (default)"):
        assert line in log


def test_the_queue_bound_by_requests_in_both_dialects(tight: LiveServer) -> None:
    before = rejected(tight, "queue_full")
    with ThreadPoolExecutor(1) as pool, holding_slots(tight):
        # one request waits (the queue holds one); it is answered once the slot frees
        waiter = pool.submit(ollama.Client(tight.url).generate, model=MODEL, prompt="Hi",
                             options={"num_predict": 3})
        wait_for(lambda: queued(tight) == 1)
        with pytest.raises(openai.APIStatusError) as refused:
            chat(openai_client(tight), max_tokens=3)
        status, retry_after, message = busy_status(refused)
        assert status == 503 and retry_after >= 1
        assert "busy" in message and "SHOAL_MAX_QUEUE" in message
        assert refused.value.code == "server_busy"
        with pytest.raises(ollama.ResponseError) as refused_ollama:
            ollama.Client(tight.url).chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        assert refused_ollama.value.status_code == 503 and "SHOAL_MAX_QUEUE" in refused_ollama.value.error
        raw = httpx.post(tight.url + "/api/generate", json={"model": MODEL, "prompt": "Hi"}, timeout=30)
        assert raw.status_code == 503 and int(raw.headers["retry-after"]) >= 1
    assert waiter.result(timeout=120).done is True
    assert rejected(tight, "queue_full") - before == 3


def test_the_queue_bound_by_prompt_tokens_in_both_dialects(tight: LiveServer) -> None:
    before = rejected(tight, "queue_tokens_full")
    with holding_slots(tight):
        with pytest.raises(openai.APIStatusError) as refused:
            openai_client(tight).completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2)
        status, retry_after, message = busy_status(refused)
        assert status == 503 and retry_after >= 1 and "SHOAL_MAX_QUEUED_TOKENS" in message
        raw = httpx.post(tight.url + "/api/generate", timeout=30, json={
            "model": MODEL, "prompt": LONG_PROMPT, "stream": False, "options": {"num_predict": 2}})
        assert raw.status_code == 503 and int(raw.headers["retry-after"]) >= 1
        assert "SHOAL_MAX_QUEUED_TOKENS" in raw.json()["error"]
    assert rejected(tight, "queue_tokens_full") - before == 2
    # with the slot free, the same prompt never waits, so the token bound does not apply
    done = openai_client(tight).completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2)
    assert done.usage.prompt_tokens > 120 and done.choices[0].finish_reason == "length"


def test_batch_requests_have_their_own_bound_and_wait_behind_interactive_ones(tight: LiveServer) -> None:
    started: dict[str, float] = {}

    def stream(name: str, client: openai.OpenAI) -> str:
        chunks = chat(client, max_tokens=4, stream=True)   # returns once scheduled
        started[name] = time.monotonic()
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    batch_client = openai_client(tight, **BATCH_HEADER)
    with ThreadPoolExecutor(2) as pool:
        with holding_slots(tight):
            batch = pool.submit(stream, "batch", batch_client)
            wait_for(lambda: queued(tight, "batch") == 1)
            with pytest.raises(ollama.ResponseError) as refused:
                ollama.Client(tight.url, headers=BATCH_HEADER).generate(model=MODEL, prompt="Hi")
            assert refused.value.status_code == 503 and "SHOAL_MAX_QUEUE_BATCH" in refused.value.error
            # the interactive queue is separate: this one waits too, though it came later
            interactive = pool.submit(stream, "interactive", openai_client(tight))
            wait_for(lambda: queued(tight, "interactive") == 1)
        batch.result(timeout=120)
        interactive.result(timeout=120)
    assert started["interactive"] < started["batch"]


def test_global_limits_on_prompt_tokens_and_max_tokens(tight: LiveServer) -> None:
    before = rejected(tight, "too_many_tokens")
    client = openai_client(tight)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt=HUGE_PROMPT, max_tokens=2)
    assert "SHOAL_MAX_PROMPT_TOKENS" in too_long.value.message
    with pytest.raises(ollama.ResponseError) as too_long_ollama:
        ollama.Client(tight.url).generate(model=MODEL, prompt=HUGE_PROMPT)
    assert too_long_ollama.value.status_code == 400 and "SHOAL_MAX_PROMPT_TOKENS" in too_long_ollama.value.error
    with pytest.raises(openai.BadRequestError) as too_many:
        chat(client, max_tokens=1900)
    assert too_many.value.param == "max_tokens" and "1800 (SHOAL_MAX_TOKENS)" in too_many.value.message
    with pytest.raises(ollama.ResponseError) as too_many_ollama:
        ollama.Client(tight.url).generate(model=MODEL, prompt="Hi", options={"num_predict": 1900})
    assert too_many_ollama.value.status_code == 400
    assert "options.num_predict" in too_many_ollama.value.error
    assert rejected(tight, "too_many_tokens") - before == 4
    # asking for no particular number is not refused (the room left, ~2000, is capped instead)
    answer = ollama.Client(tight.url).chat(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                           options={"stop": [".", "!", "?", "\n"]})
    assert answer.done is True and answer.done_reason == "stop"


# ---- the config file, without a server ---------------------------------------------------

def test_config_precedence_and_errors(tmp_path: Path) -> None:
    from shoal.serving.policy import ConfigFileError, load_serve_config, policy_lines

    path = tmp_path / "shoal.toml"
    path.write_text('[server]\nmax_queue = 7\nmax_queue_batch = 5\nqueue_timeout = "2m"\n'
                    '[engine]\nmax_num_seqs = 4\n')
    resolved = load_serve_config(None, {"max_queue": 3, "port": None}, {"max_num_seqs": None},
                                 environ={"SHOAL_CONFIG": str(path), "SHOAL_MAX_QUEUE": "6",
                                          "SHOAL_MAX_QUEUE_BATCH": "2"})
    settings = resolved.settings
    assert (settings.max_queue, settings.max_queue_batch, settings.queue_timeout) == (3, 2, 120.0)
    assert resolved.engine.max_num_seqs == 4 and settings.max_queued_tokens == 1_000_000
    assert resolved.sources["server"]["max_queue"] == "flag"
    assert resolved.sources["server"]["queue_timeout"] == "file"
    assert any("server.queue_timeout = 120.0 (file)" == line.strip() for line in policy_lines(resolved))
    # --config wins over SHOAL_CONFIG; no file at all is fine
    other = tmp_path / "other.toml"
    other.write_text("[server]\nmax_queue = 11\n")
    chosen = load_serve_config(str(other), {}, {}, environ={"SHOAL_CONFIG": str(path)})
    assert chosen.path == other and chosen.settings.max_queue == 11
    assert load_serve_config(None, {}, {}, environ={}).path is None

    for text, expected in [
        ("[server]\nmax_qeue = 1\n", "server.max_qeue (did you mean max_queue?)"),
        ("[servre]\nport = 1\n", "servre (did you mean server?)"),
        ("max_queue = 1\n", "unknown keys: max_queue"),
        ("[server]\nmax_queue = 'many'\n", "[server] max_queue must be an integer, got 'many'"),
        ("[server]\nmax_queue = -1\n", "[server] max_queue: must be >= 0"),
        ("[server\n", "not valid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigFileError) as error:
            load_serve_config(str(path), {}, {}, environ={})
        assert str(path) in str(error.value) and expected in str(error.value), str(error.value)


def test_the_documented_config_file_loads(tmp_path: Path) -> None:
    from shoal.serving.policy import load_serve_config

    docs = (TESTS.parent / "docs" / "operations.md").read_text()
    example = docs.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "shoal.toml"
    path.write_text(example)
    resolved = load_serve_config(str(path), {}, {}, environ={})
    assert resolved.settings.queue_timeout == 30.0 and resolved.settings.max_queue == 64
    assert resolved.engine.kv_cache_bytes == 2 << 30 and resolved.engine.max_num_seqs == 32


def test_secrets_are_redacted_in_the_printed_policy() -> None:
    from shoal.serving.settings import ServerSettings
    from shoal.core.config import EngineConfig
    from shoal.serving.policy import ServeConfig, policy_lines

    settings = ServerSettings(admin_key="sk-very-secret-admin-key")
    sources = {"server": {name: "env" for name in settings.__dataclass_fields__},
               "engine": {name: "default" for name in EngineConfig.__dataclass_fields__}}
    text = "\n".join(policy_lines(ServeConfig(settings, EngineConfig(), sources, None)))
    assert "server.admin_key = <redacted> (env)" in text and "sk-very-secret" not in text
    assert "server.max_queued_tokens = 1000000" in text


def test_serve_refuses_a_config_file_with_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nmax_queue = 4\nqueue_timout = 10\n[engine]\nmax_num_seq = 2\n")
    done = subprocess.run([sys.executable, "-m", "shoal", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "server.queue_timout (did you mean queue_timeout?)" in done.stderr
    assert "engine.max_num_seq (did you mean max_num_seqs?)" in done.stderr


# ---- queue timeout and the SIGTERM drain ---------------------------------------------------

@pytest.fixture(scope="module")
def draining(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two running slots, a 2 s queue timeout and a 20 s drain (the last test stops it)."""
    home = tmp_path_factory.mktemp("draining")
    server = LiveServer(smollm2_path, "--max-num-seqs", "2", "--max-queue", "4", "--queue-timeout", "2",
                        "--drain-timeout", "20", "--compute", "exact", "--served-model-name", MODEL,
                        "--max-model-len", "4096", "--kv-cache-bytes", "256MiB",
                        env={"SHOAL_LOG_LEVEL": "info"}, log_path=home / "serve.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_a_request_that_waits_too_long_gets_503_not_a_hang(draining: LiveServer) -> None:
    before = rejected(draining, "queue_timeout")
    with holding_slots(draining, count=2):
        # a stream too: its status waits until it is scheduled, so it can still be a 503
        with pytest.raises(openai.APIStatusError) as refused:
            list(chat(openai_client(draining), max_tokens=3, stream=True))
        status, retry_after, message = busy_status(refused)
        assert status == 503 and retry_after >= 1 and "SHOAL_QUEUE_TIMEOUT" in message
        with httpx.stream("POST", draining.url + "/api/chat", timeout=60, json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}) as ollama_style:
            assert ollama_style.status_code == 503
            assert int(ollama_style.headers["retry-after"]) >= 1
            assert "SHOAL_QUEUE_TIMEOUT" in ollama_style.read().decode()
        assert queued(draining) == 0          # both left the queue (aborted in the engine)
    assert rejected(draining, "queue_timeout") - before == 2


def test_sigterm_drains_running_streams_then_exits_0(draining: LiveServer) -> None:
    client = openai_client(draining)
    long = httpx.stream("POST", draining.url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "A very long story:", "stream": True, "max_tokens": 4000,
        "ignore_eos": True})
    with long as long_response:
        long_lines = long_response.iter_lines()
        next(long_lines)
        # NOTE: sized so that the short stream ends within the drain even on a crowded
        # machine (8 tokens in 20 s), while 4000 tokens cannot (200 tokens/s in exact mode)
        short = chat(client, "Count to one hundred.", max_tokens=8, stream=True,
                     extra_body={"ignore_eos": True})
        short_chunks = iter(short)
        next(short_chunks)
        assert httpx.get(draining.url + "/readyz").status_code == 200

        draining.process.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(draining.url + "/readyz").status_code == 503, timeout=30)
        assert httpx.get(draining.url + "/readyz").json() == {"status": "draining"}
        assert httpx.get(draining.url + "/livez").status_code == 200
        with pytest.raises(openai.APIStatusError) as refused:
            chat(client, max_tokens=2)
        assert refused.value.status_code == 503 and refused.value.code == "server_shutting_down"
        refused_ollama = httpx.post(draining.url + "/api/generate", timeout=30,
                                    json={"model": MODEL, "prompt": "Hi", "stream": False})
        assert refused_ollama.status_code == 503 and "shutting down" in refused_ollama.json()["error"]
        assert rejected(draining, "shutting_down") == 2

        # the short stream finishes normally within the drain
        rest = list(short_chunks)
        finishes = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
        # the long one cannot: at the drain timeout it is aborted, its stream still ends cleanly
        events = [line.removeprefix("data: ") for line in long_lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and '"finish_reason":"abort"' in events[-2]
    assert draining.process.wait(60) == 0
    log = draining.log_path.read_text()
    assert "aborting 1 request(s) still running at the end of the drain" in log
    assert drain_logged_in_order(log)


def drain_logged_in_order(log: str) -> bool:
    """The drain's log lines come in order: the drain starts, aborts, then uvicorn stops."""
    marks = ["shutting down: not ready", "aborting 1 request", "drained; exiting",
             "Application shutdown complete"]
    positions = [log.find(mark) for mark in marks]
    return all(p >= 0 for p in positions) and positions == sorted(positions)
