"""Requests an attacker would send (issue 13): huge templates, names and echoes, keep_alive
values no clock can hold, a normal key unloading what others use, coerced OpenAI types, more
prompts than can ever run, two Authorization headers. A real `shoal serve` with keys required:
the pinned SmolLM2 (`--model`) and a stored tiny model, the official openai client included."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

MODEL = "smollm2:135m"
TINY = "tiny:latest"
ADMIN_KEY = "hostile-requests-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Issue 13's 200-byte template: ten copies of a string, nine times over (10^9 characters).
DOUBLING = '{{ $s := "x" }}' + 9 * '{{ $s = print $s $s $s $s $s $s $s $s $s $s }}'


@pytest.fixture(scope="module")
def server(smollm2_path: Path, tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    """(server, a normal key's headers): keys required; SmolLM2 pinned, `tiny` in the store."""
    from live_server import LiveServer

    home = tmp_path_factory.mktemp("hostile")
    live = LiveServer(smollm2_path, "--served-model-name", f"{MODEL},smollm2", "--max-model-len", "256",
                      "--kv-cache-bytes", "64MiB", log_path=home / "serve.log",
                      env={"SHOAL_HOME": str(home), "SHOAL_AUTH": "on", "SHOAL_ADMIN_KEY": ADMIN_KEY})
    try:
        live.wait_ready()
        made = httpx.post(live.url + "/admin/keys", headers=ADMIN, json={"name": "user"}, timeout=60)
        assert made.status_code == 201, made.text
        weights = home / "tiny.gguf"
        shutil.copyfile(tiny_llama_gguf, weights)
        created = httpx.post(live.url + "/api/create", headers=ADMIN, timeout=300,
                             json={"model": TINY, "from": str(weights), "stream": False})
        assert created.status_code == 200, created.text
        yield live, {"Authorization": f"Bearer {made.json()['key']}"}
    finally:
        live.stop()


def post(server, path: str, body: dict | str, headers: dict, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=timeout)


def loaded(server) -> dict[str, dict]:
    ps = httpx.get(server.url + "/api/ps", headers=ADMIN, timeout=60)
    assert ps.status_code == 200, ps.text
    return {m["name"]: m for m in ps.json()["models"]}


def generate(server, headers: dict, model: str = TINY, **extra) -> httpx.Response:
    return post(server, "/api/generate", {"model": model, "prompt": "Hi", "stream": False,
                                          "options": {"num_predict": 2}, **extra}, headers)


# ---- finding 4: templates ------------------------------------------------------------------------

def test_the_issues_template_is_refused_at_once(server) -> None:
    live, user = server
    started = time.monotonic()
    reply = post(live, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False,
                                         "template": DOUBLING}, user, timeout=30)
    elapsed = time.monotonic() - started
    assert reply.status_code == 400, reply.text[:300]
    error = reply.json()["error"]
    assert error.startswith("template: ") and "too large" in error and len(error) < 400
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert generate(live, user, model=MODEL).status_code == 200


# ---- finding 5: what a normal key may unload -----------------------------------------------------

def test_a_normal_key_cannot_unload_models_others_use(server) -> None:
    live, user = server
    assert MODEL in loaded(live)
    # the explicit unload (an empty request with keep_alive 0) needs an admin key
    for path, empty in (("/api/generate", {"prompt": ""}), ("/api/chat", {"messages": []})):
        refused = post(live, path, {"model": "smollm2", "keep_alive": 0, **empty}, user)
        assert refused.status_code == 403, refused.text
        assert "needs an admin key" in refused.json()["error"]
    # a generation's keep_alive 0 is raised to the server's default for it
    assert generate(live, user, keep_alive=0).status_code == 200
    assert generate(live, user, model=MODEL, keep_alive=0).status_code == 200
    time.sleep(1.0)                                 # an unload would have happened by now
    assert {MODEL, TINY} <= loaded(live).keys()
    # an admin may unload the stored model, and nobody the pinned one
    for model in ("smollm2", TINY):
        reply = post(live, "/api/generate", {"model": model, "keep_alive": 0}, ADMIN)
        assert reply.status_code == 200 and reply.json()["done_reason"] == "unload"
    assert MODEL in loaded(live) and TINY not in loaded(live)
    assert generate(live, user, model=MODEL).status_code == 200


def test_deleting_a_name_that_is_not_stored_unloads_nothing(server) -> None:
    live, _ = server
    reply = httpx.request("DELETE", live.url + "/api/delete", headers=ADMIN, json={"model": "smollm2"},
                          timeout=60)
    assert reply.status_code == 404, reply.text
    assert MODEL in loaded(live)


# ---- finding 6: keep_alive values ---------------------------------------------------------------

@pytest.mark.parametrize("literal", ["1e18", "1e308", '"1000000000000000000s"', str(10**30)])
def test_a_keep_alive_past_any_clock_is_forever_and_ps_still_answers(server, literal: str) -> None:
    live, _ = server
    body = json.dumps({"model": TINY, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    reply = post(live, "/api/generate", body[:-1] + f', "keep_alive": {literal}}}', ADMIN)
    assert reply.status_code == 200, reply.text
    expires = loaded(live)[TINY]["expires_at"]
    assert int(expires[:4]) > time.gmtime().tm_year + 200       # Ollama's "forever"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", '"NaN"', '"inf"', '"-Infinity"'])
@pytest.mark.parametrize("path, base", [
    ("/api/generate", {"model": TINY, "prompt": "Hi", "stream": False}),
    ("/api/generate", {"model": TINY}),
    ("/api/chat", {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "stream": False}),
])
def test_a_keep_alive_that_is_not_finite_is_a_400(server, path: str, base: dict, literal: str) -> None:
    live, _ = server
    reply = post(live, path, json.dumps(base)[:-1] + f', "keep_alive": {literal}}}', ADMIN)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"].startswith("keep_alive: ")
    assert httpx.get(live.url + "/api/ps", headers=ADMIN).status_code == 200


# ---- finding 7: names and echoes ----------------------------------------------------------------

def _name_requests(name: str) -> list[tuple[str, str, dict, bool]]:
    """(method, path, body, admin) of every endpoint that takes a model name."""
    chat = [{"role": "user", "content": "Hi"}]
    return [
        ("POST", "/api/generate", {"model": name, "prompt": "Hi"}, False),
        ("POST", "/api/chat", {"model": name, "messages": chat}, False),
        ("POST", "/api/show", {"model": name}, False),
        ("POST", "/api/pull", {"model": name}, True),
        ("POST", "/api/push", {"model": name}, True),
        ("POST", "/api/create", {"model": name, "from": TINY}, True),
        ("POST", "/api/copy", {"source": TINY, "destination": name}, True),
        ("POST", "/api/copy", {"source": name, "destination": "copy-of"}, True),
        ("DELETE", "/api/delete", {"model": name}, True),
        ("POST", "/v1/chat/completions", {"model": name, "messages": chat}, False),
        ("POST", "/v1/completions", {"model": name, "prompt": "Hi"}, False),
        ("POST", "/tokenize", {"model": name, "prompt": "Hi"}, False),
        ("GET", "/v1/models/" + name, {}, False),
    ]


@pytest.mark.parametrize("size", [256, 100_000, 5_000_000])
def test_names_over_255_bytes_are_a_400_that_does_not_echo_them(server, size: int) -> None:
    live, user = server
    name = "m" * size if size < 100_000 else "é" * (size // 2)
    for method, path, body, admin in _name_requests(name):
        if method == "GET" and size > 10_000:
            continue                                  # beyond the header limit anyway (431)
        reply = httpx.request(method, live.url + path, headers=ADMIN if admin else user,
                              json=body or None, timeout=60)
        assert reply.status_code == 400, (path, reply.text[:300])
        assert len(reply.content) < 1000, (path, len(reply.content))
        assert "at most 255 bytes" in reply.text, (path, reply.text[:300])


def test_a_255_byte_name_is_looked_up_and_echoed_clipped(server) -> None:
    live, user = server
    name = "n" * 255
    reply = post(live, "/api/generate", {"model": name, "prompt": "Hi"}, user)
    assert reply.status_code == 404 and reply.json()["error"] == f"model '{name}' not found"
    reply = post(live, "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}]}, user)
    assert reply.status_code == 404 and name in reply.json()["error"]["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "r" * 1_000_000, "content": "x"}]}),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "r" * 1_000_000, "content": "x"}]}),
    ("/api/generate", {"model": MODEL, "prompt": "x", "think": "t" * 1_000_000}),
    ("/api/generate", {"model": MODEL, "keep_alive": "k" * 1_000_000}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "logit_bias": {"b" * 1_000_000: 1}}),
])
def test_echoed_input_is_clipped(server, path: str, body: dict) -> None:
    live, user = server
    reply = post(live, path, body, user)
    assert reply.status_code == 400, reply.text[:300]
    assert len(reply.content) < 2000, len(reply.content)
    assert "more characters)" in reply.text


# ---- finding 12: OpenAI's types and ranges, prompts, Authorization ------------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.mark.parametrize("field, literal", [
    ("max_tokens", '"5"'), ("max_tokens", "true"), ("max_tokens", "5.0"), ("stream", '"yes"'),
    ("stream", "1"), ("temperature", "3"), ("temperature", '"0.5"'), ("top_p", "1.5"), ("n", "2.0"),
    ("n", "129"), ("presence_penalty", "2.5"), ("frequency_penalty", "-3"), ("seed", '"7"'),
    ("logprobs", '"true"'), ("top_logprobs", "21"), ("stop", "5"), ("model", "7"),
])
def test_openai_fields_are_strictly_typed_and_in_range(server, field: str, literal: str) -> None:
    live, user = server
    body = json.dumps({k: v for k, v in CHAT.items() if k != field})
    reply = post(live, "/v1/chat/completions", body[:-1] + f', "{field}": {literal}}}', user)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: ")


def test_the_openai_client_is_still_served(server) -> None:
    live, user = server
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=user["Authorization"].split()[1], max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=3, temperature=2,
                                           top_p=0.5, presence_penalty=-2, frequency_penalty=2, n=2, seed=1)
    assert len(reply.choices) == 2 and reply.usage.completion_tokens <= 6
    stream = client.completions.create(model=MODEL, prompt=["Once", "Twice"], max_tokens=2, stream=True,
                                       temperature=1, logprobs=2, stream_options={"include_usage": True})
    assert next(c for c in stream if c.usage).usage.completion_tokens <= 4
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=CHAT["messages"], temperature=2.5)
    assert refused.value.body["param"] == "temperature"


def test_more_prompts_than_can_ever_run_are_a_400_naming_the_limit(server) -> None:
    live, user = server
    started = time.monotonic()
    reply = post(live, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 100_000, "max_tokens": 1}, user)
    assert reply.status_code == 400, reply.text[:300]
    error = reply.json()["error"]
    assert error["param"] == "prompt" and "SHOAL_MAX_QUEUE" in error["message"]
    assert error["message"].startswith("prompt: 100000 prompts in one request are more than")
    assert time.monotonic() - started < 10
    several = post(live, "/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 1}, user)
    assert several.status_code == 200 and len(several.json()["choices"]) == 3


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT),
                                        ("/api/chat", {**CHAT, "stream": False})])
def test_two_authorization_headers_are_a_400(server, path: str, body: dict) -> None:
    live, user = server
    for second in (ADMIN["Authorization"], "Bearer sk-shoal-wrong", user["Authorization"]):
        headers = [("Authorization", user["Authorization"]), ("Authorization", second),
                   ("Content-Type", "application/json")]
        reply = httpx.post(live.url + path, content=json.dumps(body), headers=headers, timeout=60)
        assert reply.status_code == 400, reply.text
        assert "2 Authorization headers" in reply.text
    assert post(live, path, body, user).status_code == 200
