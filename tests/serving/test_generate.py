"""The generate service against a scripted engine: admission, the engine's events acted on
once, the stream a dialect reads, and every ticket given back exactly once."""
from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator

import pytest

from shoal.access.principal import KeyLimits, Principal, current_principal
from shoal.core.errors import (ContextLengthExceededError, InvalidParameterError, ServerBusyError,
                               ServerShuttingDownError)
from shoal.core.sampling_params import SamplingParams
from shoal.engine.events import EngineEvent, Scheduled, Update
from shoal.engine.limits import EngineLimits
from shoal.engine.outputs import RequestOutput
from shoal.serving.completion import collect
from shoal.serving.generate import GenerationService
from shoal.serving.metrics import ServerMetrics
from shoal.serving.request import GenerateRequest
from shoal.serving.served import ServedModel
from shoal.serving.settings import ServerSettings

MODEL = "scripted"


class ScriptedEngine:
    """What the service uses of an AsyncEngine; each request's events come from a queue the
    test fills."""

    def __init__(self, max_num_seqs: int = 1) -> None:
        self.limits = EngineLimits(max_model_len=64, max_num_seqs=max_num_seqs, vocab_size=100,
                                   kv_cache_tokens=64)
        self.scripts: dict[str, asyncio.Queue[EngineEvent | None]] = {}
        self.started: list[str] = []
        self.closed: list[str] = []      # generators closed before their request finished
        self.aborted: list[str] = []

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        return self.limits.validate(prompt_token_ids, params)

    def script(self, request_id: str) -> asyncio.Queue[EngineEvent | None]:
        return self.scripts.setdefault(request_id, asyncio.Queue())

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0, *, batch: bool = False,
                       batch_aging_s: float = 0.0) -> AsyncIterator[EngineEvent]:
        self.started.append(request_id)
        script = self.script(request_id)
        finished = False
        try:
            while (event := await script.get()) is not None:
                yield event
            finished = True
        finally:
            if not finished:
                self.closed.append(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        script = self.script(request_id)
        script.put_nowait(Update([output(request_id, "", finished=True, reason="abort")]))
        script.put_nowait(None)


class Residency:
    """Counts the holds the service's tickets take on models."""

    def __init__(self) -> None:
        self.holds = 0

    def retain(self, model: ServedModel) -> None:
        self.holds += 1

    def release(self, model: ServedModel, keep_alive: float | None = None) -> None:
        self.holds -= 1


def output(request_id: str, text: str, *, index: int = 0, finished: bool = False,
           reason: str | None = None) -> RequestOutput:
    return RequestOutput(request_id=request_id, index=index, text=text,
                         token_ids=[1] if text else [], finished=finished, finish_reason=reason,
                         num_prompt_tokens=3, produced_at=time.monotonic())


def setup(**settings: object) -> tuple[GenerationService, ScriptedEngine, Residency, ServedModel]:
    engine = ScriptedEngine()
    residency = Residency()
    model = ServedModel(name=MODEL, engine=engine, info=None)  # type: ignore[arg-type]
    service = GenerationService(residency, ServerMetrics(lambda: []),  # type: ignore[arg-type]
                                ServerSettings(memory_budget=1, **settings))  # type: ignore[arg-type]
    return service, engine, residency, model


def request(model: ServedModel, request_id: str, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(model=model, prompt_token_ids=[1, 2, 3], request_id=request_id,
                           params=SamplingParams(max_tokens=max_tokens))


def counter(service: GenerationService, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, {"model_name": MODEL, **labels})
    return value or 0.0


def test_scheduled_ends_the_wait_and_updates_come_merged() -> None:
    service, engine, residency, model = setup()

    async def run() -> list[list[RequestOutput]]:
        stream = service.start(request(model, "r1"))
        script = engine.script("r1")
        script.put_nowait(Scheduled())
        await asyncio.wait_for(stream.wait_scheduled(), 5)   # no output has come yet
        queue = service.admission.queue(MODEL)
        assert (queue.running, queue.waiting["interactive"]) == (1, 0)
        # a reader that fell behind gets one update per sample
        script.put_nowait(Update([output("r1", "a"), output("r1", "b")]))
        script.put_nowait(Update([output("r1", "c", finished=True, reason="stop")]))
        script.put_nowait(None)
        return [batch async for batch in stream]

    batches = asyncio.run(run())
    assert [[out.text for out in batch] for batch in batches] == [["ab"], ["c"]]
    assert batches[0][0].token_ids == [1, 1]
    assert service.num_in_flight() == 0 and residency.holds == 0
    assert counter(service, "shoal:request_success_total", finished_reason="stop") == 1
    assert engine.closed == []


def test_an_update_that_ends_the_wait_is_the_first_read() -> None:
    """A request that ends while still queued gets no Scheduled: its final update ends the
    wait and is not lost."""
    service, engine, residency, model = setup()

    async def run() -> list[list[RequestOutput]]:
        stream = service.start(request(model, "r1"))
        script = engine.script("r1")
        script.put_nowait(Update([output("r1", "", finished=True, reason="abort")]))
        script.put_nowait(None)
        await asyncio.wait_for(stream.wait_scheduled(), 5)
        return [batch async for batch in stream]

    batches = asyncio.run(run())
    assert [[out.finish_reason for out in batch] for batch in batches] == [["abort"]]
    assert service.num_in_flight() == 0 and residency.holds == 0


def test_a_request_waiting_past_the_queue_timeout_is_refused_and_aborted() -> None:
    service, engine, residency, model = setup(queue_timeout=0.05)

    async def run() -> None:
        stream = service.start(request(model, "r1"))
        with pytest.raises(ServerBusyError) as refused:
            await asyncio.wait_for(stream.wait_scheduled(), 5)
        assert refused.value.reason == "queue_timeout" and "SHOAL_QUEUE_TIMEOUT" in str(refused.value)

    asyncio.run(run())
    assert engine.closed == ["r1"]           # the engine's generator closed: the engine aborts it
    assert service.num_in_flight() == 0 and residency.holds == 0
    assert counter(service, "shoal:requests_rejected_total", reason="queue_timeout") == 1


def test_the_drain_refuses_a_request_it_aborted_while_queued() -> None:
    service, engine, residency, model = setup()

    async def run() -> None:
        stream = service.start(request(model, "r1"))
        waiting = asyncio.ensure_future(stream.wait_scheduled())
        await asyncio.sleep(0.01)
        service.abort_all()
        with pytest.raises(ServerShuttingDownError):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(run())
    assert engine.aborted == ["r1"]
    assert service.num_in_flight() == 0 and residency.holds == 0


def test_a_request_the_engine_refuses_takes_nothing() -> None:
    service, engine, residency, model = setup()
    with pytest.raises(ContextLengthExceededError) as refused:
        service.start(request(model, "long", max_tokens=62))
    assert refused.value.field == "max_tokens"
    assert service.num_in_flight() == 0 and residency.holds == 0 and engine.started == []


def test_several_prompts_are_admitted_all_or_none() -> None:
    service, engine, residency, model = setup(max_queue=1)     # one running slot, one queued
    first = service.start(request(model, "first"))              # takes the running slot
    with pytest.raises(ServerBusyError) as refused:
        service.start_all([request(model, "p0"), request(model, "p1")])
    assert refused.value.reason == "queue_full"
    assert service.num_in_flight() == 1 and residency.holds == 1
    assert counter(service, "shoal:requests_rejected_total", reason="queue_full") == 1
    # the queue place the first prompt held is free again
    stream = service.start(request(model, "alone"))
    assert service.num_in_flight() == 2 and residency.holds == 2
    del stream, first
    gc.collect()
    assert service.num_in_flight() == 0 and residency.holds == 0


def test_more_prompts_than_could_ever_be_admitted_are_a_400() -> None:
    # issue 13: 100,000 prompts got a 503 (retry later) that could never succeed
    service, engine, residency, model = setup(max_queue=2)     # one running slot, two queued
    service.start_all([request(model, f"p{i}") for i in range(3)])
    for count in (4, 100_000):
        with pytest.raises(InvalidParameterError) as refused:
            service.start_all([request(model, f"q{i}") for i in range(count)])
        assert refused.value.field == "prompt"
        assert f"{count} prompts in one request are more than this server can take at once (3: " \
               "the model runs 1 at once and SHOAL_MAX_QUEUE lets 2 more wait)" in refused.value.message
    token = current_principal.set(Principal(key_id="k", name="k", limits=KeyLimits(max_concurrent=2)))
    try:
        with pytest.raises(InvalidParameterError, match=r"\(2: the API key allows 2 concurrent requests\)"):
            service.check_prompt_count(model, 3)
    finally:
        current_principal.reset(token)
    gc.collect()


def test_a_stream_never_read_gives_its_ticket_back_when_collected() -> None:
    service, engine, residency, model = setup()
    stream = service.start(request(model, "r1"))
    assert service.num_in_flight() == 1 and residency.holds == 1
    del stream
    gc.collect()
    assert service.num_in_flight() == 0 and residency.holds == 0
    assert engine.started == []


def test_closing_a_stream_early_aborts_and_counts_an_abort() -> None:
    service, engine, residency, model = setup()

    async def run() -> None:
        stream = service.start(request(model, "r1"))
        script = engine.script("r1")
        script.put_nowait(Scheduled())
        script.put_nowait(Update([output("r1", "a")]))
        assert [out.text for out in await stream.__anext__()] == ["a"]
        await stream.aclose()

    asyncio.run(run())
    assert engine.closed == ["r1"]
    assert service.num_in_flight() == 0 and residency.holds == 0
    assert counter(service, "shoal:request_success_total", finished_reason="abort") == 1


def test_collect_gathers_samples_and_usage() -> None:
    service, engine, residency, model = setup()
    req = request(model, "r1")
    req.params = SamplingParams(max_tokens=8, n=2)

    async def run():
        stream = service.start(req)
        script = engine.script("r1")
        script.put_nowait(Scheduled())
        script.put_nowait(Update([output("r1", "x", index=1), output("r1", "a")]))
        script.put_nowait(Update([output("r1", "b", finished=True, reason="stop"),
                                  output("r1", "y", index=1, finished=True, reason="length")]))
        script.put_nowait(None)
        return await collect(req, stream)

    done = asyncio.run(run())
    assert [(s.text, s.finish_reason) for s in done.samples] == [("ab", "stop"), ("xy", "length")]
    assert (done.num_prompt_tokens, done.num_output_tokens) == (3, 4)
    assert done.last is not None and done.last.index == 1
    assert service.num_in_flight() == 0 and residency.holds == 0
