"""Structured output as the frameworks ask for it, unmodified, against a real `shoal serve`
of SmolLM2: instructor (JSON and JSON_SCHEMA modes), LangChain's `with_structured_output`
(json_schema and json_mode, ChatOpenAI and ChatOllama) and `llm --schema` through
llm-ollama. Each must hand back an object that validates. (Tool-call modes: test_tools_*.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import instructor
from instructor.core.exceptions import InstructorRetryException
import pytest
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field

MODEL = "smollm2:135m"
# json_mode carries no schema to the server: the prompt names the keys, as those docs advise
ASK = "Describe a cat called Tom as JSON with the keys name (a string) and indoor (true or false)."


class Cat(BaseModel):
    name: str = Field(max_length=12)
    indoor: bool


def _openai(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# NOTE: json_object modes carry no schema to the server, only to the prompt: the server's
# promise is a JSON object, and whether its keys are the model's is up to the model (SmolLM2
# 135M often invents its own). These tests hold the server to its part and accept either a
# validated object or a parse failure on a JSON object; the schema modes must validate.
def test_instructor_json_mode(shoal_server) -> None:
    client = instructor.from_openai(_openai(shoal_server), mode=instructor.Mode.JSON)
    ask = 'Fill in {"name": "", "indoor": false} for the cat Tom, who lives indoors.'
    try:
        cat = client.chat.completions.create(model=MODEL, response_model=Cat, max_retries=0, temperature=0,
                                             max_tokens=128, messages=[{"role": "user", "content": ask}])
        assert isinstance(cat, Cat)
    except InstructorRetryException as exc:
        completion = exc.last_completion
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_instructor_json_schema_mode(shoal_server) -> None:
    # the schema is enforced, not merely asked for: a prompt that says nothing of the keys,
    # and a pydantic schema that leaves extra keys unsaid (closed by the server, so it ends)
    client = instructor.from_openai(_openai(shoal_server), mode=instructor.Mode.JSON_SCHEMA)
    cat = client.chat.completions.create(
        model=MODEL, response_model=Cat, max_retries=0, temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": "Tell me about Tom."}])
    assert isinstance(cat, Cat) and 0 < len(cat.name) <= 12


def _check_structured(structured, method: str) -> None:
    result = structured.invoke(ASK)
    if method == "json_schema":
        assert isinstance(result["parsed"], Cat), result["parsing_error"]
    else:
        assert isinstance(json.loads(result["raw"].content), dict)
        assert result["parsed"] is None or isinstance(result["parsed"], Cat)


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_chat_openai_with_structured_output(shoal_server, method: str) -> None:
    llm = ChatOpenAI(base_url=shoal_server.url + "/v1", api_key="unused", model=MODEL,
                     temperature=0, max_tokens=64, max_retries=0)
    _check_structured(llm.with_structured_output(Cat, method=method, include_raw=True), method)


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_chat_ollama_with_structured_output(shoal_server, method: str) -> None:
    llm = ChatOllama(base_url=shoal_server.url, model=MODEL, temperature=0, num_predict=64)
    _check_structured(llm.with_structured_output(Cat, method=method, include_raw=True), method)


def test_llm_cli_schema_through_llm_ollama(shoal_server, tmp_path: Path) -> None:
    # `llm` finds the models through llm-ollama's /api/tags and /api/show, then sends the
    # schema as Ollama's `format`
    env = {**os.environ, "OLLAMA_HOST": shoal_server.url, "LLM_USER_PATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "llm", "-m", f"ollama/{MODEL}", "--schema", "name, age int", "-o", "temperature", "0",
         "-o", "num_predict", "64", "Invent a person."],
        check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    person = json.loads(done.stdout)
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
