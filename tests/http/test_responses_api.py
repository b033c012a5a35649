"""POST /v1/responses through the unmodified `openai` SDK against a real `shoal serve` of
SmolLM2: plain, streamed (the event sequence), with a JSON schema, with a tool and a tool
result, and bad input as 400s naming the Responses field.
"""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

MODEL = "smollm2:135m"
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12}, "indoor": {"type": "boolean"}},
          "required": ["name", "indoor"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}


class Cat(BaseModel):
    name: str = Field(max_length=12)
    indoor: bool


@pytest.fixture(scope="module")
def client(shoal_server) -> OpenAI:
    return OpenAI(base_url=shoal_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_plain_response(client: OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Name a color.", max_output_tokens=12, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.usage.input_tokens > 3 and 0 < response.usage.output_tokens <= 12
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed"


def test_instructions_and_items_reach_the_template(client: OpenAI, shoal_server) -> None:
    # the same conversation as a chat request gives the same greedy answer
    response = client.responses.create(
        model=MODEL, instructions="You answer in French.", temperature=0, max_output_tokens=16,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]},
               {"role": "assistant", "content": "Bonjour !"},
               {"role": "user", "content": "Again, please."}])
    chat = httpx.post(shoal_server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "system", "content": "You answer in French."},
                     {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Bonjour !"},
                     {"role": "user", "content": "Again, please."}]}).json()
    assert response.output_text == chat["choices"][0]["message"]["content"]
    assert response.usage.input_tokens == chat["usage"]["prompt_tokens"]


def test_cut_short_is_incomplete(client: OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


def test_streamed_event_sequence(client: OpenAI) -> None:
    kinds, deltas = [], []
    stream = client.responses.create(model=MODEL, input="Name two animals.", max_output_tokens=48,
                                     temperature=0, stream=True)
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        last = event
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    final = last.response
    assert deltas and "".join(deltas) == final.output_text
    # the streamed answer is the whole answer
    whole = client.responses.create(model=MODEL, input="Name two animals.", max_output_tokens=48, temperature=0)
    assert whole.output_text == final.output_text and whole.status == final.status


def test_stream_helper_gets_the_final_response(client: OpenAI) -> None:
    # the SDK's helper wants response.completed: an answer that ends by itself
    with client.responses.stream(model=MODEL, input="Say yes.", max_output_tokens=200, temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == text


def test_raw_stream_numbers_every_event(shoal_server) -> None:
    with httpx.stream("POST", shoal_server.url + "/v1/responses", timeout=120, json={
            "model": MODEL, "input": "Hi", "max_output_tokens": 4, "stream": True}) as reply:
        assert reply.status_code == 200
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"]["usage"]["output_tokens"] == 4


def test_json_schema_format_and_parse(client: OpenAI) -> None:
    response = client.responses.create(
        model=MODEL, input="Describe a cat called Tom.", max_output_tokens=48, temperature=0,
        text={"format": {"type": "json_schema", "name": "cat", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
    parsed = client.responses.parse(model=MODEL, input="Describe a cat called Tom.", max_output_tokens=48,
                                    temperature=0, text_format=Cat)
    assert isinstance(parsed.output_parsed, Cat)


def test_required_tool_call_then_its_result(client: OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                       tool_choice="required", max_output_tokens=48, temperature=0)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    arguments = json.loads(calls[0].arguments)
    jsonschema.validate(arguments, WEATHER["parameters"])
    # the result goes back as a function_call_output item: the model answers in text
    follow_up = client.responses.create(
        model=MODEL, tools=[WEATHER], max_output_tokens=24, temperature=0, tool_choice="none",
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}])
    assert follow_up.output_text
    assert not [item for item in follow_up.output if item.type == "function_call"]


def test_streamed_tool_call_events(client: OpenAI) -> None:
    kinds, fragments = [], []
    with client.responses.stream(model=MODEL, input="Weather in Rome?", tools=[WEATHER],
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 max_output_tokens=48, temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.function_call_arguments.delta":
                fragments.append(event.delta)
        final = stream.get_final_response()
    call = next(item for item in final.output if item.type == "function_call")
    assert "response.function_call_arguments.done" in kinds
    assert "".join(fragments) == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


@pytest.mark.parametrize(("body", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "computer_call"}]}, "input[0].type"),
    ({"include": ["reasoning.encrypted_content"]}, "include[0]"),
    ({"truncation": "auto"}, "truncation"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_bad_input_is_400_naming_the_field(shoal_server, body: dict, param: str) -> None:
    reply = httpx.post(shoal_server.url + "/v1/responses", timeout=60,
                       json={"model": MODEL, "input": "Hi", "max_output_tokens": 4, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert error["message"]


def test_an_answer_longer_than_the_context_is_a_400_naming_max_output_tokens(shoal_server) -> None:
    """The chat layer's context error, renamed to the Responses field, keeps its code (the
    fuzzer found it a 500: the renaming rebuilt the error through the wrong constructor)."""
    reply = httpx.post(shoal_server.url + "/v1/responses", timeout=60,
                       json={"model": MODEL, "input": "", "max_output_tokens": 10**9})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "max_output_tokens" and error["code"] == "context_length_exceeded"
    assert "maximum context length" in error["message"]


def test_bad_input_through_the_client(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_123")
    assert "statelessly" in str(caught.value)
