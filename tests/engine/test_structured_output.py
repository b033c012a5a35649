"""Constrained decoding on the real SmolLM2 model: every output matches its constraint, in
batches mixed with free requests, with n > 1, seeds, preemption, the prefix cache, both
compute modes; and a grammar's compile never stalls the engine or hangs a request."""
from __future__ import annotations

import asyncio
import json
import time

import jsonschema
import pytest

from fake_runner import scheduler_config
from shoal import LLM, SamplingParams
from shoal.core.config import EngineConfig
from shoal.core.errors import InvalidParameterError
from shoal.core.structured_output import StructuredOutput
from shoal.engine.async_engine import AsyncEngine
from shoal.engine.core import EngineCore
from shoal.engine.events import Update
from shoal.engine.kv.manager import KVCacheManager
from shoal.engine.request import FinishReason
from shoal.engine.sampling.sampler import Sampler
from shoal.engine.scheduler import Scheduler
from shoal.engine.structured import compiler as compiler_module


def _text(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def _obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False}


_POINT = _obj({"x": {"type": "integer", "minimum": -99, "maximum": 99},
               "y": {"type": "integer", "minimum": -99, "maximum": 99}})

# NOTE: strings, arrays and numbers are bounded and extra properties closed: a 135M model
# given room to wander writes until max_tokens, and a cut-off document cannot parse.
SCHEMAS: dict[str, dict] = {
    "person": _obj({"name": _text(20), "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "enums": _obj({"color": {"enum": ["red", "green", "blue"]},
                   "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}}),
    "nested": _obj({"address": _obj({"street": _text(30), "city": _text(20),
                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
    "array bounds": _obj({"tags": {"type": "array", "items": _text(12), "minItems": 2, "maxItems": 4}}),
    "number ranges": _obj({"price": {"type": "number", "minimum": 0, "maximum": 1000},
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 10}}),
    "any of": _obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, _text(10)]}}),
    "refs": {"$defs": {"point": _POINT}, **_obj({"start": {"$ref": "#/$defs/point"},
                                                 "end": {"$ref": "#/$defs/point"}})},
    "nullable": _obj({"active": {"type": "boolean"},
                      "note": {"type": ["string", "null"], "maxLength": 20}}),
    "top-level array": {"type": "array", "minItems": 1, "maxItems": 3,
                        "items": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                       "done": {"type": "boolean"}})},
    "patterns and formats": _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                  "day": {"type": "string", "format": "date"}}),
    "optional fields": _obj({"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": _text(8)},
                            required=["a"]),
    "const": _obj({"kind": {"const": "event"}, "count": {"type": "integer", "minimum": 0, "maximum": 5}}),
    "deep": _obj({"a": _obj({"b": _obj({"c": {"type": "array", "maxItems": 3,
                                              "items": {"type": "integer", "minimum": 0, "maximum": 9}}})})}),
}


def _chat(llm: LLM, text: str) -> list[int]:
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return llm.tokenizer.encode(rendered, add_special_tokens=False)


def _prompt(llm: LLM, name: str) -> list[int]:
    return _chat(llm, f"Give an example {name} record as JSON.")


def _assert_valid(name: str, text: str, finish_reason) -> None:
    assert finish_reason == FinishReason.STOP, f"{name}: cut off: {text!r}"
    validator = jsonschema.Draft202012Validator(SCHEMAS[name], format_checker=jsonschema.FormatChecker())
    validator.validate(json.loads(text))


def _json(name: str, field: str = "response_format") -> StructuredOutput:
    return StructuredOutput.json_schema(SCHEMAS[name], field=field)


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    llm = LLM(str(smollm2_path), compute="fast", kv_cache_bytes=96 << 20, max_model_len=1024)
    yield llm
    llm.engine.close()


def _core(llm: LLM, *, num_blocks: int | None = None, enable_prefix_caching: bool = True,
          grammar_compile_timeout: float = 10.0) -> EngineCore:
    """A fresh EngineCore on the loaded model, with its own scheduler and grammar threads."""
    base = llm.engine
    scheduler = Scheduler(scheduler_config(llm.info.block_size, max_model_len=1024,
                                           max_num_batched_tokens=512),
                          KVCacheManager(num_blocks or llm.info.num_blocks, llm.info.block_size,
                                         enable_prefix_caching))
    return EngineCore(base.runner, scheduler, Sampler(), base.tokenizer, 1024, base.vocab_size,
                      base.eos_token_ids, cache_salt=base.cache_salt,
                      grammar_compile_timeout=grammar_compile_timeout)


def _run(core: EngineCore, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Runs requests r0, r1, ... to the end; returns each one's outputs, in order."""
    for i, (ids, params) in enumerate(requests):
        core.add_request(f"r{i}", ids, params)
    outputs: dict[str, list] = {f"r{i}": [] for i in range(len(requests))}
    while core.has_unfinished_requests():
        if not core.has_work_ready():
            core.structured.wait(0.1)
        for out in core.step():
            outputs[out.request_id].append(out)
    assert core.scheduler.kv.num_used_blocks == 0
    return outputs


def _final(outputs: list) -> tuple[str, list[int], object]:
    return ("".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids],
            outputs[-1].finish_reason)


def test_every_schema_validates_greedy_and_sampled_in_one_batch(llm):
    names = list(SCHEMAS)
    prompts = [_prompt(llm, name) for name in names]
    greedy = [SamplingParams(temperature=0, max_tokens=120, structured=_json(n)) for n in names]
    sampled = [SamplingParams(temperature=1.0, seed=7, max_tokens=120, structured=_json(n))
               for n in names]
    free = SamplingParams(temperature=0, max_tokens=12)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts * 2 + prompts[:2]],
                           greedy + sampled + [free, free])
    for name, result in zip(names * 2, results[:-2]):
        _assert_valid(name, result.outputs[0].text, result.outputs[0].finish_reason)
    for result in results[-2:]:      # free requests in the same batch run unconstrained
        assert len(result.outputs[0].token_ids) == 12


def test_eight_constrained_among_free_requests_match_their_solo_runs(llm):
    names = ["person", "nested", "refs", "top-level array", "patterns and formats", "deep",
             "enums", "number ranges"]
    constrained = [(_prompt(llm, name), SamplingParams(
        temperature=0 if i % 2 else 0.9, top_p=0.95, seed=100 + i, max_tokens=100,
        structured=_json(name))) for i, name in enumerate(names)]
    free = [(_chat(llm, f"Tell me about {topic}."), SamplingParams(temperature=0.8, seed=3, max_tokens=24))
            for topic in ("rivers", "owls", "glass", "maps")]
    mixed = constrained[:4] + free[:2] + constrained[4:] + free[2:]
    batched = _run(_core(llm), mixed)
    solo = [_final(_run(_core(llm), [request])["r0"]) for request in constrained]
    batched_constrained = [_final(batched[f"r{i}"]) for i in (0, 1, 2, 3, 6, 7, 8, 9)]
    for name, (text, tokens, reason), alone in zip(names, batched_constrained, solo):
        _assert_valid(name, text, reason)
        assert (text, tokens) == alone[:2], f"{name}: batched output differs from its solo run"
    for i in (4, 5, 10, 11):
        assert len(_final(batched[f"r{i}"])[1]) == 24


def test_regex_gives_only_digits(llm):
    params = [SamplingParams(temperature=t, seed=1, max_tokens=10,
                             structured=StructuredOutput.regex("[0-9]+")) for t in (0, 1.2)]
    for result in llm.chat([[{"role": "user", "content": "Tell me a story."}]] * 2, params):
        text = result.outputs[0].text
        assert text and text.isdigit() and text.isascii(), text


def test_choice_gives_one_of_the_choices_for_each_of_n_samples(llm):
    choices = ["red", "green", "blue", "light yellow"]
    params = SamplingParams(n=6, temperature=1.5, seed=11, max_tokens=10,
                            structured=StructuredOutput.choice(choices))
    result = llm.chat([{"role": "user", "content": "Pick a colour."}], params)[0]
    assert len(result.outputs) == 6
    for sample in result.outputs:
        assert sample.text in choices and sample.finish_reason == FinishReason.STOP


def test_eos_comes_only_where_the_grammar_is_complete(llm):
    ask = [{"role": "user", "content": "Say hello."}]
    letters = llm.chat(ask, SamplingParams(temperature=0, max_tokens=30,
                                           structured=StructuredOutput.regex("[a-z]{6}")))[0]
    assert len(letters.outputs[0].text) == 6 and letters.outputs[0].text.isalpha()
    assert letters.outputs[0].finish_reason == FinishReason.STOP
    # ignore_eos cannot run a request past the end of its grammar
    ignoring = llm.chat(ask, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                            structured=StructuredOutput.choice(["yes", "no"])))[0]
    assert ignoring.outputs[0].text in ("yes", "no")
    assert ignoring.outputs[0].finish_reason == FinishReason.STOP
    # min_tokens bans EOS where the grammar allows nothing else: the request still ends there
    short = llm.chat(ask, SamplingParams(temperature=0, max_tokens=30, min_tokens=8,
                                         structured=StructuredOutput.choice(["yes", "no"])))[0]
    assert short.outputs[0].text in ("yes", "no")
    assert short.outputs[0].finish_reason == FinishReason.STOP


def test_stop_strings_still_end_a_constrained_request(llm):
    result = llm.chat([{"role": "user", "content": "A person as JSON."}],
                      SamplingParams(temperature=0, max_tokens=60, stop=[","],
                                     structured=_json("person")))[0].outputs[0]
    assert result.stop_reason == "," and result.text.startswith('{"name": ')
    assert "," not in result.text


def test_outputs_survive_preemption_and_the_prefix_cache(llm):
    names = ["person", "nested", "refs", "top-level array", "deep", "patterns and formats"]
    requests = [(_prompt(llm, name), SamplingParams(temperature=0.7, seed=50 + i, max_tokens=80,
                                                     structured=_json(name)))
                for i, name in enumerate(names)]
    roomy = _core(llm)
    first = [_final(out) for out in _run(roomy, requests).values()]
    hits = roomy.scheduler.kv.prefix_cache_hits
    again = [_final(out) for out in _run(roomy, requests).values()]
    assert roomy.scheduler.kv.prefix_cache_hits > hits        # the rerun read cached prompts
    tiny = _core(llm, num_blocks=12)                          # 12 x 16 tokens hold one or two
    preempted = [_final(out) for out in _run(tiny, requests).values()]
    assert tiny.scheduler.num_preemptions_total > 0
    for name, result in zip(names, first):
        _assert_valid(name, *[result[0], result[2]])
    assert [r[:2] for r in again] == [r[:2] for r in first]
    assert [r[:2] for r in preempted] == [r[:2] for r in first]


def test_exact_compute_mode(smollm2_path):
    exact = LLM(str(smollm2_path), compute="exact", kv_cache_bytes=32 << 20, max_model_len=512)
    try:
        names = ["person", "refs"]
        results = exact.generate([{"prompt_token_ids": _prompt(exact, n)} for n in names],
                                 [SamplingParams(temperature=0, max_tokens=80, structured=_json(n))
                                  for n in names])
        for name, result in zip(names, results):
            _assert_valid(name, result.outputs[0].text, result.outputs[0].finish_reason)
    finally:
        exact.engine.close()


def test_bad_constraints_are_refused_before_anything_runs(llm):
    for structured in (StructuredOutput.json_schema({"type": "objectx"}, field="response_format"),
                       StructuredOutput.regex("[0-9", field="guided_regex"),
                       StructuredOutput.grammar("start: nowhere", field="guided_grammar")):
        with pytest.raises(InvalidParameterError) as info:
            llm.generate("Hi", SamplingParams(max_tokens=4, structured=structured))
        assert info.value.field == structured.field
    assert not llm.engine.has_unfinished_requests()


def _slow_compiles(monkeypatch, seconds: float) -> None:
    real = compiler_module.grammar_text

    def slow(structured):
        time.sleep(seconds)
        return real(structured)

    monkeypatch.setattr(compiler_module, "grammar_text", slow)


def test_a_slow_compile_does_not_stall_other_requests(llm, monkeypatch):
    _slow_compiles(monkeypatch, 3.0)
    core = _core(llm)
    core.add_request("free", _chat(llm, "Tell me about bees."),
                     SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))
    core.add_request("json", _prompt(llm, "person"),
                     SamplingParams(temperature=0, max_tokens=60, structured=_json("person")))
    free_tokens_while_compiling = 0
    longest_step = 0.0
    outputs: dict[str, list] = {"free": [], "json": []}
    while core.has_unfinished_requests():
        compiling = core.structured.num_held > 0
        started = time.monotonic()
        for out in core.step():
            outputs[out.request_id].append(out)
            if compiling and out.request_id == "free":
                free_tokens_while_compiling += 1
        longest_step = max(longest_step, time.monotonic() - started)
    assert free_tokens_while_compiling >= 3
    assert longest_step < 2.0          # no step waited for the 3 s compile
    text, _, reason = _final(outputs["json"])
    _assert_valid("person", text, reason)


def test_compile_failures_and_timeouts_refuse_the_request_and_the_engine_serves_on(llm, monkeypatch):
    core = _core(llm, grammar_compile_timeout=0.5)
    failures: list[tuple[str, BaseException]] = []
    core.on_request_failed = lambda request_id, error: failures.append((request_id, error))
    # a constraint that reaches the engine unchecked fails in the compile thread
    core.add_request("bad", _chat(llm, "Hi"), SamplingParams(
        max_tokens=5, structured=StructuredOutput.regex("(unclosed", field="guided_regex")))
    outputs = _run(core, [(_chat(llm, "Hi there"), SamplingParams(temperature=0, max_tokens=5))])
    assert len(_final(outputs["r0"])[1]) == 5
    assert [(rid, type(e), e.field) for rid, e in failures] == [("bad", InvalidParameterError, "guided_regex")]
    _slow_compiles(monkeypatch, 3.0)
    failures.clear()
    core.add_request("slow", _chat(llm, "Hi"), SamplingParams(
        max_tokens=5, structured=StructuredOutput.regex("[0-9]{3}", field="guided_regex")))
    outputs = _run(core, [(_chat(llm, "Hello"), SamplingParams(temperature=0, max_tokens=5))])
    assert len(_final(outputs["r0"])[1]) == 5
    assert [rid for rid, _ in failures] == ["slow"]
    assert failures[0][1].field == "guided_regex" and "did not compile within 0.5 s" in str(failures[0][1])
    assert core.num_waiting == 0 and not core.has_unfinished_requests()


def test_async_engine_validates_refuses_and_serves_constrained_requests(smollm2_path, monkeypatch):
    engine = AsyncEngine(EngineConfig(model=str(smollm2_path), kv_cache_bytes=32 << 20,
                                      max_model_len=512, num_threads=1))

    async def run(request_id: str, params: SamplingParams) -> str:
        ids = _chat_ids(engine, "Give an example person record as JSON.")
        text = ""
        async for event in engine.generate(request_id, ids, params):
            if isinstance(event, Update):
                text += "".join(out.text for out in event.outputs)
        return text

    async def scenario() -> None:
        with pytest.raises(InvalidParameterError) as info:
            engine.validate([1, 2, 3], SamplingParams(structured=StructuredOutput.json_schema(
                {"type": "nope"}, field="format")))
        assert info.value.field == "format"
        # unchecked, the same mistake comes back from the engine as the request's error
        with pytest.raises(InvalidParameterError):
            await run("bad", SamplingParams(structured=StructuredOutput.json_schema({"type": "nope"})))
        greedy = SamplingParams(temperature=0, max_tokens=60, structured=_json("person"))
        texts = await asyncio.gather(run("a", greedy), run("b", greedy),
                                     run("free", SamplingParams(temperature=0, max_tokens=8)))
        _assert_valid("person", texts[0], FinishReason.STOP)
        assert texts[1] == texts[0]
        # a caller that leaves while its grammar compiles takes its request with it
        _slow_compiles(monkeypatch, 1.0)
        task = asyncio.ensure_future(run("leaving", SamplingParams(
            max_tokens=5, structured=StructuredOutput.regex("[a-c]{2}"))))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            await asyncio.sleep(0.1)
            if engine.stats().waiting == 0 and not engine.core.has_unfinished_requests():
                break
        assert engine.stats().waiting == 0

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()


def _chat_ids(engine: AsyncEngine, text: str) -> list[int]:
    rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return engine.tokenizer.encode(rendered, add_special_tokens=False)
