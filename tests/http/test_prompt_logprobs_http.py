"""prompt_logprobs through the OpenAI dialect (vLLM's shape), with the real `openai` client."""
from __future__ import annotations

import httpx
from openai import OpenAI

MODEL = "smollm2"
PROMPT = "The capital of France is Paris, and the capital of Italy is"


def _check_shape(entries: list, prompt_ids: list[int], k: int) -> None:
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for token_id, entry in zip(prompt_ids[1:], entries[1:]):
        assert str(token_id) in entry                       # the actual token, always
        actual = entry[str(token_id)]
        assert actual["logprob"] <= 0 and actual["rank"] >= 1 and isinstance(actual["decoded_token"], str)
        ranked = sorted((v["rank"], v["logprob"]) for t, v in entry.items() if t != str(token_id) or v["rank"] <= k)
        tops = [r for r, _ in ranked if r <= k]
        assert tops == list(range(1, k + 1))                 # the top k, ranked 1..k
        assert len(entry) in (k, k + 1)
        best = max(v["logprob"] for v in entry.values())
        assert all(v["logprob"] <= best for v in entry.values())
        if actual["rank"] == 1:
            assert actual["logprob"] == best


def test_completions_prompt_logprobs(shoal_server) -> None:
    client = OpenAI(base_url=shoal_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    ids = httpx.post(shoal_server.url + "/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    first = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    assert r.choices[0].text == first.choices[0].text       # the answer does not change
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # the prompt was computed again
    _check_shape(r.choices[0].model_extra["prompt_logprobs"], ids, 2)
    # " Paris" after "The capital of France is" is the model's likely pick
    paris = r.choices[0].model_extra["prompt_logprobs"][ids.index(client_token(shoal_server, " Paris"))]
    assert min(v["rank"] for v in paris.values()) == 1


def client_token(server, text: str) -> int:
    return httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": text}).json()["tokens"][0]


def test_chat_prompt_logprobs_and_refusals(shoal_server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "temperature": 0, "prompt_logprobs": 0}
    r = httpx.post(shoal_server.url + "/v1/chat/completions", json=body, timeout=60).json()
    entries = r["prompt_logprobs"]
    assert len(entries) == r["usage"]["prompt_tokens"] and entries[0] is None
    assert all(len(e) == 1 or (len(e) == 2 and any(v["rank"] == 1 for v in e.values())) for e in entries[1:])
    for bad, param in (({"stream": True}, "prompt_logprobs"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
                       ({"prompt_logprobs": -1}, "prompt_logprobs")):
        err = httpx.post(shoal_server.url + "/v1/chat/completions", json={**body, **bad}, timeout=60)
        assert err.status_code == 400 and err.json()["error"]["param"] == param, err.text
