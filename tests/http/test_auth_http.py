"""API keys over HTTP: a real server with keys required (SHOAL_AUTH=on on loopback), keys made
with `shoal keys`, and the official openai and ollama clients in both dialects."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest

ENV_ADMIN_KEY = "env-admin-key-for-tests-0123456789"
MODEL = "smollm2:135m"
CHAT = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def keyed(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """(server, keys by name): a server that requires keys, and keys of every kind."""
    from live_server import keyed_server, shoal_keys

    home = tmp_path_factory.mktemp("shoal-home")
    keys = {
        "good": shoal_keys(home, "create", "good"),
        "smollm2-only": shoal_keys(home, "create", "smollm2-only", "--models", "smollm2"),
        "other-only": shoal_keys(home, "create", "other-only", "--models", "qwen:0.5b"),
        "rpm": shoal_keys(home, "create", "rpm-bot", "--rpm", "2"),
        "embed-rpm": shoal_keys(home, "create", "embed-bot", "--rpm", "1"),
        "one-at-a-time": shoal_keys(home, "create", "one-at-a-time", "--max-concurrent", "1"),
        "revoked": shoal_keys(home, "create", "revoked"),
        "expiring": shoal_keys(home, "create", "expiring", "--expires", "1s"),
        "admin": shoal_keys(home, "create", "root", "--admin"),
        "env-admin": ENV_ADMIN_KEY,
    }
    shoal_keys(home, "revoke", keys["revoked"].removeprefix("sk-shoal-").split("_")[0])
    with keyed_server(smollm2_path, home, ENV_ADMIN_KEY, "--max-model-len", "2048",
                      "--kv-cache-bytes", "128MiB") as server:
        yield server, keys


def _openai(server, key: str) -> openai.OpenAI:
    # NOTE: no retries: the client would otherwise sleep through Retry-After on a 429.
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _ollama(server, key: str | None) -> ollama.Client:
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {key}"} if key else None)


def _chat_openai(server, key: str, **extra):
    return _openai(server, key).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3,
                                                        temperature=0, **extra)


def _chat_ollama(server, key: str | None):
    return _ollama(server, key).chat(model=MODEL, messages=CHAT, options={"num_predict": 3})


def test_open_endpoints_answer_without_a_key(keyed) -> None:
    server, _ = keyed
    for path in ("/", "/health", "/version", "/api/version"):
        assert httpx.get(server.url + path).status_code == 200, path


def test_metrics_need_a_key_when_keys_are_required(keyed) -> None:
    """/metrics names the key ids of callers: behind a key by default (SHOAL_METRICS_AUTH=auto)."""
    server, keys = keyed
    _chat_ollama(server, keys["good"])
    refused = httpx.get(server.url + "/metrics")
    assert refused.status_code == 401 and "shoal:" not in refused.text
    assert refused.json()["error"]["code"] == "invalid_api_key"
    answered = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {keys['good']}"})
    assert answered.status_code == 200 and 'key="' in answered.text


def _raw_chat(server, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": MODEL, "messages": CHAT, "max_tokens": 3})


def test_no_key_gets_401_in_both_dialects(keyed) -> None:
    server, _ = keyed
    # NOTE: the openai client refuses to send no key at all; raw HTTP does.
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwdw=="}):
        response = _raw_chat(server, headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert "missing API key: send it as 'Authorization: Bearer <key>'" in error["message"]
    with pytest.raises(ollama.ResponseError) as err:
        _chat_ollama(server, None)
    assert err.value.status_code == 401 and "missing API key" in err.value.error


@pytest.mark.parametrize("which", ["wrong", "revoked", "expiring"])
def test_bad_keys_get_401_in_both_dialects(keyed, which: str) -> None:
    server, keys = keyed
    key = {**keys, "wrong": "sk-shoal-0123456789ab_" + "x" * 43}[which]
    words = {"wrong": "invalid API key", "revoked": "'revoked' has been revoked",
             "expiring": "'expiring' expired at"}[which]
    with pytest.raises(openai.AuthenticationError) as err:
        _chat_openai(server, key)
    assert err.value.status_code == 401 and words in err.value.body["message"]
    assert err.value.body["type"] == "authentication_error" and err.value.body["code"] == "invalid_api_key"
    assert err.value.response.headers["www-authenticate"] == "Bearer"
    with pytest.raises(ollama.ResponseError) as err:
        _chat_ollama(server, key)
    assert err.value.status_code == 401 and words in err.value.error
    response = httpx.get(server.url + "/api/tags", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 401 and words in response.json()["error"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_good_key_is_served_in_both_dialects(keyed) -> None:
    server, keys = keyed
    reply = _chat_openai(server, keys["good"])
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 3
    stream = _openai(server, keys["good"]).completions.create(model=MODEL, prompt="Once", max_tokens=3,
                                                              stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert _chat_ollama(server, keys["good"]).message.content
    assert [m.model for m in _ollama(server, keys["good"]).list().models] == [MODEL]
    assert [m.id for m in _openai(server, keys["good"]).models.list()] == [MODEL]


def test_models_outside_a_keys_list_get_403_and_are_not_listed(keyed) -> None:
    server, keys = keyed
    with pytest.raises(openai.PermissionDeniedError) as err:
        _chat_openai(server, keys["other-only"])
    assert err.value.status_code == 403 and err.value.body["type"] == "permission_error"
    assert err.value.body["code"] == "model_not_allowed"
    assert err.value.body["message"] == "the API key 'other-only' may not use the model 'smollm2:135m'"
    with pytest.raises(ollama.ResponseError) as err:
        _chat_ollama(server, keys["other-only"])
    assert err.value.status_code == 403 and "may not use the model" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:       # nor show, nor load it
        _ollama(server, keys["other-only"]).show(MODEL)
    assert err.value.status_code == 403
    with pytest.raises(openai.PermissionDeniedError):
        _openai(server, keys["other-only"]).models.retrieve(MODEL)
    assert list(_openai(server, keys["other-only"]).models.list()) == []
    assert _ollama(server, keys["other-only"]).list().models == []
    assert _ollama(server, keys["other-only"]).ps().models == []
    # `smollm2` in a key's list means smollm2:latest, which this model answers to
    assert _chat_openai(server, keys["smollm2-only"]).choices[0].message.content
    assert _chat_ollama(server, keys["smollm2-only"]).message.content
    assert [m.id for m in _openai(server, keys["smollm2-only"]).models.list()] == [MODEL]


def test_over_the_request_rate_gets_429_with_retry_after_in_both_dialects(keyed) -> None:
    server, keys = keyed
    key = keys["rpm"]
    _chat_openai(server, key)
    _chat_ollama(server, key)
    message = "rate limit: 2 requests per minute for key 'rpm-bot'"
    with pytest.raises(openai.RateLimitError) as err:
        _chat_openai(server, key)
    assert err.value.status_code == 429 and err.value.body["message"] == message
    assert err.value.body["type"] == "rate_limit_error" and err.value.body["code"] == "rate_limit_exceeded"
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    with pytest.raises(ollama.ResponseError) as err:
        _chat_ollama(server, key)
    assert err.value.status_code == 429 and err.value.error == message
    raw = httpx.post(server.url + "/api/generate", headers={"Authorization": f"Bearer {key}"},
                     json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    assert raw.status_code == 429 and raw.json() == {"error": message}
    assert 1 <= int(raw.headers["retry-after"]) <= 60


def test_over_the_concurrency_limit_gets_429_until_the_stream_ends(keyed) -> None:
    server, keys = keyed
    key = keys["one-at-a-time"]
    stream = _openai(server, key).completions.create(
        model=MODEL, prompt="Count:", max_tokens=1000, stream=True, extra_body={"ignore_eos": True})
    try:
        assert next(iter(stream)) is not None       # running now
        with pytest.raises(openai.RateLimitError) as err:
            _chat_openai(server, key)
        assert err.value.body["message"] == "rate limit: 1 concurrent requests for key 'one-at-a-time'"
        assert err.value.response.headers["retry-after"] == "1"
        with pytest.raises(ollama.ResponseError) as err:
            _chat_ollama(server, key)
        assert err.value.status_code == 429 and "1 concurrent requests" in err.value.error
        assert _chat_ollama(server, keys["good"]).message.content     # other keys are not held up
    finally:
        stream.close()                              # the client leaves: the slot is freed
    deadline = time.monotonic() + 30
    while True:
        try:
            assert _chat_ollama(server, key).message.content
            break
        except ollama.ResponseError as exc:
            assert exc.status_code == 429 and time.monotonic() < deadline
            time.sleep(0.2)


def test_the_admin_api_needs_an_admin_key(keyed) -> None:
    server, keys = keyed
    url = server.url + "/admin/keys"

    def call(method: str, path: str = "", key: str | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, url + path, headers=headers, timeout=30, **kw)

    assert call("GET").status_code == 401
    assert call("GET", key="sk-shoal-0123456789ab_" + "x" * 43).status_code == 401
    denied = call("GET", key=keys["good"])
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_required"
    assert call("POST", key=keys["good"], json={"name": "sneaky", "admin": True}).status_code == 403
    for admin in (keys["admin"], keys["env-admin"]):
        listing = call("GET", key=admin)
        assert listing.status_code == 200
        names = {k["name"]: k for k in listing.json()["keys"]}
        assert {"good", "rpm-bot", "root", "revoked"} <= set(names)
        assert names["revoked"]["status"] == "revoked" and names["rpm-bot"]["rpm"] == 2
        for key in keys.values():
            assert key.split("_", 1)[-1] not in listing.text
        assert "secret_hash" not in listing.text
    made = call("POST", key=keys["admin"], json={"name": "made-over-http", "models": ["smollm2"],
                                                  "rpm": 100, "expires": "1d"})
    assert made.status_code == 201, made.text
    new = made.json()
    assert new["key"].startswith("sk-shoal-") and new["models"] == ["smollm2:latest"]
    assert _chat_openai(server, new["key"]).choices[0].message.content
    bad = call("POST", key=keys["admin"], json={"name": "x", "rpm": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"
    dup = call("POST", key=keys["admin"], json={"name": "made-over-http"})
    assert dup.status_code == 400 and "an active key named" in dup.json()["error"]["message"]
    revoked = call("DELETE", f"/{new['id']}", key=keys["env-admin"])
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    with pytest.raises(openai.AuthenticationError):
        _chat_openai(server, new["key"])
    missing = call("DELETE", "/000000000000", key=keys["admin"])
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "key_not_found"


def test_key_limits_too_large_to_store_are_400(keyed) -> None:
    # found by tests/http/test_fuzz.py: an rpm over 2**63 was a 500 (OverflowError at the INSERT)
    server, keys = keyed
    for field in ("rpm", "tpm", "max_concurrent", "max_prompt_tokens", "max_tokens"):
        reply = httpx.post(server.url + "/admin/keys", json={"name": f"huge-{field}", field: 2**63},
                           headers={"Authorization": f"Bearer {keys['admin']}"}, timeout=30)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == field
    largest = httpx.post(server.url + "/admin/keys", json={"name": "largest-rpm", "rpm": 2**63 - 1},
                         headers={"Authorization": f"Bearer {keys['admin']}"}, timeout=30)
    assert largest.status_code == 201 and largest.json()["rpm"] == 2**63 - 1, largest.text


def test_model_management_needs_an_admin_key(keyed) -> None:
    server, keys = keyed
    for key, status in ((None, 401), (keys["good"], 403)):
        client = _ollama(server, key)
        for action in (lambda: client.pull("smollm2"), lambda: client.delete("no-such-model"),
                       lambda: client.copy(MODEL, "copy-of-it"),
                       lambda: client.create("made", from_=MODEL)):
            with pytest.raises(ollama.ResponseError) as err:
                action()
            assert err.value.status_code == status
    assert "needs an admin key" in err.value.error
    for admin in (keys["admin"], keys["env-admin"]):
        # an admin gets past the key check to the store's own answer
        with pytest.raises(ollama.ResponseError) as err:
            _ollama(server, admin).delete("no-such-model")
        assert err.value.status_code == 404


def _rejected(server) -> dict[tuple[str, str], float]:
    """shoal:requests_rejected_total by (model_name, reason)."""
    counts = {}
    key = ENV_ADMIN_KEY     # /metrics needs a key on this server (SHOAL_METRICS_AUTH=auto)
    for line in httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text.splitlines():
        if line.startswith("shoal:requests_rejected_total{"):
            labels, value = line.rsplit(" ", 1)
            model = labels.split('model_name="')[1].split('"')[0]
            reason = labels.split('reason="')[1].split('"')[0]
            counts[(model, reason)] = float(value)
    return counts


def test_refusals_are_counted_by_reason(keyed) -> None:
    server, keys = keyed
    before = _rejected(server)
    made = httpx.post(server.url + "/admin/keys", json={"name": "counted", "rpm": 1},
                      headers={"Authorization": f"Bearer {keys['admin']}"})
    key = made.json()["key"]
    _chat_ollama(server, key)
    for _ in range(2):
        with pytest.raises(ollama.ResponseError):
            _chat_ollama(server, key)
    assert httpx.get(server.url + "/api/tags").status_code == 401
    with pytest.raises(openai.PermissionDeniedError):
        _chat_openai(server, keys["other-only"])
    after = _rejected(server)
    for label, more in {(MODEL, "rate_limited"): 2, ("", "unauthorized"): 1, (MODEL, "forbidden"): 1}.items():
        assert after[label] - before.get(label, 0.0) == more, label


@pytest.mark.parametrize("host, env", [("0.0.0.0", {}), ("127.0.0.1", {"SHOAL_AUTH": "on"})])
def test_serve_refuses_to_start_without_keys_when_they_are_required(tmp_path: Path, host: str,
                                                                    env: dict[str, str]) -> None:
    from live_server import free_port

    base = {k: v for k, v in os.environ.items()
            if k not in ("SHOAL_AUTH", "SHOAL_ADMIN_KEY", "SHOAL_KEYS_DB")}
    done = subprocess.run([sys.executable, "-m", "shoal", "serve", "--host", host, "--port", str(free_port())],
                          env={**base, "SHOAL_HOME": str(tmp_path), **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert f"refusing to serve on {host} without API keys" in done.stderr
    assert "shoal keys create NAME" in done.stderr and "SHOAL_AUTH=off" in done.stderr
    assert not (tmp_path / "keys.db").exists()


def test_the_command_line_sends_shoal_api_key(keyed) -> None:
    server, keys = keyed
    env = {**{k: v for k, v in os.environ.items() if k != "SHOAL_API_KEY"},
           "SHOAL_HOST": server.url, "SHOAL_NO_AUTOSTART": "1"}

    def shoal_list(extra: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shoal", "list"], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)

    denied = shoal_list({})
    assert denied.returncode == 1 and "missing API key" in denied.stderr
    listed = shoal_list({"SHOAL_API_KEY": keys["good"]})
    assert listed.returncode == 0 and MODEL in listed.stdout


def test_embeddings_go_through_the_keys_allow_lists_and_quotas(keyed) -> None:
    """An embedding request is a model request like any: the key, its model list, its rate."""
    server, keys = keyed
    with pytest.raises(openai.AuthenticationError):
        _openai(server, "sk-shoal-nonsense").embeddings.create(model=MODEL, input="hi")
    with pytest.raises(openai.PermissionDeniedError) as err:
        _openai(server, keys["other-only"]).embeddings.create(model=MODEL, input="hi")
    assert err.value.body["code"] == "model_not_allowed"
    with pytest.raises(ollama.ResponseError) as denied:
        _ollama(server, keys["other-only"]).embed(model=MODEL, input="hi")
    assert denied.value.status_code == 403
    first = _openai(server, keys["embed-rpm"]).embeddings.create(model=MODEL, input=["hi", "yo"])
    assert len(first.data) == 2 and len(first.data[0].embedding) == 576
    with pytest.raises(openai.RateLimitError) as limited:
        _openai(server, keys["embed-rpm"]).embeddings.create(model=MODEL, input="hi")
    assert "1 requests per minute" in limited.value.body["message"]
