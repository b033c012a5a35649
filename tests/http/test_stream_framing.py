"""Streamed lines survive every character: U+2028, U+2029 and U+0085 in generated text.

str.splitlines() — which httpx's iter_lines, and so the ollama SDK, uses for every stream —
breaks lines at these three as well as at "\\n"; written raw inside a JSON string they cut a
chunk in two and the client dies on an unterminated string. Each test forces the model to
generate them: OpenAI's logit_bias on the character's byte-level tokens (/tokenize gives
them); the Ollama dialect has no logit_bias, so a raw prompt whose greedy continuation
repeats the character.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import ollama
import pytest

MODEL = "smollm2:135m"
LINE_BREAKS = {"\u2028": "LINE SEPARATOR", "\u2029": "PARAGRAPH SEPARATOR", "\x85": "NEXT LINE"}
# Greedy SmolLM2 continues these with the character again (checked below, not assumed).
OLLAMA_PROMPTS = {
    "\u2028": "".join(f"{i}\u2028" for i in range(1, 30)),
    "\u2029": "".join(f"{i}\u2029" for i in range(1, 30)),
    "\x85": "The cat sat\x85on the mat.\n" * 8 + "The cat sat",
}


def forcing_bias(server, char: str) -> dict[str, int]:
    tokens = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": char,
                                                        "add_special_tokens": False}).json()["tokens"]
    return {str(t): 100 for t in tokens}


def sse_payloads(response: httpx.Response) -> list[dict]:
    """Every data line of an SSE stream as httpx splits it (json.loads fails on a cut line)."""
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("char", LINE_BREAKS, ids=LINE_BREAKS.values())
def test_openai_streams_carry_line_breaking_characters_inside_their_json(shoal_server, char: str) -> None:
    bias = forcing_bias(shoal_server, char)
    common = {"model": MODEL, "max_tokens": 6, "temperature": 0, "logit_bias": bias, "stream": True}
    with httpx.stream("POST", shoal_server.url + "/v1/chat/completions", timeout=60,
                      json={**common, "messages": [{"role": "user", "content": "hi"}]}) as response:
        chunks = sse_payloads(response)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert char in text, repr(text)
    with httpx.stream("POST", shoal_server.url + "/v1/completions", timeout=60,
                      json={**common, "prompt": ["a", "b"]}) as response:
        chunks = sse_payloads(response)
    texts = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
             for i in (0, 1)]
    assert all(char in t for t in texts), texts


@pytest.mark.parametrize("char", LINE_BREAKS, ids=LINE_BREAKS.values())
def test_the_ollama_client_reads_streams_with_line_breaking_characters(shoal_server, char: str) -> None:
    options = {"temperature": 0, "num_predict": 8}
    client = ollama.Client(host=shoal_server.url)
    parts = list(client.generate(model=MODEL, prompt=OLLAMA_PROMPTS[char], raw=True, stream=True,
                                 options=options))
    assert parts[-1].done
    text = "".join(p.response for p in parts)
    assert char in text, repr(text)
    # the same stream as any line-splitting reader sees it
    with httpx.stream("POST", shoal_server.url + "/api/generate", timeout=60, json={
            "model": MODEL, "prompt": OLLAMA_PROMPTS[char], "raw": True, "options": options}) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "".join(line.get("response", "") for line in lines) == text
    assert lines[-1]["done"] is True


def test_progress_lines_carry_line_breaking_characters_inside_their_json() -> None:
    from shoal.http.ollama.model_management import _progress_response

    status = "pulling a\u2028b\u2029c\x85d"

    async def body() -> str:
        response = await _progress_response(lambda progress: progress({"status": status}), stream=True)
        return b"".join([chunk async for chunk in response.body_iterator]).decode()

    lines = asyncio.run(body()).splitlines()
    assert [json.loads(line) for line in lines] == [{"status": status}, {"status": "success"}]
