"""Tool calls in the three native formats (Hermes/Qwen, Llama 3.x JSON, Mistral) through a real
`shoal serve` of tiny random models whose templates render tools, in both dialects: forced
calls parse and validate, streamed deltas reassemble to the same calls, auto mode's lazy
grammar keeps every call it lets through valid, and the history round trip renders the calls
and results back through the template. Bad tool input is a 400 naming the field."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
import tiny_models
import tool_models
from live_server import LiveServer

FORMATS = ("hermes", "llama3_json", "mistral")
PARAMS = {"type": "object",
          "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                         "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "forecast", "description": "Weather forecast",
                                           "parameters": PARAMS}},
         {"type": "function", "function": {"name": "now", "parameters": {
             "type": "object", "properties": {}, "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What will the weather be?"}]
# how each template writes a call back into the prompt
RENDERED_CALL = {
    "hermes": '<tool_call>\n{"name": "forecast", "arguments": {"unit": ',
    "llama3_json": '<|python_tag|>{"name": "forecast", "parameters": {"unit": ',
    "mistral": '[TOOL_CALLS][{"name": "forecast", "arguments": {"unit": ',
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = {}
    try:
        for fmt in FORMATS:
            path = tool_models.write_tool_model(tmp_path_factory.mktemp(fmt), fmt)
            started[fmt] = LiveServer(path, "--served-model-name", "tiny", "--max-model-len", "1024",
                                      log_path=tmp_path_factory.mktemp(f"{fmt}-log") / "serve.log")
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def _chat(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": ASK, "max_tokens": 160, "tools": TOOLS, **body})


def _check_call(call: dict) -> dict:
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "forecast"
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, PARAMS)
    return args


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "forecast"}}])
def test_forced_call_parses_and_validates(servers, fmt, choice) -> None:
    for seed in (1, 2):
        r = _chat(servers[fmt], tool_choice=choice, seed=seed, temperature=1.0,
                  parallel_tool_calls=False, tools=TOOLS[:1] if choice == "required" else TOOLS)
        assert r.status_code == 200, r.text
        choice0 = r.json()["choices"][0]
        calls = choice0["message"]["tool_calls"]
        assert len(calls) == 1 and choice0["finish_reason"] == "tool_calls", choice0
        assert choice0["message"]["content"] is None
        _check_call(calls[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_call_deltas_reassemble(servers, fmt) -> None:
    body = {"tool_choice": "required", "tools": TOOLS[:1], "temperature": 0, "parallel_tool_calls": False}
    whole = _chat(servers[fmt], **body).json()["choices"][0]["message"]["tool_calls"][0]
    calls: dict[int, dict] = {}
    finish = None
    with httpx.stream("POST", servers[fmt].url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": ASK, "max_tokens": 160, "stream": True, **body}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            delta = choice["delta"]
            assert not delta.get("content"), delta
            for part in delta.get("tool_calls", []):
                if part["index"] not in calls:      # the first delta of a call: OpenAI's shape
                    assert set(part) == {"index", "id", "type", "function"}
                    assert part["function"]["arguments"] == ""
                    calls[part["index"]] = {"id": part["id"], "name": part["function"]["name"], "arguments": ""}
                else:
                    assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
                    calls[part["index"]]["arguments"] += part["function"]["arguments"]
            finish = choice["finish_reason"] or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == whole["function"]["name"]
    assert json.loads(calls[0]["arguments"]) == json.loads(whole["function"]["arguments"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_leaves_text_alone_and_enforces_a_call_once_opened(servers, fmt) -> None:
    # unbiased, the random model writes text: no calls, its own finish reason
    r = _chat(servers[fmt], seed=3, max_tokens=24)
    choice = r.json()["choices"][0]
    assert choice["message"]["tool_calls"] == [] and choice["finish_reason"] == "length"
    assert choice["message"]["content"]
    # pushed towards the call marker (its token is the first after the base vocabulary), it
    # opens a call, and from there the lazy grammar holds it to a valid one
    marker = str(tiny_models.VOCAB_SIZE)
    for seed in (1, 2):
        r = _chat(servers[fmt], seed=seed, parallel_tool_calls=False, logit_bias={marker: 100})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1, choice
        call = choice["message"]["tool_calls"][0]
        if call["function"]["name"] == "forecast":
            _check_call(call)
        else:
            assert call["function"]["arguments"] == "{}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_history_round_trip(servers, fmt) -> None:
    server = servers[fmt]
    first = _chat(server, tool_choice="required", tools=TOOLS[:1], temperature=0,
                  parallel_tool_calls=False).json()["choices"][0]["message"]
    history = [*ASK, first, {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"],
                             "content": "sunny and 21 degrees"}]
    ids = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": history, "tools": TOOLS},
                     timeout=30).json()["tokens"]
    prompt = httpx.post(server.url + "/detokenize", json={"model": "tiny", "tokens": ids}, timeout=30).json()["prompt"]
    args = json.loads(first["tool_calls"][0]["function"]["arguments"])
    assert RENDERED_CALL[fmt] + json.dumps(args["unit"]) in prompt
    assert "sunny and 21 degrees" in prompt and "forecast" in prompt
    r = _chat(server, messages=history, temperature=0, max_tokens=16)
    assert r.status_code == 200, r.text


# NOTE: a near-uniform sampler (temperature 30, no top-k/top-p) makes the random model hit the
# call marker within a few seeds; Ollama has no tool_choice or logit_bias to force one.
HOT = {"temperature": 30.0, "top_k": 0, "top_p": 1.0, "num_predict": 150}


@pytest.mark.parametrize("fmt", ["hermes", "mistral"])
def test_ollama_chat_tools(servers, fmt) -> None:
    found = None
    for seed in range(12):
        r = httpx.post(servers[fmt].url + "/api/chat", timeout=60, json={
            "model": "tiny", "messages": ASK, "tools": TOOLS, "stream": False, "options": {"seed": seed, **HOT}})
        assert r.status_code == 200, r.text
        body = r.json()
        for call in body["message"].get("tool_calls", []):
            assert isinstance(call["function"]["arguments"], dict)     # Ollama: an object
            if call["function"]["name"] == "forecast":
                jsonschema.validate(call["function"]["arguments"], PARAMS)
            else:
                assert call["function"]["arguments"] == {}
        assert body["done_reason"] in ("stop", "length")
        if body["message"].get("tool_calls"):
            found = (seed, body["message"])
            break
    assert found, "no seed made a call"
    seed, message = found
    # the same seed streamed: each call arrives whole, in a line of its own
    streamed, content = [], ""
    with httpx.stream("POST", servers[fmt].url + "/api/chat", timeout=60, json={
            "model": "tiny", "messages": ASK, "tools": TOOLS, "options": {"seed": seed, **HOT}}) as r:
        for line in r.iter_lines():
            chunk = json.loads(line)
            calls = chunk["message"].get("tool_calls", [])
            assert not (calls and chunk["message"]["content"])
            streamed += calls
            content += chunk["message"]["content"]
    assert [c["function"] for c in streamed] == [c["function"] for c in message["tool_calls"]]
    assert content.strip() == message["content"].strip()
    # the history with Ollama's tool message goes back through the template
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": message["tool_calls"]},
               {"role": "tool", "tool_name": message["tool_calls"][0]["function"]["name"], "content": "sunny"}]
    r = httpx.post(servers[fmt].url + "/api/chat", timeout=60, json={
        "model": "tiny", "messages": history, "tools": TOOLS, "stream": False, "options": {"num_predict": 8}})
    assert r.status_code == 200, r.text
    assert r.json()["prompt_eval_count"] > 0


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required", "tools": []}, "tool_choice"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_openai_bad_tool_input_is_a_400_naming_it(servers, extra, param) -> None:
    r = _chat(servers["hermes"], **extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_ollama_bad_tool_input_is_a_400_naming_it(servers) -> None:
    for tools, param in [(BAD[0][0]["tools"], "tools[0].function.parameters"),
                         ([{"type": "retrieval"}], "tools[0].type")]:
        r = httpx.post(servers["mistral"].url + "/api/chat", timeout=30,
                       json={"model": "tiny", "messages": ASK, "tools": tools, "stream": False})
        assert r.status_code == 400 and param in r.json()["error"], r.text
    r = httpx.post(servers["mistral"].url + "/api/chat", timeout=30,
                   json={"model": "tiny", "messages": ASK, "tools": TOOLS, "format": "json", "stream": False})
    assert r.status_code == 400 and "format" in r.json()["error"]
