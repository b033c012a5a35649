"""Structured output through both dialects: a real `shoal serve` (SmolLM2), the real `openai`
and `ollama` clients. Every answer must parse and validate; bad constraints are a 400 naming
the field. Schemas are small and answers short (max_tokens 64) so the file stays fast.
"""
from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

MODEL = "smollm2:135m"
ASK = [{"role": "user", "content": "Describe a cat called Tom as JSON."}]
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "color": {"type": "string", "enum": ["black", "white", "orange"]},
                         "indoor": {"type": "boolean"}},
          "required": ["name", "color", "indoor"], "additionalProperties": False}
FAST = {"max_tokens": 64, "temperature": 0}


class Cat(BaseModel):
    name: str = Field(max_length=12)
    indoor: bool


@pytest.fixture(scope="module")
def client(shoal_server) -> OpenAI:
    return OpenAI(base_url=shoal_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": ASK, "max_tokens": 64, "temperature": 0, **body})


# ---- OpenAI dialect ------------------------------------------------------------------
def test_response_format_json_schema_validates(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, **FAST,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "cat", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_sampled_samples_all_validate(client: OpenAI) -> None:
    # n > 1, sampled: each sample has its own grammar state
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=64, n=3, temperature=1.0, seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}})
    assert len(r.choices) == 3
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_parse_with_a_pydantic_model(client: OpenAI) -> None:
    r = client.beta.chat.completions.parse(model=MODEL, messages=ASK, response_format=Cat, **FAST)
    cat = r.choices[0].message.parsed
    assert isinstance(cat, Cat) and isinstance(cat.indoor, bool)


def test_json_object_sampled(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=64, seed=3,
                                       response_format={"type": "json_object"})
    choice = r.choices[0]
    if choice.finish_reason == "stop":       # a sampled object may run past 64 tokens
        assert isinstance(json.loads(choice.message.content), dict)
    assert choice.message.content.startswith("{")


def test_guided_regex_gives_only_digits(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0,
                                       extra_body={"guided_regex": "[0-9]+"})
    assert r.choices[0].message.content.isdigit()


def test_guided_choice_and_structured_outputs(client: OpenAI) -> None:
    choices = ["yes", "no", "maybe"]
    r = client.chat.completions.create(model=MODEL, messages=ASK, **FAST,
                                       extra_body={"guided_choice": choices,
                                                   "guided_decoding_backend": "xgrammar"})
    assert r.choices[0].message.content in choices
    r = client.chat.completions.create(model=MODEL, messages=ASK, **FAST,
                                       extra_body={"structured_outputs": {"json": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0,
                                       extra_body={"structured_outputs": {"choice": choices}})
    assert r.choices[0].message.content in choices
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0,
                                       extra_body={"guided_json": {"type": "integer", "maximum": 99}})
    assert int(r.choices[0].message.content) <= 99


def test_completions_endpoint_is_constrained(client: OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="My favourite number is", max_tokens=6,
                                  temperature=0, extra_body={"guided_regex": "[0-9]{1,3}"})
    assert r.choices[0].text.isdigit() and len(r.choices[0].text) <= 3
    r = client.completions.create(model=MODEL, prompt="A cat as JSON:", **FAST,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "c", "schema": SCHEMA}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_json_object_with_a_schema_enforces_the_schema(shoal_server) -> None:
    # Together's and Fireworks' spelling (instructor sends it for them): the schema is not dropped
    reply = _chat(shoal_server, response_format={"type": "json_object", "schema": SCHEMA})
    assert reply.status_code == 200, reply.text
    jsonschema.validate(json.loads(reply.json()["choices"][0]["message"]["content"]), SCHEMA)


def test_streamed_schema_concatenates_to_valid_json(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, stream=True, **FAST,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "[1"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_regex": "[0-9"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: ???"}, "guided_grammar"),
    ({"guided_decoding_backend": "magic", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"guided_regex": "[0-9]+", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"response_format": {"type": "json_object", "schema": {"type": "nonsense"}}}, "response_format.schema"),
    ({"response_format": {"type": "json_schema", "schema": SCHEMA, "json_schema": {"name": "x", "schema": {}}}},
     "response_format.schema"),
])
def test_bad_constraints_are_400_naming_the_field(shoal_server, body, param) -> None:
    for stream in (False, True):
        r = _chat(shoal_server, stream=stream, **body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and param in error["message"], error
    # the engine keeps serving
    assert _chat(shoal_server, max_tokens=2).status_code == 200


def test_bad_constraint_through_the_client(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, **FAST,
                                       extra_body={"guided_regex": "(unclosed"})
    assert info.value.body["param"] == "guided_regex"


# ---- Ollama dialect ------------------------------------------------------------------
@pytest.fixture(scope="module")
def ollama_client(shoal_server) -> ollama.Client:
    return ollama.Client(host=shoal_server.url, timeout=120)


def test_ollama_format_json_and_schema(ollama_client: ollama.Client) -> None:
    opts = {"temperature": 0, "num_predict": 64}
    r = ollama_client.chat(model=MODEL, messages=ASK, format="json", options=opts)
    assert r.message.content.startswith("{")
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.message.content), dict)
    schema = Cat.model_json_schema()
    r = ollama_client.chat(model=MODEL, messages=ASK, format=schema, options=opts)
    Cat.model_validate_json(r.message.content)
    r = ollama_client.generate(model=MODEL, prompt="A cat as JSON:", format=SCHEMA, options=opts)
    jsonschema.validate(json.loads(r.response), SCHEMA)
    parts = [p.message.content for p in ollama_client.chat(model=MODEL, messages=ASK, format=schema,
                                                           options=opts, stream=True)]
    Cat.model_validate_json("".join(parts))


@pytest.mark.parametrize("fmt", ["yaml", 3, ["json"], {"type": "nonsense"}])
def test_ollama_bad_format_is_400(shoal_server, fmt) -> None:
    for path, extra in (("/api/chat", {"messages": ASK}), ("/api/generate", {"prompt": "hi"})):
        r = httpx.post(shoal_server.url + path, timeout=60,
                       json={"model": MODEL, "format": fmt, "stream": False, **extra})
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"error"} and "format" in r.json()["error"]


def test_ollama_empty_format_is_unconstrained(ollama_client: ollama.Client) -> None:
    r = ollama_client.generate(model=MODEL, prompt="Hi", format="", options={"num_predict": 2})
    assert r.done
