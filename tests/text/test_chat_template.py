"""Chat templates: parity with transformers on the real file, message checks, sandbox errors."""
from __future__ import annotations

import datetime
import json
import time
import tracemalloc

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models

from shoal.core.errors import InvalidParameterError
from shoal.text import DEFAULT_CHAT_TEMPLATE, Tokenizer, render_chat_template
from shoal.text import jinja_sandbox

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why? 🤔 café 中文"},
    ],
    [{"role": "user", "content": "multi\nline\n\n  indented"},
     {"role": "assistant", "content": ""}],
]


# The real SmolLM2 file comes from conftest's session fixtures (skipped when unavailable).

@pytest.fixture(scope="module")
def tok(smollm2_tokenizer) -> Tokenizer:
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def reference(reference_tokenizer):
    return reference_tokenizer


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(tok: Tokenizer, reference, messages: list[dict],
                              add_generation_prompt: bool) -> None:
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = reference.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    # The rendered prompt's control tokens survive encoding as single ids.
    ids = tok.encode(ours, add_special_tokens=False)
    assert ids.count(tok.token_to_id("<|im_start|>")) == ours.count("<|im_start|>")


def test_content_parts_join_like_strings(tok: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"},
                                          {"type": "text", "text": "second"}]}]
    plain = [{"role": "user", "content": "first\nsecond"}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(plain)


@pytest.mark.parametrize("messages", [
    "hello",
    [],
    None,
    [{"content": "no role"}],
    [{"role": "wizard", "content": "x"}],
    [{"role": "user"}],
    [{"role": "user", "content": 42}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": ["bare string part"]}],
    ["not a dict"],
    [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}],
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
])
def test_malformed_messages_are_invalid_parameters(messages) -> None:
    with pytest.raises(InvalidParameterError) as info:
        render_chat_template(None, messages)
    assert info.value.field == "messages"


def test_fallback_is_chatml() -> None:
    backend = RustTokenizer(models.BPE({"a": 0}, []))
    tok = Tokenizer(backend, bos_token_id=None, eos_token_id=None)
    assert tok.chat_template is None
    text = tok.apply_chat_template([{"role": "system", "content": "S"},
                                    {"role": "user", "content": "U"}])
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert render_chat_template(DEFAULT_CHAT_TEMPLATE, [{"role": "user", "content": "U"}],
                                add_generation_prompt=False) == "<|im_start|>user\nU<|im_end|>\n"


def test_template_errors_become_invalid_parameters() -> None:
    cases = [
        "{{ raise_exception('only user and assistant roles are supported') }}",
        "{% for m in messages %}{{ m.content + 1 }}{% endfor %}",   # str + int
        "{{ messages[0].nope.deeper }}",                            # undefined attribute chain
        "{% if %}",                                                 # syntax error
        "{{ messages.append(1) }}",                                 # sandbox: immutable
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",           # sandbox: no dunder access
    ]
    for template in cases:
        with pytest.raises(InvalidParameterError) as info:
            render_chat_template(template, [{"role": "user", "content": "x"}])
        assert info.value.field == "messages"
    with pytest.raises(InvalidParameterError, match="only user and assistant"):
        render_chat_template(cases[0], [{"role": "user", "content": "x"}])


def test_globals_filters_and_variables() -> None:
    template = ("{{ bos_token }}{{ strftime_now('%Y') }}|{{ tools | tojson }}|"
                "{{ messages[0] | tojson(indent=2) }}|{{ enable_thinking }}|"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}"
                "{% endfor %}{{ eos_token }}")
    tools = [{"type": "function", "function": {"name": "météo", "description": "天気"}}]
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    text = render_chat_template(template, messages, bos_token="<s>", eos_token="</s>", tools=tools,
                                enable_thinking=False)
    year = str(datetime.datetime.now().year)
    assert text.startswith(f"<s>{year}|")
    assert json.dumps(tools, ensure_ascii=False) in text      # non-ASCII kept, not \u-escaped
    assert json.dumps({"role": "user", "content": "x"}, indent=2) in text
    assert text.endswith("|False|user</s>")


def test_tool_calls_and_tool_results_pass_through() -> None:
    template = ("{% for m in messages %}{{ m.role }}:"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments.city }})"
                "{% endfor %}{{ m.content }};{% endfor %}")
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "developer", "content": "be brief"},
    ]
    text = render_chat_template(template, messages)
    assert text == "user:weather?;assistant:get_weather(Zürich);tool:sunny;system:be brief;"
    # The caller's messages are not modified.
    assert messages[1]["content"] is None and messages[3]["role"] == "developer"
    assert isinstance(messages[1]["tool_calls"][0]["function"]["arguments"], str)


# ---- the sandbox's budget (issue 13: a model file's template is anyone's code) ----------------

HI = [{"role": "user", "content": "hi"}]
# The Jinja twin of the Go template: a string doubled sixty times.
DOUBLING = ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}{{ ns.s }}")


@pytest.mark.parametrize("template", [
    DOUBLING,
    DOUBLING.replace("ns.s ~ ns.s", "ns.s + ns.s"),
    "{{ 'x' * 1000000000 }}",
    "{{ 10 ** 100000000 }}",
    "{{ 'x'|center(1000000000) }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{% set s = 'x' * 100000 %}{{ s.replace('', s) }}",
    "{% set s = 'x' * 100000 %}{{ s|replace('', s) }}",
    "{% set s = 'x\n' * 100000 %}{{ s|indent(100000) }}",
    "{% set s = 'x' * 1000000 %}{{ s.join(['a'] * 100000) }}",
    "{{ '%1000000000d' % 1 }}",
    "{{ '%1000000000d'|format(1) }}",
    "{{ '{:1000000000}'.format(1) }}",
    "{{ '{0:{1}}'.format(1, 1000000000) }}",
    "{{ [1]|batch(1000000000, 'x')|list }}",
    "{{ messages|tojson(indent=1000000000) }}",
    "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
])
def test_a_template_cannot_make_huge_strings(template: str) -> None:
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(InvalidParameterError) as info:
            render_chat_template(template, HI)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.field == "messages"
    assert "too much text" in info.value.message or "too large a number" in info.value.message
    assert elapsed < 1.5 and peak < 400 << 20, (elapsed, peak >> 20)


@pytest.mark.parametrize("template, words", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "runs too long"),
    ("{% macro a() %}{{ a() }}{% endmacro %}{{ a() }}", "nests too deeply"),
    ("{{ range(10**9)|length }}", "Range too big"),
    ("{{ 1 / 0 }}", "division by zero"),
    ("{{ lipsum(1000000) }}", "'lipsum' is undefined"),
])
def test_runaway_and_failing_templates_are_invalid_parameters(monkeypatch, template: str, words: str) -> None:
    monkeypatch.setattr(jinja_sandbox, "MAX_SECONDS", 0.3)
    started = time.monotonic()
    with pytest.raises(InvalidParameterError) as info:
        render_chat_template(template, HI)
    assert words in info.value.message and time.monotonic() - started < 1.5


def test_the_budget_leaves_room_for_long_prompts() -> None:
    content = "word " * 2_000_000                     # 10 MB, concatenated a few times on its way
    text = render_chat_template(DEFAULT_CHAT_TEMPLATE, [{"role": "user", "content": content}])
    assert len(text) == len(content) + 50
    assert render_chat_template("{{ 'ab' * 3 }}{{ '%5d' % 7 }}{{ '{:>4}'.format('z') }}{{ 'q'|center(5) }}"
                                "{{ 2 ** 10 }}{{ messages[0].content ~ '!' }}", HI) == "ababab    7   z  q  1024hi!"
