"""The online engine: concurrent streams, typed events, cancellation, abort, typed errors,
and what other threads may read (limits, validation, stats)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from shoal import SamplingParams
from shoal.core.config import EngineConfig
from shoal.core.errors import ContextLengthExceededError, InvalidParameterError
from shoal.engine.async_engine import AsyncEngine
from shoal.engine.events import Scheduled, Update


@pytest.fixture(scope="module")
def engine(smollm2_path):
    engine = AsyncEngine.from_config(EngineConfig(model=str(smollm2_path), compute="fast",
                                                  kv_cache_bytes=64 << 20))
    yield engine
    engine.shutdown()


def _ids(engine: AsyncEngine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


async def _outputs(engine, request_id, ids, params):
    """The request's outputs, one by one, from its events."""
    async for event in engine.generate(request_id, ids, params):
        if isinstance(event, Update):
            for out in event.outputs:
                yield out


async def _collect(engine, request_id, ids, params):
    text, tokens, finals = "", [], []
    async for out in _outputs(engine, request_id, ids, params):
        text += out.text
        tokens += out.token_ids
        if out.finished:
            finals.append(out)
    return text, tokens, finals


def test_concurrent_streams_match_sequential_runs(engine):
    prompts = [f"Fact number {i} about the sea:" for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def run():
        sequential = [await _collect(engine, f"s{i}", _ids(engine, p), params)
                      for i, p in enumerate(prompts)]
        concurrent = await asyncio.gather(*[_collect(engine, f"c{i}", _ids(engine, p), params)
                                            for i, p in enumerate(prompts)])
        return sequential, concurrent

    sequential, concurrent = asyncio.run(run())
    for (s_text, s_tokens, s_final), (c_text, c_tokens, c_final) in zip(sequential, concurrent):
        assert s_tokens == c_tokens and s_text == c_text
        assert len(c_tokens) == 12
        assert c_final[0].finish_reason == "length"
        timings = c_final[0].timings
        assert timings.arrival <= timings.first_token <= timings.finished


def test_cancelling_a_stream_aborts_and_frees_its_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)

    async def run():
        received = 0
        async for _out in _outputs(engine, "long", _ids(engine, "Count to a million:"), params):
            received += 1
            if received == 3:
                break   # the client goes away
        # The abort is applied at the next engine step; wait briefly for it.
        deadline = time.monotonic() + 5
        while engine.core.has_unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return received

    assert asyncio.run(run()) == 3
    assert not engine.core.has_unfinished_requests()
    assert engine.core.scheduler.kv.num_used_blocks == 0


def test_explicit_abort_ends_the_stream_with_reason_abort(engine):
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)

    async def run():
        finals = []
        async for out in _outputs(engine, "to-abort", _ids(engine, "Once upon a time"), params):
            if len(out.token_ids) and not finals:
                engine.abort("to-abort")
            if out.finished:
                finals.append(out)
        return finals

    finals = asyncio.run(asyncio.wait_for(run(), 30))
    assert finals[-1].finish_reason == "abort"
    assert engine.core.scheduler.kv.num_used_blocks == 0


def test_errors_are_raised_before_anything_is_queued(engine):
    async def run():
        too_long = [1] * (engine.core.max_model_len + 1)
        with pytest.raises(ContextLengthExceededError):
            async for _ in engine.generate("bad", too_long, SamplingParams(max_tokens=1)):
                pass
    asyncio.run(run())
    assert not engine.core.has_unfinished_requests()


def test_events_say_scheduled_once_before_any_output(engine):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, n=2)

    async def run():
        return [event async for event in engine.generate("events", _ids(engine, "Hello"), params)]

    events = asyncio.run(run())
    assert isinstance(events[0], Scheduled)
    assert sum(isinstance(e, Scheduled) for e in events) == 1
    updates = [e for e in events[1:] if isinstance(e, Update)]
    assert len(updates) == len(events) - 1 and all(u.outputs for u in updates)
    outputs = [out for u in updates for out in u.outputs]
    assert sorted(out.index for out in outputs if out.finished) == [0, 1]
    assert outputs[-1].finished            # the iteration ends with the last sample's end


def test_limits_and_validation_are_readable_from_any_thread(engine):
    limits = engine.limits
    assert limits.max_model_len == engine.info.max_model_len
    assert limits.vocab_size == engine.info.model_config.vocab_size
    assert limits.max_num_seqs == engine.core.scheduler.config.max_num_seqs
    assert limits.kv_cache_tokens >= limits.max_model_len
    errors: dict[str, BaseException] = {}
    results: dict[str, int] = {}

    def check(name: str, ids: list[int], params: SamplingParams) -> None:
        try:
            results[name] = engine.validate(ids, params)
        except InvalidParameterError as exc:
            errors[name] = exc

    cases = {
        "room": ([5] * 10, SamplingParams(max_tokens=None)),
        "given": ([5] * 10, SamplingParams(max_tokens=7)),
        "empty": ([], SamplingParams()),
        "vocab": ([5, limits.vocab_size], SamplingParams()),
        "long": ([5] * limits.max_model_len, SamplingParams(max_tokens=None)),
        "too_many": ([5] * 10, SamplingParams(max_tokens=limits.max_model_len)),
    }
    threads = [threading.Thread(target=check, args=(name, *case)) for name, case in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"room": limits.max_model_len - 10, "given": 7}
    assert (errors["empty"].field, errors["empty"].message) == ("prompt", "the prompt is empty")
    assert errors["vocab"].field == "prompt"
    assert errors["vocab"].message == (f"token id {limits.vocab_size} is outside the vocabulary "
                                       f"(0..{limits.vocab_size - 1})")
    assert isinstance(errors["long"], ContextLengthExceededError) and errors["long"].field == "prompt"
    assert isinstance(errors["too_many"], ContextLengthExceededError)
    assert errors["too_many"].field == "max_tokens"


def test_stats_count_what_the_engine_did(engine):
    before = engine.stats()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = _ids(engine, "One two three")
    asyncio.run(_collect(engine, "counted", ids, params))
    after = engine.stats()
    assert after.generation_tokens - before.generation_tokens == 4
    assert after.prompt_tokens - before.prompt_tokens == len(ids)
    assert (after.running, after.waiting) == (0, 0)


def test_the_loaded_model_is_out_of_the_collectors_reach(engine):
    """A full collection walks every tracked object while holding the GIL (~100 ms in a server
    with a loaded model), stalling every stream; the engine freezes what its load left alive."""
    import gc

    model = engine.core.runner.model
    assert gc.get_freeze_count() > 0
    assert not any(obj is model for obj in gc.get_objects())   # frozen objects are not listed
    # and requests still run and finish as before
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    _text, tokens, finals = asyncio.run(_collect(engine, "after-freeze", _ids(engine, "Hello"), params))
    assert len(tokens) == 4 and len(finals) == 1
