"""Embeddings over HTTP in both dialects, against a real `shoal serve`: all-minilm pulled into
the store as a built-in model (loaded on demand beside SmolLM2), the official clients, and
bad input. Vectors are checked against sentence-transformers on the same files."""
from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import torch
import torch.nn.functional as F

from shoal.store.store import ModelStore

TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.",
         "A kitten was sleeping on the rug.", "hello"]
MINILM = "all-minilm"


@pytest.fixture(scope="module")
def store_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding all-minilm, pulled as `shoal pull all-minilm` does (from the cached,
    hash-checked archive)."""
    root = tmp_path_factory.mktemp("embed-store")
    ModelStore(root).pull(MINILM)
    return root


@pytest.fixture(scope="module")
def server(smollm2_path: Path, store_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from live_server import LiveServer

    log = tmp_path_factory.mktemp("embed-server") / "serve.log"
    srv = LiveServer(smollm2_path, "--served-model-name", "smollm2:135m,smollm2",
                     "--max-model-len", "1024", "--kv-cache-bytes", "64MiB",
                     env={"SHOAL_MODELS": str(store_dir), "SHOAL_MAX_EMBEDDING_INPUTS": "64"},
                     log_path=log)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def expected(minilm_dir: Path) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return torch.tensor(SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS))


def _close(vectors, expected: torch.Tensor, bar: float = 0.995) -> None:
    got = torch.tensor(vectors, dtype=torch.float32)
    assert got.shape == expected.shape
    assert F.cosine_similarity(got, expected).min().item() >= bar


def _openai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_embeddings_float_and_base64(server, expected: torch.Tensor) -> None:
    client = _openai(server)
    floats = client.embeddings.create(model=MINILM, input=TEXTS)
    assert [d.index for d in floats.data] == [0, 1, 2, 3]
    _close([d.embedding for d in floats.data], expected)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(TEXTS) * 2
    # without encoding_format the client asks for base64 and decodes it itself; asked
    # explicitly, it hands the string over
    implicit = client.embeddings.create(model=MINILM, input=TEXTS[0])
    encoded = client.embeddings.create(model=MINILM, input=TEXTS[0], encoding_format="base64")
    raw = httpx.post(server.url + "/v1/embeddings", json={"model": MINILM, "input": TEXTS[0],
                                                          "encoding_format": "base64"}).json()
    data = base64.b64decode(raw["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(data) // 4}f", data)
    assert len(decoded) == 384
    # NOTE: alone vs batched with the others: fast mode's float32 feed-forward output sums
    # in a batch-size-dependent order (~1e-5)
    assert torch.allclose(torch.tensor(decoded), torch.tensor(floats.data[0].embedding), atol=1e-4)
    assert encoded.data[0].embedding == raw["data"][0]["embedding"]
    assert torch.allclose(torch.tensor(implicit.data[0].embedding), torch.tensor(decoded), atol=1e-6)


def test_openai_token_id_inputs(server) -> None:
    """Token ids are the model's own, taken as given ([CLS] … [SEP] included here)."""
    ids = httpx.post(server.url + "/tokenize", json={"model": MINILM, "prompt": TEXTS[0]}).json()["tokens"]
    assert ids[0] == 101 and ids[-1] == 102
    by_text = _openai(server).embeddings.create(model=MINILM, input=TEXTS[0]).data[0].embedding
    one = _openai(server).embeddings.create(model=MINILM, input=ids)
    many = _openai(server).embeddings.create(model=MINILM, input=[ids, ids[:3]])
    assert torch.allclose(torch.tensor(one.data[0].embedding), torch.tensor(by_text), atol=1e-4)
    assert len(many.data) == 2 and one.usage.prompt_tokens == len(ids)
    assert many.usage.prompt_tokens == len(ids) + 3


def test_openai_dimensions_and_truncation(server) -> None:
    client = _openai(server)
    same = client.embeddings.create(model=MINILM, input="x", dimensions=384)
    assert len(same.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MINILM, input="x", dimensions=128)
    assert err.value.body["param"] == "dimensions" and "384" in err.value.body["message"]
    long_text = "word " * 600
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MINILM, input=long_text)
    assert "256" in err.value.body["message"]
    cut = client.embeddings.create(model=MINILM, input=long_text,
                                   extra_body={"truncate_prompt_tokens": 100})
    assert cut.usage.prompt_tokens == 100
    whole = client.embeddings.create(model=MINILM, input=long_text,
                                     extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == 256


@pytest.mark.parametrize("body,param,needle", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": ["ok", 3.5]}, "input", "input[1]"),
    ({"input": [{"text": "x"}]}, "input", "input[0]"),
    ({"input": [[1, 2], [30522]]}, "input", "outside the vocabulary"),
    ({"input": "x", "dimensions": 0}, "dimensions", "positive"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format", ""),
    ({"input": ["a"] * 65}, "input", "SHOAL_MAX_EMBEDDING_INPUTS"),
    ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", ""),
])
def test_openai_bad_input_is_a_400_naming_the_field(server, body, param, needle) -> None:
    reply = httpx.post(server.url + "/v1/embeddings", json={"model": MINILM, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and needle in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw,needle", [
    (b"", "missing request body"),
    (b"null", "missing request body"),
    (b"[1, 2]", "must be a JSON object, got array"),
    (b'{"input": "x",', "not valid JSON"),
])
def test_a_malformed_openai_body_is_a_400_in_openai_shape(server, raw: bytes, needle: str) -> None:
    """The body is read by hand on this route (it is served directly): the same 400s."""
    reply = httpx.post(server.url + "/v1/embeddings", content=raw,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_the_directly_served_routes_keep_their_methods_and_schema(server) -> None:
    """Served ahead of FastAPI's router, the embedding routes still answer a wrong method in
    their dialect's shape and are still described, body included, in /openapi.json."""
    wrong = httpx.get(server.url + "/v1/embeddings")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert "not allowed" in wrong.json()["error"]["message"]
    assert httpx.get(server.url + "/api/embed").json()["error"].startswith("method GET")
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in ("/v1/embeddings", "/api/embed", "/api/embeddings"):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "input" in schema["properties"] or "prompt" in schema["properties"]


def test_a_hundred_thousand_inputs_are_a_400_naming_the_limit(server) -> None:
    reply = httpx.post(server.url + "/api/embed", json={"model": MINILM, "input": ["a"] * 100_000},
                       timeout=60)
    assert reply.status_code == 400
    assert "64" in reply.json()["error"] and "SHOAL_MAX_EMBEDDING_INPUTS" in reply.json()["error"]


def test_ollama_embed_and_legacy_embeddings(server, expected: torch.Tensor) -> None:
    client = ollama.Client(host=server.url)
    reply = client.embed(model=MINILM, input=TEXTS)
    _close(reply.embeddings, expected)
    assert reply.prompt_eval_count > len(TEXTS) * 2
    assert reply.total_duration >= reply.load_duration > 0
    legacy = client.embeddings(model=MINILM, prompt=TEXTS[0])
    _close([legacy.embedding], expected[:1])
    one = client.embed(model=MINILM, input=TEXTS[0])
    assert len(one.embeddings) == 1


def test_ollama_empty_input_and_truncate(server) -> None:
    url = server.url + "/api/embed"
    for empty in ("", []):
        reply = httpx.post(url, json={"model": MINILM, "input": empty})
        assert reply.status_code == 200 and reply.json()["embeddings"] == []
    assert httpx.post(server.url + "/api/embeddings",
                      json={"model": MINILM, "prompt": ""}).json() == {"embedding": []}
    long_text = "word " * 600
    cut = httpx.post(url, json={"model": MINILM, "input": long_text}).json()
    assert cut["prompt_eval_count"] == 256
    refused = httpx.post(url, json={"model": MINILM, "input": long_text, "truncate": False})
    assert refused.status_code == 400 and "truncate" in refused.json()["error"]
    small = httpx.post(url, json={"model": MINILM, "input": long_text, "options": {"num_ctx": 32}})
    assert small.json()["prompt_eval_count"] == 32
    for bad, needle in (({"input": [1, 2]}, "invalid input type"),
                        ({"input": {"a": 1}}, "invalid input type"),
                        ({"input": "x", "dimensions": -3}, "dimensions")):
        reply = httpx.post(url, json={"model": MINILM, **bad})
        assert reply.status_code == 400 and needle in reply.json()["error"], reply.text


def test_an_embedding_model_does_not_chat(server) -> None:
    chat = httpx.post(server.url + "/api/chat", json={
        "model": MINILM, "messages": [{"role": "user", "content": "hi"}], "stream": False})
    assert chat.status_code == 400 and "does not support chat" in chat.json()["error"]
    gen = httpx.post(server.url + "/api/generate", json={"model": MINILM, "prompt": "hi"})
    assert gen.status_code == 400 and "does not support generate" in gen.json()["error"]
    with pytest.raises(openai.BadRequestError) as err:
        _openai(server).chat.completions.create(model=MINILM, messages=[{"role": "user", "content": "hi"}])
    assert "embeddings" in err.value.body["message"]
    shown = httpx.post(server.url + "/api/show", json={"model": MINILM}).json()
    assert shown["capabilities"] == ["embedding"]
    assert shown["details"]["family"] == "bert"
    assert "embedding" not in httpx.post(server.url + "/api/show",
                                         json={"model": "smollm2"}).json()["capabilities"]


def test_a_decoder_model_answers_embeddings_too(server) -> None:
    """SmolLM2: its last token's final hidden state (576 wide), normalised by /api/embed."""
    reply = httpx.post(server.url + "/api/embed",
                       json={"model": "smollm2", "input": ["The cat sat.", "The cat sat."]}).json()
    first, second = (torch.tensor(v) for v in reply["embeddings"])
    assert first.shape == (576,) and abs(first.norm().item() - 1) < 1e-4
    assert torch.allclose(first, second, atol=1e-5)
    raw = httpx.post(server.url + "/api/embeddings",
                     json={"model": "smollm2", "prompt": "The cat sat."}).json()["embedding"]
    assert torch.nn.functional.cosine_similarity(torch.tensor(raw), first, dim=0) > 0.9999
    assert abs(torch.tensor(raw).norm().item() - 1) > 1e-2      # the legacy one as it is
    # the model still chats after it, and its KV cache holds nothing for the embeddings
    chat = httpx.post(server.url + "/api/generate", json={
        "model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    assert chat.status_code == 200


def test_shoal_run_prints_the_vector(server, tmp_path: Path) -> None:
    env = {**os.environ, "SHOAL_HOST": server.url, "SHOAL_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "shoal", "run", MINILM, "hello world"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    vector = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(vector) == 384 and abs(sum(x * x for x in vector) - 1) < 1e-3


def test_langchain_openai_and_ollama_embeddings(server, expected: torch.Tensor) -> None:
    from langchain_ollama import OllamaEmbeddings
    from langchain_openai import OpenAIEmbeddings

    # NOTE: by default OpenAIEmbeddings sends tiktoken ids (OpenAI's vocabulary, not the
    # model's; taken as the model's ids, as test_openai_token_id_inputs shows, and tiktoken's
    # tables need a download); a local model needs its texts: check_embedding_ctx_length=False
    lc_openai = OpenAIEmbeddings(model=MINILM, base_url=server.url + "/v1", api_key="unused",
                                 check_embedding_ctx_length=False, max_retries=0)
    _close(lc_openai.embed_documents(TEXTS), expected)
    _close([lc_openai.embed_query(TEXTS[0])], expected[:1])
    lc_ollama = OllamaEmbeddings(model=MINILM, base_url=server.url)
    _close(lc_ollama.embed_documents(TEXTS), expected)
    _close([lc_ollama.embed_query(TEXTS[1])], expected[1:2])


def test_llm_embed_with_llm_ollama(server, tmp_path: Path, expected: torch.Tensor) -> None:
    env = {**os.environ, "OLLAMA_HOST": server.url, "LLM_USER_PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "llm", "embed", "-m", f"ollama/{MINILM}",
                           "-c", TEXTS[2]], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    _close([json.loads(done.stdout)], expected[2:3])
