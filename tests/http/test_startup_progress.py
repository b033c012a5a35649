"""A server says what it does while its model loads (issue 17): the port opens first, GET /
and /readyz answer 503 with the activity (downloading, building the CPU kernels, loading),
/api/ps carries it too, requests wait for the model, and the log has a line every 1.5 s."""
from __future__ import annotations

import re
import time

import httpx

from tests.live_server import LiveServer


def test_a_loading_server_answers_and_says_what_it_is_doing(smollm2_path, tmp_path) -> None:
    log = tmp_path / "serve.log"
    # An empty kernel cache: the kernels build while the model loads, as on a first start.
    server = LiveServer(smollm2_path, "--served-model-name", "smollm2:135m", "--max-model-len", "512",
                        "--kv-cache-bytes", "64MiB", log_path=log,
                        env={"SHOAL_LOG_LEVEL": "info", "SHOAL_KERNEL_CACHE": str(tmp_path / "kernels")})
    seen: list[tuple[int, dict]] = []
    ps_during_load: dict | None = None
    early_answer: httpx.Response | None = None
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            assert server.process.poll() is None, server.log()
            try:
                reply = httpx.get(server.url + "/readyz", timeout=5)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen.append((reply.status_code, reply.json()))
            if reply.status_code == 200:
                break
            if ps_during_load is None:
                ps_during_load = httpx.get(server.url + "/api/ps", timeout=5).json()
                root = httpx.get(server.url + "/", timeout=5)
                assert root.status_code == 503 and root.text.startswith("shoal is starting"), root.text
                # a request for the loading model waits for it instead of failing
                early_answer = httpx.post(server.url + "/api/generate", timeout=400, json={
                    "model": "smollm2:135m", "prompt": "hi", "stream": False,
                    "options": {"num_predict": 2, "temperature": 0}})
            time.sleep(0.1)
        assert seen and seen[-1] == (200, {"status": "ready"}), seen[-5:]
        loading = [body for status, body in seen if status == 503]
        assert loading, "the port opened only after the model had loaded"
        assert all(body["status"] == "loading" for body in loading), loading
        assert any("loading smollm2:135m" in body.get("activity", "") for body in loading), loading
        assert ps_during_load is not None and ps_during_load["status"] == "loading"
        assert "smollm2:135m" in ps_during_load["activity"]
        assert early_answer is not None and early_answer.status_code == 200, early_answer.text
        assert early_answer.json()["response"]
        ps = httpx.get(server.url + "/api/ps", timeout=5).json()
        assert ps["status"] == "ready" and "activity" not in ps
        assert [m["name"] for m in ps["models"]] == ["smollm2:135m"]
    finally:
        server.stop()
    text = log.read_text(errors="replace")
    assert "shoal is listening on" in text and "shoal is ready on" in text
    # the effective settings in one line: those changed (flags here), not ~50 defaults
    policy = [line for line in text.splitlines() if "effective policy" in line]
    assert len(policy) == 1 and "engine.max_model_len = 512 (flag)" in policy[0], policy
    assert "(default)" not in text and "at their defaults" in policy[0]
    # The log's progress lines while loading: the building kernels are said, lines come often.
    stamps = [line for line in text.splitlines() if "loading smollm2:135m:" in line]
    assert stamps, text[-3000:]
    assert re.search(r"built the CPU kernels \(\S+\) in", text), text[-3000:]


def test_a_model_that_cannot_load_stops_the_server_with_its_error(tmp_path) -> None:
    missing = tmp_path / "missing.gguf"
    server = LiveServer(missing, log_path=tmp_path / "serve.log", env={"SHOAL_LOG_LEVEL": "info"})
    try:
        assert server.process.wait(120) != 0
    finally:
        server.stop()
    assert re.search(r"missing\.gguf.*no such file", server.log()), server.log()
