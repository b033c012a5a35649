"""No request field that changes the output is silently ignored: each one OpenAI or vLLM
defines either works or is a 400 naming it, in the dialect's error shape (SmolLM2 server)."""
from __future__ import annotations

import httpx
import pytest

MODEL = "smollm2"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "temperature": 0}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0}


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


REFUSED = [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "Hello"}),
    ("web_search_options", {}),
    ("verbosity", "low"),
    ("bad_words", ["Hello"]),
    ("allowed_token_ids", [1, 2, 3]),
    ("logits_processors", ["my.module:Proc"]),
    ("use_beam_search", True),
    ("length_penalty", 0.5),
    ("guided_whitespace_pattern", " "),
    ("chat_template", "{{ messages }}"),
    ("spaces_between_special_tokens", False),
    ("return_tokens_as_token_ids", True),
    ("vllm_xargs", {"a": 1}),
    ("add_special_tokens", True),
]


@pytest.mark.parametrize("field,value", REFUSED)
def test_chat_fields_that_change_the_output_are_refused(shoal_server, field, value) -> None:
    r = _post(shoal_server, "/v1/chat/completions", {**CHAT, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("field,value", [("bad_words", ["x"]), ("use_beam_search", True),
                                         ("best_of", 3), ("suffix", "z")])
def test_completion_fields_that_change_the_output_are_refused(shoal_server, field, value) -> None:
    r = _post(shoal_server, "/v1/completions", {**COMPLETION, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("field,value", [
    ("metadata", {"k": "v"}), ("store", True), ("user", "u1"), ("service_tier", "auto"),
    ("prompt_cache_key", "k"), ("safety_identifier", "s"), ("cache_salt", "salt"),
    ("modalities", ["text"]), ("use_beam_search", False), ("length_penalty", 1.0),
    ("spaces_between_special_tokens", True), ("verbosity", "medium"),
])
def test_fields_that_change_nothing_are_accepted(shoal_server, field, value) -> None:
    assert _post(shoal_server, "/v1/chat/completions", {**CHAT, field: value}).status_code == 200


def test_truncate_prompt_tokens_keeps_the_last_tokens(shoal_server) -> None:
    body = {**COMPLETION, "prompt": "one two three four five six seven eight nine ten"}
    full = _post(shoal_server, "/v1/completions", body).json()["usage"]["prompt_tokens"]
    cut = _post(shoal_server, "/v1/completions", {**body, "truncate_prompt_tokens": 4}).json()
    assert full > 4 and cut["usage"]["prompt_tokens"] == 4
    chat = _post(shoal_server, "/v1/chat/completions", {**CHAT, "truncate_prompt_tokens": 3}).json()
    assert chat["usage"]["prompt_tokens"] == 3


def test_add_special_tokens_false_on_completions(shoal_server) -> None:
    # SmolLM2 adds no BOS, so both spellings tokenise the same; the field is honoured, not refused
    r = _post(shoal_server, "/v1/completions", {**COMPLETION, "add_special_tokens": False})
    assert r.status_code == 200


@pytest.mark.parametrize("options,option", [({"typical_p": 0.5}, "typical_p")])
def test_ollama_options_that_change_the_output_are_refused(shoal_server, options, option) -> None:
    r = _post(shoal_server, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False,
                                              "options": {"num_predict": 1, **options}})
    assert r.status_code == 400 and option in r.json()["error"], r.text


def test_ollama_options_that_change_nothing_are_accepted(shoal_server) -> None:
    options = {"num_predict": 1, "typical_p": 1.0, "num_thread": 2, "num_batch": 8, "mirostat": 0,
               "use_mmap": True}
    r = _post(shoal_server, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False,
                                              "options": options})
    assert r.status_code == 200, r.text
