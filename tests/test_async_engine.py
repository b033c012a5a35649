"""The online engine: concurrent streams, cancellation, abort, typed errors."""
from __future__ import annotations

import asyncio
import time

import pytest

from shoal import SamplingParams
from shoal.config import EngineConfig
from shoal.engine.async_engine import AsyncEngine
from shoal.errors import ContextLengthExceededError


@pytest.fixture(scope="module")
def engine(smollm2_path):
    engine = AsyncEngine.from_config(EngineConfig(model=str(smollm2_path), compute="fast",
                                                  kv_cache_bytes=64 << 20))
    yield engine
    engine.shutdown()


def _ids(engine: AsyncEngine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


async def _collect(engine, request_id, ids, params):
    text, tokens, finals = "", [], []
    async for out in engine.generate(request_id, ids, params):
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
        async for _out in engine.generate("long", _ids(engine, "Count to a million:"), params):
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
        async for out in engine.generate("to-abort", _ids(engine, "Once upon a time"), params):
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
