"""Reasoning models through both dialects: tiny models with a Qwen3-like template (thinking
switchable with enable_thinking / think) and an R1-distill-like one (the prompt opens the
thinking), served by real `shoal serve` processes and read with the real `openai` and
`ollama` clients. Every split is checked against the raw output of the same prompt and seed.
"""
from __future__ import annotations

import httpx
import ollama
import pytest
from openai import OpenAI

import tiny_models
from live_server import LiveServer
from shoal.text.reasoning import ReasoningFormat, split_reasoning

FMT = ReasoningFormat()
ASK = [{"role": "user", "content": "hi"}]
# a few letters and </think> (id 300), so sampled outputs are readable and close the thinking
# (the tiny model repeats itself: penalties keep it moving)
LETTERS = {str(3 + ord(c)): 40 for c in "abcdefgh "}
BIAS = {**LETTERS, "300": 38}
SAMPLED = {"max_tokens": 24, "temperature": 1.0, "seed": 11, "logit_bias": BIAS,
           "frequency_penalty": 2, "presence_penalty": 2}


def _serve(tmp_path_factory, name: str, template: str):
    root = tmp_path_factory.mktemp(name)
    model = tiny_models.write_reasoning_model(root / "model", template=template)
    server = LiveServer(model, "--served-model-name", name, "--max-model-len", "256",
                        "--kv-cache-bytes", "16MiB", log_path=root / "serve.log")
    return server


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(Qwen3-like server, R1-like server), started together."""
    qwen = _serve(tmp_path_factory, "qwen3ish", tiny_models.QWEN3_LIKE_TEMPLATE)
    r1 = _serve(tmp_path_factory, "r1ish", tiny_models.R1_LIKE_TEMPLATE)
    try:
        yield qwen.wait_ready(), r1.wait_ready()
    finally:
        qwen.stop()
        r1.stop()


@pytest.fixture(scope="module")
def qwen(servers) -> LiveServer:
    return servers[0]


@pytest.fixture(scope="module")
def r1(servers) -> LiveServer:
    return servers[1]


def _post(server: LiveServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def _openai(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _prompt_ids(server: LiveServer, model: str, messages: list, **extra) -> list[int]:
    r = _post(server, "/tokenize", {"model": model, "messages": messages, **extra})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _prompt_text(server: LiveServer, model: str, messages: list, **extra) -> str:
    ids = _prompt_ids(server, model, messages, **extra)
    return _post(server, "/detokenize", {"model": model, "tokens": ids}).json()["prompt"]


def _openai_error(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return error["message"]


# ---- OpenAI dialect ------------------------------------------------------------------
def test_reasoning_content_splits_the_raw_output(r1) -> None:
    # the same prompt and seed through /v1/completions stays raw text: the chat reply must be
    # exactly its split, with the thinking (which the prompt opened) in reasoning_content
    ids = _prompt_ids(r1, "r1ish", ASK)
    raw = _post(r1, "/v1/completions", {"model": "r1ish", "prompt": ids, **SAMPLED}).json()
    raw_text = raw["choices"][0]["text"]
    assert "</think>" in raw_text and "<think>" not in raw_text
    chat = _openai(r1).chat.completions.create(model="r1ish", messages=ASK, **SAMPLED)
    message = chat.choices[0].message
    thinking, content = split_reasoning(raw_text, FMT, in_thinking=True)
    assert thinking and content
    assert message.model_extra["reasoning_content"] == thinking
    assert message.model_extra["reasoning"] == thinking
    assert message.content == content
    assert chat.usage.prompt_tokens == len(ids)


def test_streamed_reasoning_deltas_add_up_to_the_reply(r1) -> None:
    client = _openai(r1)
    whole = client.chat.completions.create(model="r1ish", messages=ASK, **SAMPLED).choices[0].message
    reasoning_chunks = []
    # NOTE: a stream sends in one chunk every token the engine made while the event loop was
    # busy (AsyncEngine.generate), and this tiny model makes tokens in microseconds: on a
    # loaded machine one stream's few thinking tokens can all land in one chunk. Thinking
    # held to its end would be one chunk every time, so three streams must not all be.
    for _ in range(3):
        reasoning, content, order = "", "", []
        for chunk in client.chat.completions.create(model="r1ish", messages=ASK, stream=True,
                                                    **SAMPLED):
            delta = chunk.choices[0].delta
            extra = delta.model_extra or {}
            if extra.get("reasoning_content"):
                reasoning += extra["reasoning_content"]
                order.append("r")
            if delta.content:
                content += delta.content
                order.append("c")
        assert reasoning == whole.model_extra["reasoning_content"]
        assert content == whole.content
        assert order == sorted(order, key=lambda k: k == "c")   # thinking first, then content
        reasoning_chunks.append(order.count("r"))
        if reasoning_chunks[-1] > 1:
            break
    assert max(reasoning_chunks) > 1, reasoning_chunks          # streamed, not held to the end


def test_include_reasoning_false_drops_the_thinking(r1) -> None:
    r = _post(r1, "/v1/chat/completions", {"model": "r1ish", "messages": ASK, **SAMPLED,
                                           "include_reasoning": False})
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"]


def test_enable_thinking_false_closes_the_thinking_in_the_prompt(qwen) -> None:
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    assert _prompt_text(qwen, "qwen3ish", ASK, **off).endswith("<think>\n\n</think>\n\n")
    body = {"model": "qwen3ish", "messages": ASK, "max_tokens": 8, "temperature": 0, **off}
    r = _post(qwen, "/v1/chat/completions", body).json()
    assert r["usage"]["prompt_tokens"] == len(_prompt_ids(qwen, "qwen3ish", ASK, **off))
    assert r["choices"][0]["message"]["reasoning_content"] is None
    # structured output applies to the answer when thinking is off
    r = _post(qwen, "/v1/chat/completions", {**body, "response_format": {"type": "json_object"}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("{")


def test_structured_output_binds_the_answer_after_the_thinking(r1, qwen) -> None:
    # the R1 prompt opened the thinking: free thinking, </think>, then one of the choices
    body = {"model": "r1ish", "messages": ASK, **SAMPLED, "max_tokens": 40, "guided_choice": ["yes", "no"]}
    r = _post(r1, "/v1/chat/completions", body).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["message"]["content"] in ("yes", "no")
    assert r["message"]["reasoning_content"]
    # Qwen3 opens the thinking itself: the grammar makes it start with <think>
    body = {"model": "qwen3ish", "messages": ASK, **SAMPLED, "max_tokens": 40,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "a", "schema": {"type": "string", "enum": ["yes", "no"]}}}}
    r = _post(qwen, "/v1/chat/completions", body).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["message"]["content"] in ('"yes"', '"no"')
    # /v1/completions has no thinking: the constraint binds the whole text there
    raw = _post(qwen, "/v1/completions", {"model": "qwen3ish", "prompt": _prompt_ids(qwen, "qwen3ish", ASK),
                                          **{k: v for k, v in body.items() if k != "messages"}}).json()
    assert raw["choices"][0]["text"] in ('"yes"', '"no"')


def test_a_thinking_model_starting_its_own_think_tag(qwen) -> None:
    # Qwen3's prompt does not open the thinking: output that starts with <think> is parsed
    bias = {"299": 100}         # <think> always: the first opens the thinking, the rest is in it
    r = _post(qwen, "/v1/chat/completions", {"model": "qwen3ish", "messages": ASK, "max_tokens": 3,
                                             "temperature": 0, "logit_bias": bias}).json()
    message = r["choices"][0]["message"]
    assert message["reasoning_content"] == "<think><think>" and message["content"] == ""


def test_reasoning_effort_reaches_a_template_that_reads_it(r1, qwen, shoal_server) -> None:
    base = {"messages": ASK, "max_tokens": 2, "temperature": 0}
    plain = _post(r1, "/v1/chat/completions", {"model": "r1ish", **base}).json()
    low = _post(r1, "/v1/chat/completions", {"model": "r1ish", "reasoning_effort": "low", **base}).json()
    assert low["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert "reasoning-effort" in _openai_error(
        _post(qwen, "/v1/chat/completions", {"model": "qwen3ish", "reasoning_effort": "low", **base}),
        "reasoning_effort")
    assert "not a reasoning model" in _openai_error(
        _post(shoal_server, "/v1/chat/completions", {"model": "smollm2", "reasoning_effort": "high", **base}),
        "reasoning_effort")
    _openai_error(_post(r1, "/v1/chat/completions", {"model": "r1ish", "reasoning_effort": "max", **base}),
                  "reasoning_effort")


def test_history_thinking_goes_back_as_the_template_renders_it(qwen, r1) -> None:
    turn = {"role": "assistant", "content": "Paris.", "reasoning_content": "capital of France"}
    # Qwen3 keeps the thinking of turns after the last user message, drops earlier ones
    after = _prompt_text(qwen, "qwen3ish", [*ASK, turn], add_generation_prompt=False)
    assert "<think>\ncapital of France\n</think>\n\nParis." in after
    before = _prompt_text(qwen, "qwen3ish", [*ASK, turn, {"role": "user", "content": "and?"}])
    assert "capital of France" not in before and "Paris." in before
    # thinking left inside the content is split out the same way
    inline = {"role": "assistant", "content": "<think>capital of France</think>Paris."}
    assert "<think>\ncapital of France\n</think>" in _prompt_text(
        qwen, "qwen3ish", [*ASK, inline], add_generation_prompt=False)
    # the R1 template keeps only the answer of earlier turns
    text = _prompt_text(r1, "r1ish", [*ASK, inline, {"role": "user", "content": "and?"}])
    assert "capital" not in text and "Paris." in text


def test_completions_stay_raw(r1) -> None:
    ids = _prompt_ids(r1, "r1ish", ASK)
    r = _post(r1, "/v1/completions", {"model": "r1ish", "prompt": ids, **SAMPLED}).json()
    assert "reasoning_content" not in r["choices"][0] and "</think>" in r["choices"][0]["text"]


# ---- Ollama dialect ------------------------------------------------------------------
OPTIONS = {"num_predict": 16, "seed": 5, "temperature": 1.0}


def _raw_generate(server: LiveServer, model: str, prompt: str) -> dict:
    r = _post(server, "/api/generate", {"model": model, "prompt": prompt, "raw": True,
                                        "stream": False, "options": OPTIONS})
    assert r.status_code == 200, r.text
    return r.json()


def test_ollama_chat_think_returns_message_thinking(r1) -> None:
    client = ollama.Client(host=r1.url, timeout=60)
    reply = client.chat(model="r1ish", messages=ASK, think=True, options=OPTIONS)
    raw = _raw_generate(r1, "r1ish", _prompt_text(r1, "r1ish", ASK))
    assert raw["prompt_eval_count"] == reply.prompt_eval_count
    thinking, content = split_reasoning(raw["response"], FMT, in_thinking=True)
    assert reply.message.thinking == (thinking or None)
    assert reply.message.content == content
    # unset think on a thinking model thinks, as Ollama defaults it
    assert client.chat(model="r1ish", messages=ASK, options=OPTIONS).message.thinking == reply.message.thinking
    # streamed: the pieces add up, thinking first
    pieces = list(client.chat(model="r1ish", messages=ASK, think=True, options=OPTIONS, stream=True))
    assert "".join(p.message.thinking or "" for p in pieces) == thinking
    assert "".join(p.message.content or "" for p in pieces) == content
    assert pieces[-1].done
    # generate carries `thinking` beside `response`
    gen = client.generate(model="r1ish", prompt="hi", think=True, options=OPTIONS)
    assert gen.thinking == (thinking or None) and gen.response == content


def test_ollama_think_false(qwen, r1) -> None:
    client = ollama.Client(host=qwen.url, timeout=60)
    on = client.chat(model="qwen3ish", messages=ASK, think=True, options=OPTIONS)
    off = client.chat(model="qwen3ish", messages=ASK, think=False, options=OPTIONS)
    # Qwen3's switch: the prompt closes an empty thinking block
    assert off.prompt_eval_count == on.prompt_eval_count + len(
        _prompt_ids(qwen, "qwen3ish", ASK, chat_template_kwargs={"enable_thinking": False})) - len(
        _prompt_ids(qwen, "qwen3ish", ASK))
    assert off.prompt_eval_count > on.prompt_eval_count and off.message.thinking is None
    # format binds the answer, not the thinking: with think false the whole answer is JSON ...
    assert client.chat(model="qwen3ish", messages=ASK, format="json", think=False,
                       options=OPTIONS).message.content.startswith("{")
    # R1 cannot switch thinking off: the model still thinks, the reply leaves it out
    r1_client = ollama.Client(host=r1.url, timeout=60)
    full = r1_client.chat(model="r1ish", messages=ASK, think=True, options=OPTIONS)
    hidden = r1_client.chat(model="r1ish", messages=ASK, think=False, options=OPTIONS)
    assert hidden.message.thinking is None and hidden.message.content == full.message.content


def test_ollama_format_leaves_the_thinking_free(r1) -> None:
    # the thinking runs unconstrained (only ending the sequence is barred): with the same seed
    # it is what the model thinks without a format
    client = ollama.Client(host=r1.url, timeout=60)
    free = client.chat(model="r1ish", messages=ASK, think=True, options=OPTIONS)
    bound = client.chat(model="r1ish", messages=ASK, think=True, options=OPTIONS,
                        format={"type": "string", "enum": ["yes", "no"]})
    assert "</think>" not in free.message.thinking and free.message.content == ""
    assert bound.message.thinking == free.message.thinking


def test_ollama_history_thinking_is_rendered(qwen) -> None:
    client = ollama.Client(host=qwen.url, timeout=60)
    with_thinking = [*ASK, {"role": "assistant", "content": "Paris.", "thinking": "capital of France"}]
    without = [*ASK, {"role": "assistant", "content": "Paris."}]
    a = client.chat(model="qwen3ish", messages=with_thinking, think=True, options={"num_predict": 1})
    b = client.chat(model="qwen3ish", messages=without, think=True, options={"num_predict": 1})
    assert a.prompt_eval_count > b.prompt_eval_count


def test_ollama_think_true_on_a_model_without_reasoning(shoal_server) -> None:
    client = ollama.Client(host=shoal_server.url, timeout=60)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="smollm2", messages=ASK, think=True, options={"num_predict": 1})
    assert err.value.status_code == 400 and "does not support thinking" in err.value.error
    # think false on it is a no-op, as in Ollama
    assert client.chat(model="smollm2", messages=ASK, think=False, options={"num_predict": 1}).done


def test_show_capabilities(qwen, r1, shoal_server) -> None:
    assert ollama.Client(host=qwen.url).show("qwen3ish").capabilities == ["completion", "chat", "tools", "thinking"]
    assert ollama.Client(host=r1.url).show("r1ish").capabilities == ["completion", "chat", "tools", "thinking"]
    assert ollama.Client(host=shoal_server.url).show("smollm2").capabilities == ["completion", "chat", "tools"]
