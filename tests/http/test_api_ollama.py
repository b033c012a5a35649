"""The Ollama dialect (/api/*) against a real `shoal serve`, through the real `ollama` client.

Answers are kept short (num_predict 4..24) so the file stays fast on two cores.
"""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import ollama
import pytest

from shoal.core.errors import EngineDeadError
from shoal.http.ollama import templates
from shoal.http.ollama.serving import Turn, stream_lines, truncate_prompt

MODEL = "smollm2:135m"
PROMPT = "Write a long story about a dragon who learns to bake bread."
GREEDY = {"temperature": 0, "num_predict": 16}
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$")
FINAL_INTS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
              "eval_count", "eval_duration")


@pytest.fixture(scope="module")
def client(shoal_server) -> ollama.Client:
    return ollama.Client(host=shoal_server.url, timeout=120)


def post(server, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (dict, list)):
        kw["json"] = body
    else:
        kw["content"] = body
    return httpx.post(server.url + path, timeout=120, **kw)


def ndjson_lines(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def check_final(final: dict, num_predict: int | None = None) -> None:
    """The done=true object: every statistic an int, durations > 0, and consistent."""
    assert final["done"] is True
    assert final["done_reason"] in ("stop", "length")
    for name in FINAL_INTS:
        assert isinstance(final[name], int) and not isinstance(final[name], bool), name
        assert final[name] > 0, name
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]
    assert final["total_duration"] >= final["load_duration"]
    assert RFC3339.match(final["created_at"]), final["created_at"]
    if num_predict is not None:
        assert final["eval_count"] <= num_predict
        if final["done_reason"] == "length":
            assert final["eval_count"] == num_predict


# ---- pieces that need no server ------------------------------------------------------------

CHATML = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
          "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")


def test_template_renders_system_prompt_and_stops_at_response() -> None:
    assert templates.render(CHATML, {"System": "Be brief.", "Prompt": "Hi"}) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # No system: the if-block disappears; what follows .Response is never rendered.
    assert templates.render(CHATML, {"System": "", "Prompt": "Hi"}) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_template_trim_markers_comments_and_else_chains() -> None:
    assert templates.render("a \n {{- .Prompt -}} \n b{{/* note */}}!", {"Prompt": "P"}) == "aPb!"
    chain = "{{ if .System }}S{{ else if .Prompt }}P{{ else }}none{{ end }}"
    assert templates.render(chain, {"System": "x", "Prompt": "y"}) == "S"
    assert templates.render(chain, {"System": "", "Prompt": "y"}) == "P"
    assert templates.render(chain, {}) == "none"
    # "{{-3}}" has no space after the dash: not a trim marker but, as in Go, the number -3.
    assert templates.render("x {{-3}}", {}) == "x -3"


def test_template_runs_messages_templates_as_ollama_generate_does() -> None:
    # Ollama's generate runs a .Messages template over [system, user].
    source = "{{ range .Messages }}<{{ .Role }}>{{ .Content }}{{ end }}<assistant>"
    assert templates.render(source, {"System": "S", "Prompt": "P"}) == "<system>S<user>P<assistant>"
    assert templates.render(source, {"Prompt": "P"}) == "<user>P<assistant>"


@pytest.mark.parametrize("source, words", [
    ("{{ .Prompt | upper }}", 'function "upper" not defined'),
    ("{{ if .System }}open", "without a matching {{end}}"),
    ("{{ end }}", "unexpected {{end}}"),
    ("{{ .Prompt", "unclosed action"),
    ("{{ range .Prompt }}{{ end }}", "range can't iterate over p"),
])
def test_template_refuses_what_it_cannot_run(source: str, words: str) -> None:
    with pytest.raises(templates.TemplateError) as info:
        templates.render(source, {"Prompt": "p"})
    assert words in str(info.value)
    assert info.value.field == "template"


def test_truncation_keeps_the_start_and_the_most_recent_tokens() -> None:
    ids = list(range(100))
    # Fits (room for at least one token): untouched.
    assert truncate_prompt(ids[:63], 64, 4, 8) == ids[:63]
    # num_predict smaller than half the context: exactly that much room is left.
    out = truncate_prompt(ids, 64, 4, 8)
    assert len(out) == 64 - 8 and out[:4] == [0, 1, 2, 3] and out[4:] == ids[100 - 52:]
    # Unlimited answer: half of the context after the kept tokens, as Ollama's shift leaves.
    out = truncate_prompt(ids, 64, 4, -1)
    assert len(out) == 64 - 30 and out[:4] == [0, 1, 2, 3] and out[-1] == 99
    # num_keep -1 (keep everything) keeps at most half the context, then the newest tokens.
    out = truncate_prompt(ids, 64, -1, 4)
    assert len(out) == 60 and out[:32] == ids[:32] and out[32:] == ids[100 - 28:]


def test_an_error_after_streaming_started_arrives_as_a_last_error_line() -> None:
    """No real server path fails mid-stream on demand; the framing is driven by a real async
    generator that fails after its first update, as an engine death would."""
    from shoal.engine.outputs import RequestOutput

    async def updates():
        yield [RequestOutput(request_id="r", index=0, text="Hel", token_ids=[1])]
        raise EngineDeadError("the engine loop died: boom")

    async def collect() -> list[dict]:
        gen = updates()
        first = await gen.__anext__()
        turn = Turn(kind="generate", echo_model="m", model=None, prompt_ids=[5], params=None,
                    started=time.monotonic())
        return [json.loads(line) async for line in stream_lines(turn, gen, first)]

    lines = asyncio.run(collect())
    assert lines[0]["response"] == "Hel" and lines[0]["done"] is False
    assert lines[-1] == {"error": "the engine loop died: boom"}


# ---- generation through the ollama client ----------------------------------------------------

def test_generate_stream_and_non_stream_agree_greedily(client) -> None:
    whole = client.generate(model=MODEL, prompt=PROMPT, options=GREEDY)
    parts = list(client.generate(model=MODEL, prompt=PROMPT, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    streamed = "".join(p.response for p in parts)
    assert streamed == whole.response and len(whole.response) > 0
    for final in (whole.model_dump(), parts[-1].model_dump()):
        check_final(final, num_predict=16)
    assert parts[-1].response == ""
    assert whole.eval_count == parts[-1].eval_count
    assert whole.prompt_eval_count == parts[-1].prompt_eval_count
    # context = the prompt's tokens then the answer's (no end-of-turn token after a length stop).
    assert whole.done_reason == "length"
    assert len(whole.context) == whole.prompt_eval_count + whole.eval_count
    assert whole.context == parts[-1].context


def test_chat_stream_and_non_stream_agree_greedily(client) -> None:
    messages = [{"role": "system", "content": "You are a storyteller."},
                {"role": "user", "content": "Tell me about the moon."}]
    whole = client.chat(model=MODEL, messages=messages, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=messages, options=GREEDY, stream=True))
    assert whole.message.role == "assistant"
    assert "".join(p.message.content for p in parts) == whole.message.content != ""
    assert parts[-1].done and parts[-1].message.content == ""
    for final in (whole.model_dump(), parts[-1].model_dump()):
        check_final(final, num_predict=16)
        assert "context" not in final or final["context"] is None
    assert whole.eval_count == parts[-1].eval_count


def test_num_predict_bounds_the_answer(client) -> None:
    r = client.generate(model=MODEL, prompt=PROMPT, options={"temperature": 0, "num_predict": 5})
    assert r.eval_count == 5 and r.done_reason == "length"


def test_stop_string_ends_the_answer_before_it(client) -> None:
    base = client.generate(model=MODEL, prompt=PROMPT, options={"temperature": 0, "num_predict": 20})
    words = base.response.split()
    assert len(words) >= 4, base.response
    stop = " " + words[3]
    cut = base.response.index(stop)
    r = client.generate(model=MODEL, prompt=PROMPT,
                        options={"temperature": 0, "num_predict": 20, "stop": [stop]})
    assert r.response == base.response[:cut]
    assert r.done_reason == "stop"
    assert r.eval_count < base.eval_count


def test_seed_makes_sampling_reproducible(client) -> None:
    opts = {"temperature": 1.0, "num_predict": 16, "seed": 1234}
    a = client.generate(model=MODEL, prompt=PROMPT, options=opts).response
    b = client.generate(model=MODEL, prompt=PROMPT, options=opts).response
    assert a == b
    others = {client.generate(model=MODEL, prompt=PROMPT, options={**opts, "seed": s}).response
              for s in (1, 2)}
    assert others != {a}, "other seeds should sample something else"


def test_context_continues_a_conversation(client) -> None:
    first = client.generate(model=MODEL, prompt="My name is Ada.",
                            options={"temperature": 0, "num_predict": 8})
    second = client.generate(model=MODEL, prompt="What is my name?", context=first.context,
                             options={"temperature": 0, "num_predict": 4})
    alone = client.generate(model=MODEL, prompt="What is my name?",
                            options={"temperature": 0, "num_predict": 4})
    assert second.prompt_eval_count == len(first.context) + alone.prompt_eval_count
    assert second.context[:len(first.context)] == first.context


def test_raw_and_template_prompts_are_what_the_model_sees(client, smollm2_tokenizer) -> None:
    text = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    raw = client.generate(model=MODEL, prompt=text, raw=True, options={"temperature": 0, "num_predict": 6})
    assert raw.prompt_eval_count == len(smollm2_tokenizer.encode(text, add_special_tokens=True))
    assert raw.context is None  # raw replies carry no context, as in Ollama
    templated = client.generate(model=MODEL, prompt="Name a colour.",
                                template="<|im_start|>user\n{{ .Prompt }}<|im_end|>\n"
                                         "<|im_start|>assistant\n{{ .Response }}<|im_end|>",
                                options={"temperature": 0, "num_predict": 6})
    assert templated.prompt_eval_count == raw.prompt_eval_count
    assert templated.response == raw.response


def test_a_long_prompt_is_truncated_to_the_context(client, shoal_server) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(300))
    r = client.generate(model=MODEL, prompt=long_prompt, raw=True,
                        options={"temperature": 0, "num_predict": 4, "num_ctx": 64})
    # The first num_keep (4) tokens and the newest ones, leaving num_predict tokens of room.
    assert r.prompt_eval_count == 64 - 4
    assert r.eval_count <= 4
    refused = post(shoal_server, "/api/generate", {
        "model": MODEL, "prompt": long_prompt, "raw": True, "truncate": False,
        "options": {"num_ctx": 64, "num_predict": 4}})
    assert refused.status_code == 400 and "truncate" in refused.json()["error"]


def test_chat_drops_old_messages_first(shoal_server, smollm2_tokenizer) -> None:
    system = {"role": "system", "content": "Answer with a number."}
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                    {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
    last = {"role": "user", "content": "What is 3 plus 4?"}

    def length(messages) -> int:
        return len(smollm2_tokenizer.encode(smollm2_tokenizer.apply_chat_template(messages),
                                            add_special_tokens=False))

    # Expected: the system message, then the longest tail of the history that fits.
    start = next(i for i in range(len(history) + 1) if length([system, *history[i:], last]) < 160)
    assert start > 0
    r = post(shoal_server, "/api/chat", {
        "model": MODEL, "messages": [system, *history, last], "stream": False,
        "options": {"temperature": 0, "num_predict": 4, "num_ctx": 160}})
    assert r.status_code == 200, r.text
    assert r.json()["prompt_eval_count"] == length([system, *history[start:], last])


def test_num_predict_minus_one_stops_at_the_context(client) -> None:
    r = client.generate(model=MODEL, prompt="Count from one to one hundred.",
                        options={"temperature": 0, "num_predict": -1, "num_ctx": 48})
    assert r.prompt_eval_count + r.eval_count <= 48


# ---- model endpoints ---------------------------------------------------------------------------

def test_list_show_ps_and_version(client, shoal_server) -> None:
    listed = client.list().models
    assert [m.model for m in listed] == [MODEL]
    entry = listed[0]
    assert entry.size > 10_000_000 and re.fullmatch(r"[0-9a-f]{64}", entry.digest)
    assert entry.details.format == "gguf" and entry.details.family == "llama"
    assert entry.details.quantization_level == "Q4_1" and entry.details.parameter_size == "135M"

    shown = client.show("smollm2")
    assert shown.capabilities == ["completion", "chat", "tools"]   # tools: the built-in tool prompt
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 8192
    assert shown.modelinfo["llama.attention.head_count_kv"] == 3
    assert shown.modelinfo["general.parameter_count"] > 100_000_000
    assert shown.modelinfo["tokenizer.ggml.tokens"] == []  # long arrays only with verbose
    assert "im_start" in shown.template and "FROM " in shown.modelfile
    verbose = post(shoal_server, "/api/show", {"name": MODEL, "verbose": True}).json()
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 49152

    running = client.ps().models
    assert len(running) == 1 and running[0].model == MODEL
    assert running[0].context_length == 2048 and running[0].size > entry.size
    assert running[0].expires_at.year > 2100

    version = httpx.get(shoal_server.url + "/api/version").json()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version["version"])


@pytest.mark.parametrize("call", ["generate", "chat", "show"])
def test_unknown_model_is_a_404(client, call: str) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        if call == "generate":
            client.generate(model="nope:7b", prompt="hi")
        elif call == "chat":
            client.chat(model="nope:7b", messages=[{"role": "user", "content": "hi"}])
        else:
            client.show("nope:7b")
    assert info.value.status_code == 404
    assert info.value.error == "model 'nope:7b' not found"


# ---- raw HTTP: errors and wire details -----------------------------------------------------------

@pytest.mark.parametrize("path, body, status, words", [
    ("/api/generate", b'{"model": "smollm2", "prompt": ', 400, "not valid JSON"),
    ("/api/chat", b"", 400, "missing request body"),
    ("/api/generate", {"prompt": "hi"}, 400, "model is required"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model is required"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"temperature": "hot"}}, 400,
     "options.temperature"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_predict": True}}, 400,
     "options.num_predict"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "options": {"stop": [1]}}, 400, "options.stop"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "format": "yaml"}, 400, "format"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "format": {"type": "nonsense"}}, 400, "format"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "suffix": "bye"}, 400, "does not support insert"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "images": ["aGk="]}, 400, "images"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "think": True}, 400, "does not support thinking"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "keep_alive": "a while"}, 400, "keep_alive"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "raw": True, "system": "s"}, 400, "raw mode"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "template": "{{ .Prompt | upper }}"}, 400,
     "template"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "context": [10 ** 9]}, 400, "context"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "retrieval"}]}, 400, "tools[0].type"),
    ("/api/show", {}, 400, "model is required"),
    ("/api/generate", [1, 2], 400, "JSON object"),
    # JSON can carry a lone surrogate, which UTF-8 cannot: echoed escaped, not a 500.
    ("/api/show", b'{"model": "\\ud800"}', 404, "model '\\ud800' not found"),
    ("/api/generate", b'{"model": "smollm2", "prompt": "hi", "think": "\\ud800"}', 400, "think value"),
])
def test_bad_requests_get_ollama_errors(shoal_server, path, body, status, words) -> None:
    r = post(shoal_server, path, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert isinstance(error, str) and words in error, error


def test_unknown_options_are_ignored_and_form_encoded_bodies_accepted(shoal_server) -> None:
    # Ollama's own docs use `curl -d`, which labels JSON as a form: the body is JSON anyway.
    r = post(shoal_server, "/api/generate",
             json.dumps({"model": MODEL, "prompt": "hi", "stream": False,
                         "options": {"num_predict": 2, "temperature": 0, "no_such_option": 1,
                                     "num_gpu": 99}}),
             headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["eval_count"] <= 2


@pytest.mark.parametrize("path, empty", [("/api/generate", {"prompt": ""}), ("/api/chat", {"messages": []})])
def test_an_empty_request_is_the_load_call(shoal_server, path, empty) -> None:
    r = post(shoal_server, path, {"model": "smollm2", **empty})
    assert r.status_code == 200
    body = r.json()
    assert body["done"] is True and body["done_reason"] == "load" and body["model"] == "smollm2"
    assert "eval_count" not in body
    unload = post(shoal_server, path, {"model": "smollm2", "keep_alive": 0, **empty}).json()
    assert unload["done_reason"] == "unload"
    assert post(shoal_server, path, {"model": "missing", **empty}).status_code == 404


def test_streams_are_ndjson_one_object_per_line(shoal_server) -> None:
    with httpx.stream("POST", shoal_server.url + "/api/generate", timeout=60, json={
            "model": MODEL, "prompt": PROMPT, "options": {"num_predict": 6, "temperature": 0}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert all(RFC3339.match(line["created_at"]) and line["model"] == MODEL for line in lines)
    check_final(lines[-1], num_predict=6)


# ---- overload and disconnects on a one-slot server -------------------------------------------------

@pytest.fixture(scope="module")
def one_slot_server(smollm2_path, tmp_path_factory):
    from live_server import LiveServer

    server = LiveServer(smollm2_path, "--max-num-seqs", "1", "--max-queue", "0", "--max-model-len", "2048",
                        "--kv-cache-bytes", "128MiB",
                        log_path=tmp_path_factory.mktemp("one_slot") / "serve.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def wait_until_free(server, timeout: float = 10.0) -> float:
    """Seconds until a short request is admitted again (the slot was released)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        r = post(server, "/api/generate", {"model": "smollm2", "prompt": "hi", "stream": False,
                                           "options": {"num_predict": 1}})
        if r.status_code == 200:
            return time.monotonic() - started
        assert r.status_code == 503
        time.sleep(0.1)
    raise AssertionError("the slot was never released")


def test_busy_server_answers_503_and_a_client_leaving_frees_the_slot(one_slot_server) -> None:
    long_run = {"model": "smollm2", "prompt": PROMPT, "options": {"num_predict": 1500, "temperature": 1}}
    with httpx.stream("POST", one_slot_server.url + "/api/generate", json=long_run, timeout=60) as stream:
        lines = stream.iter_lines()
        assert json.loads(next(lines))["done"] is False          # it is generating
        busy = post(one_slot_server, "/api/chat", {"model": "smollm2",
                                                   "messages": [{"role": "user", "content": "hi"}]})
        assert busy.status_code == 503
        assert int(busy.headers["retry-after"]) >= 1
        assert "busy" in busy.json()["error"]
    # Closing the stream aborted the request: the slot is free long before 1500 tokens.
    assert wait_until_free(one_slot_server) < 5.0


def test_a_non_streamed_client_leaving_frees_the_slot(one_slot_server) -> None:
    body = {"model": "smollm2", "prompt": PROMPT, "stream": False,
            "options": {"num_predict": 1500, "temperature": 1}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(one_slot_server.url + "/api/generate", json=body, timeout=1.0)
    assert wait_until_free(one_slot_server) < 5.0
