"""Priority classes in the scheduler: interactive before batch, aging, preemption order, and
batch invariance with mixed classes (fake runner, then a tiny real model)."""
from __future__ import annotations

import math
import random

import pytest

from fake_runner import Harness, make_request, reference_output
from shoal.engine.request import RequestStatus


class Clock:
    """A hand-driven monotonic clock: the scheduler's notion of "now" in these tests."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(length)]


def _admission_order(h: Harness) -> list[str]:
    return [r.request_id for out in h.outputs for r in out.first_scheduled]


def _run_ticking(h: Harness, clock: Clock, on_step=None, max_steps: int = 500) -> None:
    for step in range(max_steps):
        if not h.scheduler.has_unfinished_requests():
            return
        if on_step is not None:
            on_step(step)
        h.step()
        clock.now += 1.0
    raise AssertionError("the scheduler made no progress")


def test_interactive_requests_overtake_waiting_batch_requests() -> None:
    clock = Clock()
    h = Harness(max_num_seqs=1, clock=clock)
    h.add(make_request("first", _prompt(0, 5), max_tokens=3))
    h.step()
    # A batch request with the most important vLLM priority still waits behind interactive
    # ones; within a class, priority then arrival decide.
    h.add(make_request("batch_late", _prompt(1, 5), max_tokens=2, batch=True, batch_aging_s=1e6,
                       arrival_time=clock.now))
    h.add(make_request("batch_urgent", _prompt(2, 5), max_tokens=2, batch=True, batch_aging_s=1e6,
                       priority=-5, arrival_time=clock.now + 1))
    h.add(make_request("chat_low", _prompt(3, 5), max_tokens=2, priority=3, arrival_time=clock.now + 2))
    h.add(make_request("chat", _prompt(4, 5), max_tokens=2, arrival_time=clock.now + 3))
    _run_ticking(h, clock)
    assert _admission_order(h) == ["first", "chat", "chat_low", "batch_urgent", "batch_late"]


@pytest.mark.parametrize("aging", [10.0, math.inf])
def test_an_old_batch_request_is_not_starved_by_a_stream_of_interactive_ones(aging: float) -> None:
    clock = Clock(0.0)
    h = Harness(max_num_seqs=1, clock=clock)
    batch = h.add(make_request("batch", _prompt(1, 6), max_tokens=2, batch=True,
                               batch_aging_s=aging, arrival_time=0.0))
    scheduled_at: dict[str, float] = {}

    def arrive(step: int) -> None:
        # a new interactive request every step: always one waiting, newer than the batch one
        if step < 60:
            h.add(make_request(f"chat{step}", _prompt(100 + step, 6), max_tokens=2,
                               arrival_time=clock.now))
        for out in h.outputs[-1:]:
            for request in out.first_scheduled:
                scheduled_at.setdefault(request.request_id, clock.now - 1)

    _run_ticking(h, clock, arrive)
    order = _admission_order(h)
    if math.isinf(aging):
        assert order[-1] == "batch"          # without aging it runs only once the stream stops
    else:
        # it waited until its aging passed, then went first: it is older than every request
        # that arrived meanwhile
        assert 10.0 <= scheduled_at["batch"] <= 12.0
        assert order.index("batch") < 10
    assert batch.status is RequestStatus.FINISHED_LENGTH
    assert batch.output_token_ids == reference_output(batch.prompt_token_ids, 2)


def test_aged_batch_requests_get_a_share_not_precedence() -> None:
    """Sustained overload: a backlog of aged batch requests and one interactive arrival per
    step, one seat, one step per request. Aged batch requests take every fourth admission;
    interactive requests wait only behind each other, not behind the whole batch backlog."""
    from shoal.engine.request_queue import AGED_BATCH_TURN

    clock = Clock(0.0)
    h = Harness(max_num_seqs=1, clock=clock)
    for i in range(40):
        h.add(make_request(f"batch{i}", _prompt(i, 4), max_tokens=1, batch=True, batch_aging_s=5.0,
                           arrival_time=0.0))
    arrivals: dict[str, float] = {}

    def arrive(step: int) -> None:
        if step < 60:
            request_id = f"chat{step}"
            arrivals[request_id] = clock.now
            h.add(make_request(request_id, _prompt(1000 + step, 4), max_tokens=1, arrival_time=clock.now))

    scheduled_at: dict[str, float] = {}
    for step in range(200):
        if not h.scheduler.has_unfinished_requests():
            break
        arrive(step)
        h.step()
        for request in h.outputs[-1].first_scheduled:
            scheduled_at[request.request_id] = clock.now
        clock.now += 1.0
    order = _admission_order(h)
    assert len(order) == 100
    # while both kinds wait (after the batch requests aged), every 4th admission is batch
    window = [rid for rid in order if scheduled_at[rid] >= 5.0][:40]
    batch_share = sum(rid.startswith("batch") for rid in window) / len(window)
    assert abs(batch_share - 1 / AGED_BATCH_TURN) < 0.05, window
    # an interactive request waits for the interactive ones before it and its share of batch
    waits = [scheduled_at[rid] - arrivals[rid] for rid in order if rid.startswith("chat")]
    assert max(waits) <= 20, max(waits)        # precedence for aged batch would mean 40+


def test_an_interactive_prompt_does_not_wait_for_running_batch_prompts() -> None:
    clock = Clock()
    h = Harness(num_blocks=256, max_num_batched_tokens=64, clock=clock)
    batch = h.add(make_request("batch", _prompt(1, 400), max_tokens=4, batch=True, batch_aging_s=1e6,
                               arrival_time=clock.now))
    h.step()                                   # the batch prompt takes the whole first chunk
    assert batch.num_computed_tokens == 64
    chat = h.add(make_request("chat", _prompt(2, 8), max_tokens=4, arrival_time=clock.now))
    h.step()
    # admitted at once, beside the batch prompt's next (smaller) chunk
    assert [r.request_id for r in h.outputs[-1].first_scheduled] == ["chat"]
    assert chat.num_computed_tokens == 8 and batch.num_computed_tokens > 64
    _run_ticking(h, clock)
    for request in (batch, chat):
        assert request.output_token_ids == reference_output(request.prompt_token_ids, 4)


def test_streams_keep_decoding_while_an_earlier_prompt_is_computed() -> None:
    clock = Clock()
    h = Harness(num_blocks=256, max_num_batched_tokens=32, clock=clock)
    long = h.add(make_request("long", _prompt(1, 300), max_tokens=2, arrival_time=clock.now))
    h.step()
    chat = h.add(make_request("chat", _prompt(2, 4), max_tokens=6, arrival_time=clock.now))
    h.step()
    assert chat.num_computed_tokens == 4 and long.num_computed_tokens < 300
    # admitted after the long prompt, the stream still gets its token in every step
    while chat.num_output_tokens < 6:
        assert long.num_computed_tokens < 300, "the stream waited for the long prompt"
        before = chat.num_output_tokens
        h.step()
        assert chat.num_output_tokens == before + 1
    _run_ticking(h, clock)
    for request in (long, chat):
        assert request.output_token_ids == reference_output(request.prompt_token_ids, request.max_tokens)


def test_a_batch_request_is_preempted_before_an_interactive_one() -> None:
    clock = Clock()
    h = Harness(num_blocks=11, max_num_batched_tokens=64, clock=clock)   # 10 blocks of 4
    batch = h.add(make_request("batch", _prompt(1, 8), max_tokens=24, priority=-10, batch=True,
                               batch_aging_s=1e6, arrival_time=clock.now))
    h.step()
    chat = h.add(make_request("chat", _prompt(2, 8), max_tokens=24, priority=5, arrival_time=clock.now))
    _run_ticking(h, clock)
    assert batch.num_preemptions > 0 and chat.num_preemptions == 0
    for request in (batch, chat):
        assert request.output_token_ids == reference_output(request.prompt_token_ids, 24)


def test_an_aged_batch_request_is_no_longer_the_first_victim() -> None:
    clock = Clock()
    h = Harness(num_blocks=11, max_num_batched_tokens=64, clock=clock)
    old_batch = h.add(make_request("old_batch", _prompt(1, 8), max_tokens=24, batch=True,
                                   batch_aging_s=5.0, arrival_time=clock.now - 100))
    h.step()
    chat = h.add(make_request("chat", _prompt(2, 8), max_tokens=24, arrival_time=clock.now))
    _run_ticking(h, clock)
    # it competes as interactive and is older, so the newer interactive request yields
    assert old_batch.num_preemptions == 0 and chat.num_preemptions > 0


def test_batch_requests_give_their_seats_to_interactive_ones() -> None:
    clock = Clock()
    h = Harness(max_num_seqs=2, clock=clock)
    older = h.add(make_request("batch_old", _prompt(1, 6), max_tokens=20, batch=True, batch_aging_s=1e6,
                               arrival_time=clock.now))
    newer = h.add(make_request("batch_new", _prompt(2, 6), max_tokens=20, batch=True, batch_aging_s=1e6,
                               arrival_time=clock.now + 1))
    h.step()
    clock.now += 1.0
    chat = h.add(make_request("chat", _prompt(3, 6), max_tokens=4, arrival_time=clock.now))
    h.step()
    # the newest batch request yields its seat at once; the interactive one starts this step
    assert [r.request_id for r in h.outputs[-1].preempted] == ["batch_new"]
    assert [r.request_id for r in h.outputs[-1].first_scheduled] == ["chat"]
    assert older.status is RequestStatus.RUNNING
    _run_ticking(h, clock)
    assert older.num_preemptions == 0 and newer.num_preemptions == 1 and chat.num_preemptions == 0
    for request in (older, newer, chat):          # recompute loses nothing
        assert request.output_token_ids == reference_output(request.prompt_token_ids, request.max_tokens)


def test_a_batch_request_gives_up_its_seat_at_most_once() -> None:
    clock = Clock()
    h = Harness(max_num_seqs=1, clock=clock)
    batch = h.add(make_request("batch", _prompt(1, 6), max_tokens=12, batch=True, batch_aging_s=1e6,
                               arrival_time=clock.now))
    h.step()
    h.add(make_request("chat1", _prompt(2, 6), max_tokens=2, arrival_time=clock.now))
    h.step()
    assert [r.request_id for r in h.outputs[-1].preempted] == ["batch"]
    # chat1 ends, the batch request is readmitted; a second interactive arrival must wait now
    while batch.status is not RequestStatus.RUNNING or batch.num_output_tokens == 0:
        h.step()
    chat2 = h.add(make_request("chat2", _prompt(3, 6), max_tokens=2, arrival_time=clock.now))
    _run_ticking(h, clock)
    assert batch.num_preemptions == 1 and chat2.num_preemptions == 0
    assert sum(len(out.preempted) for out in h.outputs) == 1
    assert _admission_order(h)[-1] == "chat2"
    assert batch.output_token_ids == reference_output(batch.prompt_token_ids, 12)


def test_interactive_requests_never_give_up_their_seats() -> None:
    clock = Clock()
    h = Harness(max_num_seqs=1, clock=clock)
    first = h.add(make_request("chat1", _prompt(1, 6), max_tokens=8, arrival_time=clock.now))
    h.step()
    h.add(make_request("chat2", _prompt(2, 6), max_tokens=4, priority=-10, arrival_time=clock.now))
    _run_ticking(h, clock)
    assert not any(out.preempted for out in h.outputs) and first.num_preemptions == 0
    assert _admission_order(h) == ["chat1", "chat2"]


def test_mixed_classes_under_memory_pressure_match_solo_runs() -> None:
    preempted = 0
    for seed in range(60):
        rng = random.Random(seed)
        clock = Clock(0.0)
        h = Harness(num_blocks=rng.randint(8, 16), vocab_size=40, max_model_len=40,
                    max_num_batched_tokens=rng.randint(6, 24), max_num_seqs=rng.randint(1, 5),
                    clock=clock)
        added = []
        for i in range(rng.randint(4, 12)):
            length = rng.randint(1, 20)
            max_tokens = max(1, min(rng.randint(1, 20), 40 - length, (h.kv.num_blocks - 1) * 4 - length))
            added.append(h.add(make_request(
                f"r{i}", _prompt(seed * 100 + i, length), max_tokens=max_tokens,
                priority=rng.randint(0, 2), batch=rng.random() < 0.5,
                batch_aging_s=rng.choice([0.0, 3.0, 8.0, math.inf]), arrival_time=clock.now,
                eos_token_ids=frozenset({0}))))
            for _ in range(rng.randint(0, 2)):
                h.step()
                clock.now += 1.0
        _run_ticking(h, clock, max_steps=3000)
        preempted += h.scheduler.num_preemptions_total > 0
        assert h.kv.num_used_blocks == 0
        for request in added:
            expected = reference_output(request.prompt_token_ids, request.max_tokens, 40, frozenset({0}), 40)
            assert request.output_token_ids == expected, (seed, request.request_id)
    assert preempted >= 10


# -- the real engine, on a tiny model ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_core(tiny_llama_gguf):
    from shoal.core.config import EngineConfig
    from shoal.engine.builder import build_engine_core

    core, _ = build_engine_core(EngineConfig(model=str(tiny_llama_gguf), compute="exact",
                                             kv_cache_bytes=4 << 20, max_num_seqs=3,
                                             max_num_batched_tokens=32,
                                             max_batched_tokens_while_decoding=32))
    return core


def _drain(core) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    while core.has_unfinished_requests():
        for out in core.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    assert core.scheduler.kv.num_used_blocks == 0
    return outputs


def test_greedy_outputs_do_not_depend_on_class_or_order(tiny_core) -> None:
    from shoal import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, tiny_core.vocab_size) for _ in range(rng.randint(3, 40))]
               for _ in range(8)]
    alone = {}
    for i, ids in enumerate(prompts):
        tiny_core.add_request(f"r{i}", ids, params)
        alone.update(_drain(tiny_core))
    first_scheduled: list[list[str]] = []
    tiny_core.on_first_scheduled = first_scheduled.append
    try:
        for i, ids in enumerate(prompts):
            # batch requests first, so that interactive ones overtake them in the queue
            is_batch = i < 4
            tiny_core.add_request(f"r{i}", ids, params, priority=i % 3, batch=is_batch,
                                  batch_aging_s=math.inf if is_batch else 0.0)
        together = _drain(tiny_core)
    finally:
        tiny_core.on_first_scheduled = None
    assert together == alone
    order = [request_id for ids in first_scheduled for request_id in ids]
    assert sorted(order) == sorted(alone)
    assert set(order[:3]) <= {"r4", "r5", "r6", "r7"}     # three slots: interactive first
    assert set(order[-4:]) == {"r0", "r1", "r2", "r3"}
