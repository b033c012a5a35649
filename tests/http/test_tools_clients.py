"""Tools with unmodified clients against a real `shoal serve` of SmolLM2, whose template renders
no tools (shoal's built-in tool prompt and call grammar): `openai` (auto, required, named,
streamed calls reassembled by the SDK), `ollama` (a Python function as a tool), LangChain's
ChatOpenAI and ChatOllama (bind_tools and a two-step tool loop, with_structured_output through
function calling) and instructor's TOOLS mode. Forced calls must validate, every time."""
from __future__ import annotations

import json

import instructor
import jsonschema
import ollama
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field

MODEL = "smollm2:135m"
PARAMS = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
          "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": PARAMS}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                          "parameters": {"type": "object", "properties": {
                                              "timezone": {"type": "string", "maxLength": 12}},
                                              "required": ["timezone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(shoal_server) -> OpenAI:
    return OpenAI(base_url=shoal_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _valid(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS)
    return args


def test_auto_renders_the_tools_and_answers_or_calls(client: OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], max_tokens=16,
                                       temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 50      # not dropped: rendered
    message = r.choices[0].message
    for call in message.tool_calls or []:
        assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
    if not message.tool_calls:
        assert message.content and "<tool_call>" not in message.content


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_calls_validate_on_every_sample(client: OpenAI, choice) -> None:
    # n = 3 sampled samples, each under its own grammar state: several seeds in one request
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=choice,
                                       parallel_tool_calls=False, max_tokens=64, temperature=1.0, seed=1, n=3)
    assert len(r.choices) == 3
    for choice0 in r.choices:
        assert choice0.finish_reason == "tool_calls" and len(choice0.message.tool_calls) == 1
        call = choice0.message.tool_calls[0]
        if call.function.name == "get_weather":
            _valid(call)
        else:
            assert choice == "required" and isinstance(json.loads(call.function.arguments)["timezone"], str)


def test_streamed_calls_reassembled_by_the_sdk(client: OpenAI) -> None:
    body = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**body).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**body) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and _valid(call) == _valid(whole)


def test_ollama_client_with_a_python_function(shoal_server) -> None:
    def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
          city: the city's name
        """
        return "sunny"

    cl = ollama.Client(host=shoal_server.url)
    plain = cl.chat(model=MODEL, messages=ASK, options={"temperature": 0, "num_predict": 4})
    r = cl.chat(model=MODEL, messages=ASK, tools=[get_weather], options={"temperature": 0, "num_predict": 8})
    assert r.prompt_eval_count > plain.prompt_eval_count + 50
    for call in r.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    # a tool round trip in Ollama's shape: the call and its result go back through the prompt
    history = [*ASK, {"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 degrees"}]
    answer = cl.chat(model=MODEL, messages=history, tools=[get_weather],
                     options={"temperature": 0, "num_predict": 8})
    assert answer.prompt_eval_count > r.prompt_eval_count
    assert answer.message.content or answer.message.tool_calls


@tool
def get_weather(city: str, unit: str) -> str:
    """The weather in a city; unit is celsius or fahrenheit."""
    return f"sunny, 21 degrees {unit} in {city}"


def test_langchain_chat_openai_tool_loop(shoal_server) -> None:
    llm = ChatOpenAI(base_url=shoal_server.url + "/v1", api_key="unused", model=MODEL, temperature=0,
                     max_tokens=48, max_retries=0)
    messages = [HumanMessage("What is the weather in Paris?")]
    first = llm.bind_tools([get_weather], tool_choice="required").invoke(messages)
    assert first.tool_calls and first.tool_calls[0]["name"] == "get_weather"
    call = first.tool_calls[0]
    assert set(call["args"]) == {"city", "unit"}
    messages += [first, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    answer = llm.bind_tools([get_weather]).invoke(messages)
    assert isinstance(answer, AIMessage) and (answer.content or answer.tool_calls)


class Weather(BaseModel):
    city: str = Field(max_length=20)
    celsius: int = Field(ge=-50, le=60)


def test_langchain_with_structured_output_function_calling(shoal_server) -> None:
    llm = ChatOpenAI(base_url=shoal_server.url + "/v1", api_key="unused", model=MODEL, temperature=0,
                     max_tokens=48, max_retries=0)
    result = llm.with_structured_output(Weather, method="function_calling").invoke("Paris is at 21 degrees.")
    assert isinstance(result, Weather)


def test_langchain_chat_ollama_bind_tools_and_tool_loop(shoal_server) -> None:
    llm = ChatOllama(base_url=shoal_server.url, model=MODEL, temperature=0, num_predict=8)
    messages = [HumanMessage("What is the weather in Paris?")]
    reply = llm.bind_tools([get_weather]).invoke(messages)
    for call in reply.tool_calls:
        assert call["name"] == "get_weather" and isinstance(call["args"], dict)
    # the second step of a loop: the call (as the model would have made it) and its result
    call = {"name": "get_weather", "args": {"city": "Paris", "unit": "celsius"}, "id": "call_1"}
    messages += [AIMessage("", tool_calls=[call]), ToolMessage(get_weather.invoke(call["args"]), tool_call_id="call_1")]
    answer = llm.bind_tools([get_weather]).invoke(messages)
    assert answer.usage_metadata["input_tokens"] > reply.usage_metadata["input_tokens"]
    assert answer.content or answer.tool_calls


def test_instructor_tools_mode(client: OpenAI) -> None:
    patched = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    weather = patched.chat.completions.create(model=MODEL, response_model=Weather, max_retries=0, max_tokens=96,
                                              temperature=0, messages=[{"role": "user", "content": "Paris, 21 C."}])
    assert isinstance(weather, Weather) and -50 <= weather.celsius <= 60
