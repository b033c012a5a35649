"""Ollama's logprobs / top_logprobs on /api/chat and /api/generate, read with the real `ollama`
client (SmolLM2, greedy, short answers)."""
from __future__ import annotations

import math

import ollama
import pytest

MODEL = "smollm2"
ASK = [{"role": "user", "content": "Name a colour."}]
GREEDY = {"num_predict": 6, "temperature": 0, "repeat_penalty": 1.0}   # argmax = the pick


def _check(entries, eval_count: int, top: int) -> None:
    assert len(entries) == eval_count
    for entry in entries:
        assert entry.logprob <= 0 and math.isfinite(entry.logprob)
        alternatives = entry.top_logprobs or []
        assert len(alternatives) == top
        values = [a.logprob for a in alternatives]
        assert values == sorted(values, reverse=True)
        if top:
            # greedy: the chosen token is the most likely one
            assert alternatives[0].token == entry.token
            assert alternatives[0].logprob == pytest.approx(entry.logprob, abs=1e-5)


def test_chat_logprobs_whole_and_streamed(shoal_server) -> None:
    client = ollama.Client(host=shoal_server.url, timeout=60)
    reply = client.chat(model=MODEL, messages=ASK, options=GREEDY, logprobs=True, top_logprobs=3)
    _check(reply.logprobs, reply.eval_count, 3)
    assert "".join(e.token for e in reply.logprobs).startswith(reply.message.content)
    raw = client._client.post("/api/chat", json={"model": MODEL, "messages": ASK, "stream": False,
                                                 "options": GREEDY, "logprobs": True, "top_logprobs": 1})
    first = raw.json()["logprobs"][0]
    assert first["bytes"] == list(first["token"].encode()) and len(first["top_logprobs"]) == 1
    pieces = list(client.chat(model=MODEL, messages=ASK, options=GREEDY, logprobs=True, stream=True))
    streamed = [e for p in pieces for e in (p.logprobs or [])]
    assert [e.token for e in streamed] == [e.token for e in reply.logprobs]
    _check(streamed, pieces[-1].eval_count, 0)
    # without logprobs, none come back
    assert client.chat(model=MODEL, messages=ASK, options=GREEDY).logprobs is None


def test_generate_logprobs_and_bad_top(shoal_server) -> None:
    client = ollama.Client(host=shoal_server.url, timeout=60)
    reply = client.generate(model=MODEL, prompt="Hello", options=GREEDY, logprobs=True, top_logprobs=2)
    _check(reply.logprobs, reply.eval_count, 2)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=MODEL, prompt="Hello", options=GREEDY, logprobs=True, top_logprobs=21)
    assert err.value.status_code == 400 and "top_logprobs" in err.value.error
