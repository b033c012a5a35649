"""The tool layer (text/tools): call formats read from templates, the parsers (whole and
streamed, split at every point), tool and tool_choice checks, the built-in prompt's history
rewrite, and the call grammar run through llguidance over a real vocabulary."""
from __future__ import annotations

import json

import llguidance
import pytest
import tool_models

from shoal.core.errors import InvalidParameterError
from shoal.engine.structured.grammar import build_llg_tokenizer, grammar_text
from shoal.text.chat_template import DEFAULT_CHAT_TEMPLATE, GEMMA_CHAT_TEMPLATE
from shoal.text.tokenizer import Tokenizer
from shoal.text.tools import (ToolCallStream, check_tool_choice, check_tools, detect_format,
                              parse_tool_calls, plan_tools)
from shoal.text.tools.formats import BUILTIN, HERMES, LLAMA3_JSON, MISTRAL
from shoal.text.tools.prompt import rewrite_history

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}

# (format, strip, model output, expected content, expected calls)
CASES = [
    (HERMES, (), 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                 '"unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {})]),
    (HERMES, (), "No tools needed: 2 < 3 and <b>bold</b>.", "No tools needed: 2 < 3 and <b>bold</b>.", []),
    (HERMES, (), "<tool_call>\n{not json}\n</tool_call> after", "<tool_call>\n{not json}\n</tool_call> after", []),
    (BUILTIN, (), '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}\n</tool_call>',
     None, [("get_time", {"tz": "UTC"})]),
    (LLAMA3_JSON, ("<|eom_id|>",), '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", '
                                   '"unit": "f"}}; {"name": "get_time", "parameters": {}}<|eom_id|>',
     None, [("get_weather", {"city": "Oslo", "unit": "f"}), ("get_time", {})]),
    (LLAMA3_JSON, (), '  {"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
    (LLAMA3_JSON, (), '{"city": "Oslo"} is JSON, not a call', '{"city": "Oslo"} is JSON, not a call', []),
    (LLAMA3_JSON, (), "Plain {answer}", "Plain {answer}", []),
    (MISTRAL, ("</s>",), 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", '
                         '"unit": "c"}}, {"name": "get_time", "arguments": {}}]</s>',
     "Sure.", [("get_weather", {"city": "Rome", "unit": "c"}), ("get_time", {})]),
    (MISTRAL, ("</s>",), "Just text.</s>", "Just text.", []),
    (MISTRAL, ("</s>",), "[TOOL_CALLS] not json</s>", "[TOOL_CALLS] not json", []),
    (MISTRAL, (), '[TOOL_CALLS][{"name": "now", "arguments": {"": [[[[', '[TOOL_CALLS][{"name": "now", "arguments": {"": [[[[', []),
    (MISTRAL, (), '[TOOL_CALLS][{"city": 1}] and on', '[TOOL_CALLS][{"city": 1}] and on', []),
    (LLAMA3_JSON, (), '{"name": "get_time", "parameters": {', '{"name": "get_time", "parameters": {', []),
    (HERMES, (), '<tool_call>\n{"name": "get_time", "arguments": {', '<tool_call>\n{"name": "get_time", "arguments": {', []),
]


def _calls(parsed):
    return [(c.name, dict(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("fmt,strip,text,content,calls", CASES)
def test_parse_whole_answer(fmt, strip, text, content, calls) -> None:
    parsed = parse_tool_calls(text, fmt, strip)
    assert parsed.content == content
    assert _calls(parsed) == calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in parsed.calls)


def _streamed(fmt, strip, chunks):
    stream = ToolCallStream(fmt, strip)
    pieces = []
    for chunk in chunks:
        pieces += stream.feed(chunk)
    pieces += stream.finish()
    texts = "".join(p for p in pieces if isinstance(p, str))
    calls = [(p.name, dict(p.arguments)) for p in pieces if not isinstance(p, str)]
    return texts, calls


@pytest.mark.parametrize("fmt,strip,text,content,calls", CASES)
def test_streaming_gives_the_same_at_every_split(fmt, strip, text, content, calls) -> None:
    whole_text, whole_calls = _streamed(fmt, strip, [text])
    assert whole_calls == calls
    for cut in range(len(text) + 1):
        assert _streamed(fmt, strip, [text[:cut], text[cut:]]) == (whole_text, whole_calls), cut
    for cut in range(0, len(text), 7):
        assert _streamed(fmt, strip, [text[:cut], text[cut:cut + 3], text[cut + 3:]]) == (whole_text, whole_calls)
    assert _streamed(fmt, strip, list(text)) == (whole_text, whole_calls)


def test_stream_holds_back_a_possible_marker_and_emits_calls_when_complete() -> None:
    stream = ToolCallStream(HERMES)
    assert stream.feed("Hello <tool") == ["Hello"]          # " <tool" may open a call
    assert stream.feed("_call>\n{\"name\": \"get_time\", ") == []
    pieces = stream.feed("\"arguments\": {}}\n</tool_call>")
    assert [p.name for p in pieces] == ["get_time"]
    assert stream.feed("<tool_c") == []                     # may open another call: held
    assert stream.finish() == ["<tool_c"]                   # it did not: text after all
    assert ToolCallStream(HERMES).feed("<tools are fun") == ["<tools are fun"]
    # a '<' that cannot open the marker goes out at once
    assert ToolCallStream(HERMES).feed("a <b> c") == ["a <b> c"]


def test_detect_format_from_templates() -> None:
    assert detect_format(tool_models.HERMES_TEMPLATE) is HERMES
    assert detect_format(tool_models.LLAMA3_TEMPLATE) is LLAMA3_JSON
    assert detect_format(tool_models.MISTRAL_TEMPLATE) is MISTRAL
    for plain in (DEFAULT_CHAT_TEMPLATE, GEMMA_CHAT_TEMPLATE, None):
        assert detect_format(plain) is BUILTIN
    # Ollama's Go templates
    assert detect_format('{{- if .Tools }}<tool_call>{{ end }}') is HERMES
    assert detect_format("{{ if .Tools }}[AVAILABLE_TOOLS] {{ json .Tools }}[/AVAILABLE_TOOLS]"
                         "{{ end }}[TOOL_CALLS]") is MISTRAL


@pytest.mark.parametrize("tools,field,words", [
    ("nope", "tools", "list"),
    ([{"type": "retrieval"}], "tools[0].type", "only 'function'"),
    ([{"type": "function"}], "tools[0].function", "required"),
    ([{"type": "function", "function": {"name": ""}}], "tools[0].function.name", "non-empty"),
    ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name", "spaces"),
    ([TIME, TIME], "tools[1].function.name", "twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters",
     "JSON schema object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
     "tools[0].function.parameters", "type 'object'"),
])
def test_bad_tools_name_the_field(tools, field, words) -> None:
    with pytest.raises(InvalidParameterError) as info:
        check_tools(tools)
    assert info.value.field == field and words in info.value.message


@pytest.mark.parametrize("choice,tools,field", [
    ("required", [], "tool_choice"),
    ("sometimes", [WEATHER], "tool_choice"),
    ({"type": "function", "function": {"name": "missing"}}, [WEATHER], "tool_choice.function.name"),
    ({"type": "custom", "function": {"name": "get_weather"}}, [WEATHER], "tool_choice.type"),
    ({"type": "function"}, [WEATHER], "tool_choice.function.name"),
    (3, [WEATHER], "tool_choice"),
])
def test_bad_tool_choice_names_the_field(choice, tools, field) -> None:
    with pytest.raises(InvalidParameterError) as info:
        check_tool_choice(choice, check_tools(tools))
    assert info.value.field == field


def test_builtin_history_rewrite() -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"id": "call_1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = rewrite_history(messages, "PROMPT")
    assert out[0] == {"role": "system", "content": "Be brief.\n\nPROMPT"}
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    # what the model writes back parses into the same call
    assert _calls(parse_tool_calls(out[2]["content"], BUILTIN)) == [("get_weather", {"city": "Paris"})]


@pytest.fixture(scope="module")
def hermes_tokenizer(tmp_path_factory) -> Tokenizer:
    path = tool_models.write_tool_model(tmp_path_factory.mktemp("hermes"), "hermes")
    return Tokenizer.from_hf_dir(path)


def _matcher(plan, tokenizer):
    llt = build_llg_tokenizer(tokenizer, tokenizer.vocab_size)
    return llguidance.LLMatcher(llt, grammar_text(plan.structured))


def test_required_grammar_forces_a_valid_call(hermes_tokenizer) -> None:
    plan = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None,
                      tool_models.HERMES_TEMPLATE, hermes_tokenizer)
    m = _matcher(plan, hermes_tokenizer)
    forced = hermes_tokenizer.decode(m.compute_ff_tokens(), skip_special_tokens=False)
    assert forced.startswith('<tool_call>\n{"name": "get_weather", "arguments": {')
    bad = hermes_tokenizer.encode('<tool_call>\n{"name": "get_weather", "arguments": {"city": 3',
                                  add_special_tokens=False)
    assert not all(m.consume_token(t) for t in bad)


def test_auto_grammar_lets_text_through_until_the_marker(hermes_tokenizer) -> None:
    plan = plan_tools([WEATHER], "auto", False, tool_models.HERMES_TEMPLATE, hermes_tokenizer)
    m = _matcher(plan, hermes_tokenizer)
    for t in hermes_tokenizer.encode("It is <b>warm</b> today.\n", add_special_tokens=False):
        assert m.consume_token(t)
    assert m.is_accepting()                         # the answer may end here (text only)
    for t in hermes_tokenizer.encode("<tool_call>\n", add_special_tokens=False):
        assert m.consume_token(t)
    assert bytes(m.compute_ff_bytes()).decode() == '{"name": "get_weather", "arguments": {"city": "'
    assert not m.is_accepting()                     # a call once opened must be finished


def test_none_renders_no_tools_and_constrains_nothing(hermes_tokenizer) -> None:
    plan = plan_tools([WEATHER], "none", None, tool_models.HERMES_TEMPLATE, hermes_tokenizer)
    assert not plan.active and plan.structured is None and plan.render_tools is None


def test_builtin_plan_puts_the_prompt_in_the_system_message(hermes_tokenizer) -> None:
    plan = plan_tools([WEATHER], "required", False, DEFAULT_CHAT_TEMPLATE, hermes_tokenizer)
    assert plan.format is BUILTIN and plan.render_tools is None
    messages = plan.messages([{"role": "user", "content": "hi"}])
    assert messages[0]["role"] == "system"
    assert json.dumps(WEATHER["function"]) in messages[0]["content"]
    assert "at most one" in messages[0]["content"]


def test_detect_format_on_ollamas_own_templates() -> None:
    # the Qwen 2.5, Llama 3.1 and Mistral Modelfile TEMPLATEs the Go template tests render
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("go_templates", Path(__file__).parent / "test_go_template.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert detect_format(module.QWEN) is HERMES
    assert detect_format(module.LLAMA3) is LLAMA3_JSON
    assert detect_format(module.MISTRAL) is MISTRAL
