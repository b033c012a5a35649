"""Thirty-odd schemas (tests/http/json_schema_cases.py) through a real `shoal serve` of the
default SmolLM2 model: every answer completes, parses and validates (formats included),
greedy and sampled, one request at a time and 16 at once.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from json_schema_cases import CASES

MODEL = "smollm2:135m"
# NOTE: generous: the schemas are bounded, so an answer that stops short of this is the norm;
# one that reaches it is a failure the test reports (finish_reason "length").
MAX_TOKENS = 320


def _ask(server_url: str, case: tuple[str, str, dict], temperature: float, seed: int) -> tuple[str, dict]:
    name, prompt, schema = case
    reply = httpx.post(server_url + "/v1/chat/completions", timeout=600, json={
        "model": MODEL, "max_tokens": MAX_TOKENS, "temperature": temperature, "seed": seed,
        "messages": [{"role": "system", "content": "You answer with JSON only."},
                     {"role": "user", "content": prompt}],
        "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}})
    assert reply.status_code == 200, (name, reply.text)
    return name, reply.json()["choices"][0]


def _check(name: str, choice: dict, schema: dict) -> None:
    content = choice["message"]["content"]
    assert choice["finish_reason"] == "stop", f"{name}: cut off at max_tokens: {content!r}"
    try:
        document = json.loads(content)
    except ValueError as exc:
        pytest.fail(f"{name}: not JSON ({exc}): {content!r}")
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = [e.message for e in validator.iter_errors(document)]
    assert not errors, f"{name}: {content!r} fails its schema: {errors}"


def test_the_cases_are_distinct_and_many() -> None:
    assert len(CASES) >= 30
    assert len({name for name, _, _ in CASES}) == len(CASES)
    for _, _, schema in CASES:
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize(("temperature", "concurrency"), [
    (0.0, 1), (1.0, 16),
    # the other two pairings differ from these only in batching; they run in the slow suite
    pytest.param(0.0, 16, marks=pytest.mark.slow), pytest.param(1.0, 1, marks=pytest.mark.slow)],
    ids=["greedy-alone", "sampled-16-at-once", "greedy-16-at-once", "sampled-alone"])
def test_every_answer_validates(shoal_server, temperature: float, concurrency: int) -> None:
    schemas = {name: schema for name, _, schema in CASES}
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda item: _ask(shoal_server.url, item[1], temperature, seed=item[0]),
                                enumerate(CASES)))
    assert len(answers) == len(CASES)
    for name, choice in answers:
        _check(name, choice, schemas[name])
