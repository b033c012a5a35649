"""The OpenAI dialect, driven through a real `shoal serve` with the official `openai` client."""
from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

MODEL = "smollm2:135m"
HELLO = [{"role": "user", "content": "Say hello to Ada in five words."}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(shoal_server) -> OpenAI:
    return OpenAI(base_url=shoal_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, **kwargs)


# ---- models and utilities -------------------------------------------------------------
def test_models_list_and_retrieve(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "shoal"
    assert card.model_extra["max_model_len"] == 2048
    # an alias reaches the same model; an unknown name is OpenAI's 404
    assert client.models.retrieve("smollm2").id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_health_version_tokenize_detokenize(shoal_server) -> None:
    assert httpx.get(shoal_server.url + "/health").status_code == 200
    assert httpx.get(shoal_server.url + "/version").json()["version"]
    tok = _post(shoal_server, "/tokenize", json={"model": MODEL, "prompt": "Hello world",
                                                 "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 2048
    assert len(tok["token_strs"]) == tok["count"]
    back = _post(shoal_server, "/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json()
    assert back["prompt"].strip() == "Hello world"
    chat = _post(shoal_server, "/tokenize", json={"model": MODEL, "messages": HELLO}).json()
    assert chat["count"] > tok["count"]       # the chat template adds role markers
    bad = _post(shoal_server, "/detokenize", json={"model": MODEL, "tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ---- chat completions -----------------------------------------------------------------
def test_chat_completion_and_usage(client: OpenAI, shoal_server) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    counted = _post(shoal_server, "/tokenize", json={"model": MODEL, "messages": HELLO}).json()["count"]
    assert r.usage.prompt_tokens == counted
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(client: OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    # include_usage: a last chunk with no choices carries the usage; the others have none
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_length_and_max_completion_tokens_precedence(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=50,
                                       max_completion_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n_samples_and_seed_reproducibility(client: OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, n=3, seed=1234)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1       # the samples differ from each other
    forced = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 3 * 10     # usage counts every sample
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    per_index = {i: "".join(c.choices[0].delta.content or "" for c in streamed
                            if c.choices and c.choices[0].index == i) for i in range(3)}
    assert [per_index[i] for i in range(3)] == [c.message.content for c in a.choices]


def test_content_parts_equal_plain_string(client: OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say hello to Ada"},
                                          {"type": "text", "text": "in five words."}]}]
    joined = [{"role": "user", "content": "Say hello to Ada\nin five words."}]
    a = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=joined, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_chat_logprobs(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    tokens = [t.token for t in content]
    if r.choices[0].finish_reason == "stop":
        # The end-of-turn token is sampled, counted and reported with its logprob (as vLLM does),
        # but it is not part of the message (on some CPUs the answer ends within 6 tokens).
        assert tokens[-1] == "<|im_end|>"
        tokens = tokens[:-1]
    assert "".join(tokens) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert t.bytes == list(t.token.encode())


def test_sampling_extras_through_extra_body(client: OpenAI, shoal_server) -> None:
    greedy = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    top1 = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.5,
                                          seed=7, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    # min_tokens + ignore_eos: exactly max_tokens tokens
    forced = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0,
                                            extra_body={"min_tokens": 20, "ignore_eos": True})
    assert forced.usage.completion_tokens == 20
    # logit_bias: a +100 bias makes a token the only choice
    banana = _post(shoal_server, "/tokenize", json={"prompt": " banana", "add_special_tokens": False}
                   ).json()["tokens"][0]
    biased = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0,
                                            logit_bias={str(banana): 100})
    assert biased.choices[0].message.content.strip().startswith("banana")


# ---- completions ----------------------------------------------------------------------
def test_completion_stop_string(client: OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0,
                                  stop=[","])
    choice = r.choices[0]
    assert r.object == "text_completion"
    assert "," not in choice.text and choice.text.strip().isdigit()
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == ","
    unstopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0)
    assert unstopped.choices[0].text.startswith(choice.text + ",")


def test_completion_batch_echo_token_prompt_and_logprobs(client: OpenAI, shoal_server) -> None:
    prompts = ["The sky is", "Paris is the capital of"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text      # greedy: the two samples agree
    alone = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=5, temperature=0)
    assert r.choices[2].text == alone.choices[0].text  # batched like alone
    echoed = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=5, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == prompts[0] + r.choices[0].text
    ids = _post(shoal_server, "/tokenize", json={"prompt": prompts[0]}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    lp = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=4, temperature=0,
                                   logprobs=2).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text[:sum(len(t) for t in lp.tokens)]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_completion_stream_several_prompts(client: OpenAI) -> None:
    prompts = ["The sky is", "Paris is the capital of"]
    full = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == [c.text for c in full.choices]
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


# ---- errors ---------------------------------------------------------------------------
def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("n", 0), ("n", 10**9),
                                         ("max_tokens", 0), ("presence_penalty", 5),
                                         ("top_k", -5), ("logit_bias", {"x": 1}),
                                         ("stop", [""])])
def test_invalid_values_are_400_naming_the_parameter(shoal_server, field, value) -> None:
    body = {"model": MODEL, "messages": HELLO, field: value}
    error = _error(_post(shoal_server, "/v1/chat/completions", json=body), 400)
    assert error["param"] == field and field in error["message"]


def test_bad_requests_in_openai_shape(shoal_server) -> None:
    url = "/v1/chat/completions"
    broken = _error(_post(shoal_server, url, content=b'{"model": "smollm2:135m", "messages": [',
                          headers=JSON), 400)
    assert "JSON" in broken["message"]
    missing = _error(_post(shoal_server, url, json={"model": MODEL}), 400)
    assert missing["param"] == "messages"
    wrong_type = _error(_post(shoal_server, url, json={"model": MODEL, "messages": "hi"}), 400)
    assert wrong_type["param"].startswith("messages")
    image = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    assert "image_url" in _error(_post(shoal_server, url, json=image), 400)["message"]
    surrogate = b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "\\ud800"}]}'
    assert "Unicode" in _error(_post(shoal_server, url, content=surrogate, headers=JSON), 400)["message"]
    not_object = _error(_post(shoal_server, url, json=[1, 2]), 400)
    assert not_object["message"]
    role = {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}
    assert _error(_post(shoal_server, url, json=role), 400)["param"] == "messages[0].role"
    unknown = _error(_post(shoal_server, url, json={"model": "gpt-17", "messages": HELLO}), 404)
    assert unknown["code"] == "model_not_found" and "gpt-17" in unknown["message"]
    assert _error(httpx.get(shoal_server.url + "/v1/nothing-here"), 404)
    assert _error(httpx.get(shoal_server.url + url), 405)


def test_unknown_fields_are_ignored(shoal_server) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "frobnicate": {"deep": [1, 2]},
            "metadata": {"team": "a"}, "store": False}
    assert _post(shoal_server, "/v1/chat/completions", json=body).status_code == 200


def test_context_length_exceeded_names_both_numbers(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3000)
    error = info.value.body
    assert error["code"] == "context_length_exceeded"
    assert "2048" in error["message"] and "3000" in error["message"]


def test_oversized_body_is_413(shoal_server) -> None:
    huge = {"model": MODEL, "prompt": "x" * (17 << 20)}
    assert "limit" in _error(_post(shoal_server, "/v1/completions", json=huge), 413)["message"]


def test_unsupported_features_are_400(shoal_server) -> None:
    base = {"model": MODEL, "messages": HELLO}
    fmt = _error(_post(shoal_server, "/v1/chat/completions",
                       json={**base, "response_format": {"type": "yaml"}}), 400)
    assert fmt["param"] == "response_format.type"
    suffix = _error(_post(shoal_server, "/v1/completions",
                          json={"model": MODEL, "prompt": "a", "suffix": "b"}), 400)
    assert suffix["param"] == "suffix"
    top = _error(_post(shoal_server, "/v1/chat/completions", json={**base, "top_logprobs": 2}), 400)
    assert top["param"] == "top_logprobs"


def test_body_is_json_whatever_its_content_type(shoal_server) -> None:
    # `curl -d '{...}'` sends application/x-www-form-urlencoded
    body = b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    r = _post(shoal_server, "/v1/chat/completions", content=body,
              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
