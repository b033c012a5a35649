"""Scheduler: continuous batching, chunked prefill, prefix caching, preemption, aborts.

Every run goes through the fake runner, which checks each request reads exactly its own
KV through its block table; outputs are compared with the fake model run directly.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_runner import Harness, make_request, reference_output, scheduler_config
from shoal.core.config import EngineConfig
from shoal.core.errors import ContextLengthExceededError, InvalidParameterError
from shoal.core.sampling_params import SamplingParams
from shoal.engine.request import RequestStatus
from shoal.engine.scheduler import SchedulerConfig


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(length)]


def _assert_matches_reference(request, vocab_size: int = 1000) -> None:
    expected = reference_output(request.prompt_token_ids, request.max_tokens, vocab_size,
                                request.eos_token_ids)
    assert request.output_token_ids == expected, request.request_id


def _steps_scheduling(harness: Harness, request) -> list[int]:
    return [i for i, out in enumerate(harness.outputs) if any(s.request is request for s in out.scheduled)]


# -- batching and budgets ------------------------------------------------------------------

def test_continuous_batching_admits_requests_mid_run():
    h = Harness(max_num_batched_tokens=64)
    first = h.add(make_request("first", _prompt(1, 20), max_tokens=12))
    for _ in range(4):
        h.step()
    assert first.num_output_tokens == 4
    second = h.add(make_request("second", _prompt(2, 9), max_tokens=5))
    out = h.step()
    assert {s.request.request_id for s in out.scheduled} == {"first", "second"}
    h.run()
    assert first.status is second.status is RequestStatus.FINISHED_LENGTH
    _assert_matches_reference(first)
    _assert_matches_reference(second)
    assert h.kv.num_used_blocks == 0


def test_token_budget_and_max_num_seqs_are_never_exceeded():
    h = Harness(num_blocks=200, max_num_batched_tokens=24, max_num_seqs=3)
    requests = [h.add(make_request(f"r{i}", _prompt(i, 5 + 7 * i), max_tokens=6)) for i in range(8)]
    h.run()   # the harness asserts both limits after every schedule()
    assert max(out.num_batched_tokens for out in h.outputs) == 24
    assert max(len(out.scheduled) for out in h.outputs) <= 3
    for request in requests:
        _assert_matches_reference(request)


def test_chunked_prefill_splits_a_long_prompt_while_decodes_keep_running():
    h = Harness(num_blocks=200, max_num_batched_tokens=16)
    decodes = [h.add(make_request(f"d{i}", _prompt(i, 6), max_tokens=30)) for i in range(2)]
    h.step()                                                   # both prompts in one step
    long = h.add(make_request("long", _prompt(9, 100), max_tokens=3))
    chunks = []
    while long.num_output_tokens == 0:
        out = h.step()
        per_request = {s.request.request_id: s for s in out.scheduled}
        assert per_request["d0"].num_new_tokens == per_request["d1"].num_new_tokens == 1
        chunk = per_request["long"]
        assert chunk.start_pos == sum(chunks)                 # contiguous chunks
        chunks.append(chunk.num_new_tokens)
    assert sum(chunks) == 100 and len(chunks) == 8            # 14 tokens a step
    assert all(c == 14 for c in chunks[:-1])
    h.run()
    for request in decodes + [long]:
        _assert_matches_reference(request)


def test_long_prefill_threshold_lets_new_prompts_share_the_budget():
    h = Harness(num_blocks=200, max_num_batched_tokens=32, long_prefill_token_threshold=8)
    a = h.add(make_request("a", _prompt(1, 40), max_tokens=2))
    b = h.add(make_request("b", _prompt(2, 40), max_tokens=2))
    out = h.step()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 8), ("b", 8)]
    h.run()
    _assert_matches_reference(a)
    _assert_matches_reference(b)


def test_without_chunked_prefill_a_prompt_waits_for_room_in_one_step():
    h = Harness(num_blocks=200, max_num_batched_tokens=40, max_model_len=40,
                enable_chunked_prefill=False)
    small = h.add(make_request("small", _prompt(1, 10), max_tokens=20))
    h.step()
    big = h.add(make_request("big", _prompt(2, 40), max_tokens=1))   # needs 40 > 40 - 1
    out = h.step()
    assert [s.request for s in out.scheduled] == [small]
    h.run()
    (big_step,) = _steps_scheduling(h, big)
    assert h.outputs[big_step].scheduled[-1].num_new_tokens == 40    # all at once
    assert h.outputs[big_step].num_batched_tokens <= 40
    _assert_matches_reference(big)
    with pytest.raises(InvalidParameterError):
        scheduler_config(max_model_len=100, max_num_batched_tokens=50, enable_chunked_prefill=False)


def test_the_scheduler_config_is_derived_from_the_engine_config():
    engine = EngineConfig(max_num_seqs=7, max_num_batched_tokens=96, block_size=8,
                          max_batched_tokens_while_decoding=24, long_prefill_token_threshold=40)
    config = SchedulerConfig.from_engine_config(engine, max_model_len=200)
    assert (config.max_model_len, config.max_num_seqs, config.max_num_batched_tokens,
            config.block_size, config.enable_chunked_prefill, config.long_prefill_token_threshold,
            config.max_batched_tokens_while_decoding) == (200, 7, 96, 8, True, 40, 24)
    # the engine's defaults are the scheduler's: one set, in EngineConfig
    default = SchedulerConfig.from_engine_config(EngineConfig(), max_model_len=2048)
    assert (default.max_num_seqs, default.max_num_batched_tokens,
            default.max_batched_tokens_while_decoding) == (64, 1024, 128)
    # without chunked prefill a whole prompt must fit one step
    whole = SchedulerConfig.from_engine_config(
        EngineConfig(max_num_batched_tokens=96, enable_chunked_prefill=False), max_model_len=200)
    assert whole.max_num_batched_tokens == 200 and not whole.enable_chunked_prefill


# -- prefix caching ------------------------------------------------------------------------

def test_shared_system_prompt_is_computed_once():
    h = Harness(num_blocks=200, max_num_batched_tokens=256)
    system = _prompt(7, 50)
    first = h.add(make_request("first", system + [1, 2, 3], max_tokens=4))
    h.run()
    computed_before = h.runner.tokens_computed
    second = h.add(make_request("second", system + [9, 8], max_tokens=4))
    h.run()
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 48                      # 12 full blocks of 4
    assert h.runner.tokens_computed - computed_before == 52 - 48 + 3
    assert h.kv.prefix_cache_hits == 48
    _assert_matches_reference(second)


def test_multi_turn_chat_reuses_the_first_turns_blocks():
    h = Harness(num_blocks=200)
    turn1 = h.add(make_request("turn1", _prompt(3, 21), max_tokens=10))
    h.run()
    history = turn1.prompt_token_ids + turn1.output_token_ids + [5, 6, 7]
    turn2 = h.add(make_request("turn2", history, max_tokens=5))
    h.run()
    # Turn 1 computed its prompt and all outputs but the last (never fed back): 30 tokens.
    assert turn2.num_cached_tokens == 28
    _assert_matches_reference(turn2)


def test_cache_hit_never_covers_the_last_token():
    h = Harness(num_blocks=200)
    prompt = _prompt(4, 32)                                    # 8 full blocks
    a = h.add(make_request("a", prompt, max_tokens=3))
    h.run()
    b = h.add(make_request("b", prompt, max_tokens=3))
    out = h.step()
    (entry,) = out.scheduled
    assert b.num_cached_tokens == 28 and entry.start_pos == 28 and entry.num_new_tokens == 4
    h.run()
    assert b.output_token_ids == a.output_token_ids


def test_n_siblings_wait_for_the_leader_and_reuse_its_prompt_blocks():
    h = Harness(num_blocks=200, max_num_batched_tokens=16)
    prompt = _prompt(5, 40)
    leader = h.add(make_request("g#0", prompt, max_tokens=4, group_id="g"))
    siblings = [h.add(make_request(f"g#{i}", prompt, max_tokens=4, group_id="g", group_leader=leader))
                for i in (1, 2)]
    h.run()
    leader_prefill_steps = [i for i in _steps_scheduling(h, leader)
                            if h.outputs[i].scheduled[0].start_pos < 40]
    for sibling in siblings:
        assert min(_steps_scheduling(h, sibling)) > max(leader_prefill_steps)
        assert sibling.num_cached_tokens == 36                 # all of the leader's full blocks
        assert sibling.output_token_ids == leader.output_token_ids
    assert h.runner.tokens_computed == 40 + 2 * 4 + 3 * 3      # prompt once, 4 tail tokens each


def test_lru_keeps_cached_blocks_until_the_pool_needs_them():
    h = Harness(num_blocks=21, max_num_batched_tokens=256)    # 20 usable blocks of 4
    system = _prompt(8, 32)
    h.add(make_request("a", system + [1], max_tokens=2))
    h.run()
    h.add(make_request("other", _prompt(9, 30), max_tokens=2))   # fits the untouched blocks
    h.run()
    c = h.add(make_request("c", system + [2], max_tokens=2))
    h.run()
    assert c.num_cached_tokens == 32
    h.add(make_request("big", _prompt(10, 78), max_tokens=2))    # needs all 20 blocks
    h.run()
    d = h.add(make_request("d", system + [3], max_tokens=2))
    h.run()
    assert d.num_cached_tokens == 0
    _assert_matches_reference(d)


# -- preemption and priority ---------------------------------------------------------------

def test_preemption_under_a_tiny_pool_reproduces_solo_outputs():
    h = Harness(num_blocks=17, max_num_batched_tokens=32)     # 16 blocks: 64 tokens of KV
    requests = [h.add(make_request(f"r{i}", _prompt(i, 10 + 3 * i), max_tokens=24)) for i in range(6)]
    h.run()
    assert h.scheduler.num_preemptions_total > 0
    assert sum(r.num_preemptions for r in requests) == h.scheduler.num_preemptions_total
    for request in requests:
        assert request.status is RequestStatus.FINISHED_LENGTH
        _assert_matches_reference(request)
    assert h.kv.num_used_blocks == 0


def test_preemption_with_mixed_priorities_never_reads_unwritten_kv():
    # The victim is chosen by priority, so it may be a request already scheduled in the
    # same step; the blocks it registered for that step must not be found later.
    h = Harness(num_blocks=13, max_num_batched_tokens=12)
    requests = [h.add(make_request(f"r{i}", _prompt(20 + i, 7 + 2 * i), max_tokens=18,
                                   priority=(i * 7) % 3)) for i in range(6)]
    h.run()
    assert h.scheduler.num_preemptions_total > 0
    for request in requests:
        _assert_matches_reference(request)
    assert h.kv.num_used_blocks == 0


def test_a_victim_scheduled_earlier_in_the_step_leaves_no_unwritten_blocks_cached():
    # 7 usable blocks of 4. `victim` (priority 1) runs ahead of `keeper` (priority 0).
    # In step 3 the victim's last prompt chunk allocates and registers 2 blocks, then
    # `keeper` needs a block and the victim, already scheduled, is preempted. Neither
    # of those 2 blocks was written: on re-admission they must not count as cache hits.
    h = Harness(num_blocks=8, max_num_batched_tokens=16, long_prefill_token_threshold=8)
    victim = h.add(make_request("victim", _prompt(1, 24), max_tokens=1, priority=1))
    h.step()
    keeper = h.add(make_request("keeper", _prompt(2, 4), max_tokens=3, priority=0))
    h.step()
    out = h.step()
    assert out.preempted == [victim] and [s.request for s in out.scheduled] == [keeper]
    h.run()
    assert victim.num_preemptions == 1
    _assert_matches_reference(victim)
    _assert_matches_reference(keeper)


def test_waiting_queue_follows_priority_then_arrival():
    h = Harness(max_num_seqs=1)
    late_low = h.add(make_request("low", _prompt(1, 5), max_tokens=2, priority=5, arrival_time=1.0))
    high_b = h.add(make_request("high_b", _prompt(2, 5), max_tokens=2, priority=0, arrival_time=3.0))
    high_a = h.add(make_request("high_a", _prompt(3, 5), max_tokens=2, priority=0, arrival_time=2.0))
    h.run()
    order = sorted([late_low, high_b, high_a], key=lambda r: r.timings.scheduled)
    assert [r.request_id for r in order] == ["high_a", "high_b", "low"]


def test_the_lowest_priority_running_request_is_preempted_first():
    h = Harness(num_blocks=11, max_num_batched_tokens=64)     # 10 blocks of 4
    unimportant = h.add(make_request("unimportant", _prompt(1, 8), max_tokens=24, priority=1))
    h.step()
    important = h.add(make_request("important", _prompt(2, 8), max_tokens=24, priority=0))
    h.run()
    assert unimportant.num_preemptions > 0 and important.num_preemptions == 0
    _assert_matches_reference(unimportant)
    _assert_matches_reference(important)


# -- stop conditions, aborts, lifecycle ----------------------------------------------------

def test_stop_conditions():
    prompt = _prompt(6, 9)
    natural = reference_output(prompt, 12)
    eos = natural[2]
    first_eos = natural.index(eos)
    h = Harness(max_model_len=30)
    stopped = h.add(make_request("eos", prompt, max_tokens=12, eos_token_ids=frozenset({eos})))
    ignored = h.add(make_request("ignore", prompt, max_tokens=12, eos_token_ids=frozenset({eos}),
                                 sampling_params=SamplingParams(max_tokens=12, ignore_eos=True)))
    by_id = h.add(make_request("stop_id", prompt, max_tokens=12,
                               sampling_params=SamplingParams(max_tokens=12, stop_token_ids=[eos])))
    late = h.add(make_request("min", prompt, max_tokens=12, eos_token_ids=frozenset({eos}),
                              sampling_params=SamplingParams(max_tokens=12, min_tokens=first_eos + 2)))
    ctx = h.add(make_request("ctx", _prompt(7, 25), max_tokens=12))
    h.run()
    assert stopped.status is by_id.status is RequestStatus.FINISHED_STOPPED
    assert stopped.stop_reason == eos and stopped.output_token_ids == natural[:first_eos + 1]
    assert by_id.output_token_ids == stopped.output_token_ids
    assert ignored.status is RequestStatus.FINISHED_LENGTH and ignored.output_token_ids == natural
    later = [i for i, t in enumerate(natural) if t == eos and i >= first_eos + 1]
    assert late.output_token_ids == natural[:later[0] + 1] if later else natural
    assert ctx.status is RequestStatus.FINISHED_LENGTH and ctx.num_tokens == 30
    assert ctx.status.finish_reason == "length" and stopped.status.finish_reason == "stop"


def test_abort_frees_blocks_in_every_state():
    h = Harness(num_blocks=60, max_num_batched_tokens=16)
    decoding = h.add(make_request("decoding", _prompt(1, 10), max_tokens=50))
    h.step()
    prefilling = h.add(make_request("prefilling", _prompt(2, 60), max_tokens=5))
    h.step()
    assert 0 < prefilling.num_computed_tokens < 60
    waiting = h.add(make_request("waiting", _prompt(3, 10), max_tokens=5))
    used = h.kv.num_used_blocks
    held = len(h.kv.get_block_ids("prefilling"))
    assert held == -(-prefilling.num_computed_tokens // 4)
    aborted = h.scheduler.abort_requests(["prefilling", "nope"])
    assert aborted == [prefilling] and prefilling.status is RequestStatus.FINISHED_ABORTED
    assert h.kv.num_used_blocks == used - held
    assert h.scheduler.abort_requests(["waiting"]) == [waiting]
    assert h.scheduler.num_waiting == 0
    # Abort between schedule() and update_from_output(): the step's result is dropped.
    out = h.scheduler.schedule()
    assert [s.request for s in out.scheduled] == [decoding]
    h.scheduler.abort_requests(["decoding"])
    assert h.scheduler.update_from_output(out, h.runner.execute(out)) == []
    assert not h.scheduler.has_unfinished_requests() and h.kv.num_used_blocks == 0
    h.kv.check_integrity()
    assert h.scheduler.schedule().finished_request_ids == ["decoding"]


def test_finish_request_from_outside():
    h = Harness()
    request = h.add(make_request("r", _prompt(1, 10), max_tokens=50))
    h.step()
    h.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED, "</s>")
    assert request.stop_reason == "</s>" and h.scheduler.num_running == 0
    assert h.kv.num_used_blocks == 0
    with pytest.raises(InvalidParameterError):
        h.scheduler.finish_request(request, RequestStatus.RUNNING)


def test_timings_are_recorded_in_order():
    h = Harness(max_num_batched_tokens=8)
    request = h.add(make_request("r", _prompt(1, 20), max_tokens=3))
    h.run()
    t = request.timings
    assert t.arrival <= t.scheduled <= t.prefill_done <= t.first_token <= t.finished


def test_add_request_rejects_requests_that_can_never_run():
    h = Harness(num_blocks=11, max_model_len=64)              # 40 tokens of KV
    h.add(make_request("ok", _prompt(1, 10), max_tokens=31))   # needs 40 tokens of KV at most
    with pytest.raises(InvalidParameterError):
        h.add(make_request("ok", _prompt(2, 5)))              # duplicate id
    with pytest.raises(InvalidParameterError):
        h.add(make_request("huge", _prompt(3, 10), max_tokens=32))
    with pytest.raises(ContextLengthExceededError):
        h.add(make_request("long", _prompt(4, 65)))
    with pytest.raises(InvalidParameterError):
        h.add(make_request("empty", []))


# -- property ------------------------------------------------------------------------------

_add = st.tuples(st.just("add"), st.integers(1, 24), st.integers(1, 24), st.integers(0, 2),
                 st.booleans(), st.booleans())
_ops = st.lists(
    st.one_of(_add, _add, _add, st.tuples(st.just("step")), st.tuples(st.just("step")),
              st.tuples(st.just("abort"), st.integers(0, 50)),
              st.tuples(st.just("finish"), st.integers(0, 50))),
    min_size=10, max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, num_blocks=st.integers(6, 16), budget=st.integers(4, 24),
       max_num_seqs=st.integers(1, 6), chunked=st.booleans(), threshold=st.sampled_from([0, 5]))
def test_random_interleavings_drain_cleanly(ops, num_blocks, budget, max_num_seqs, chunked, threshold):
    max_model_len = 40 if chunked else budget
    h = Harness(num_blocks=num_blocks, vocab_size=40, max_model_len=max_model_len,
                max_num_batched_tokens=max(budget, max_model_len) if not chunked else budget,
                max_num_seqs=max_num_seqs, enable_chunked_prefill=chunked,
                long_prefill_token_threshold=threshold)
    eos = frozenset({0})
    pool_tokens = (num_blocks - 1) * 4
    shared = _prompt(99, 30)
    added, aborted, finished_by_hand = [], set(), set()
    for op in ops:
        if op[0] == "add":
            _, length, max_tokens, priority, share, sibling = op
            length = min(length, max_model_len, pool_tokens)
            prompt = shared[:length] if share else _prompt(len(added), length)
            leader = added[-1] if sibling and added and added[-1].prompt_token_ids == prompt else None
            # Fit the whole request in the pool; add_request would reject it otherwise.
            max_tokens = max(1, min(max_tokens, max_model_len - length, pool_tokens - length + 1))
            request = make_request(f"r{len(added)}", prompt, max_tokens=max_tokens, priority=priority,
                                   eos_token_ids=eos, group_leader=leader)
            h.add(request)
            added.append(request)
        elif op[0] == "step":
            h.step()
        elif added:
            request = added[op[1] % len(added)]
            if request.is_finished:
                continue
            if op[0] == "abort":
                h.scheduler.abort_requests([request.request_id])
                aborted.add(request.request_id)
            else:
                h.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED, "stop-string")
                finished_by_hand.add(request.request_id)
    h.run(max_steps=2000)
    assert h.kv.num_used_blocks == 0
    h.kv.check_integrity()
    for request in added:
        assert request.is_finished
        if request.request_id in aborted or request.request_id in finished_by_hand:
            continue
        expected = reference_output(request.prompt_token_ids, request.max_tokens, 40, eos, max_model_len)
        assert request.output_token_ids == expected
        if request.status is RequestStatus.FINISHED_STOPPED:
            assert request.stop_reason == 0
        else:
            assert request.status is RequestStatus.FINISHED_LENGTH


def _random_workload(seed: int) -> tuple[Harness, list, set[str]]:
    """A burst of random requests under a small pool, with random aborts and finishes."""
    rng = random.Random(seed)
    chunked = rng.random() < 0.7
    budget = rng.randint(4, 24)
    max_model_len = 40 if chunked else budget
    num_blocks = rng.randint(6, 16)
    h = Harness(num_blocks=num_blocks, vocab_size=40, max_model_len=max_model_len,
                max_num_batched_tokens=budget, max_num_seqs=rng.randint(2, 6),
                enable_chunked_prefill=chunked, long_prefill_token_threshold=rng.choice([0, 0, 5]))
    pool_tokens = (num_blocks - 1) * 4
    shared = _prompt(seed, 24)
    added, interrupted = [], set()
    for i in range(rng.randint(4, 14)):
        length = min(rng.randint(1, 24), max_model_len, pool_tokens)
        prompt = shared[:length] if rng.random() < 0.4 else _prompt(seed * 100 + i, length)
        max_tokens = max(1, min(rng.randint(1, 24), max_model_len - length, pool_tokens - length + 1))
        leader = added[-1] if added and added[-1].prompt_token_ids == prompt and rng.random() < 0.5 else None
        added.append(h.add(make_request(f"r{i}", prompt, max_tokens=max_tokens, priority=rng.randint(0, 2),
                                        eos_token_ids=frozenset({0}), group_leader=leader)))
        for _ in range(rng.randint(0, 2)):
            h.step()
        victim = rng.choice(added)
        if rng.random() < 0.1 and not victim.is_finished:
            if rng.random() < 0.5:
                h.scheduler.abort_requests([victim.request_id])
            else:
                h.scheduler.finish_request(victim, RequestStatus.FINISHED_STOPPED, "stop-string")
            interrupted.add(victim.request_id)
    h.run(max_steps=2000)
    return h, added, interrupted


def test_random_workloads_under_memory_pressure_match_solo_runs():
    preempted_runs = 0
    for seed in range(120):
        h, added, interrupted = _random_workload(seed)
        assert h.kv.num_used_blocks == 0, seed
        preempted_runs += h.scheduler.num_preemptions_total > 0
        max_model_len = h.config.max_model_len
        for request in added:
            if request.request_id not in interrupted:
                expected = reference_output(request.prompt_token_ids, request.max_tokens, 40,
                                            frozenset({0}), max_model_len)
                assert request.output_token_ids == expected, (seed, request.request_id)
    assert preempted_runs >= 30          # the workload really exercises preemption


def test_step_budget_shrinks_while_streams_decode_and_not_for_a_lone_prompt():
    h = Harness(num_blocks=200, max_num_batched_tokens=256, max_batched_tokens_while_decoding=40)
    lone = h.add(make_request("lone", _prompt(50, 300), max_tokens=30))
    out = h.step()
    assert out.num_batched_tokens == 256          # nothing decoding yet: the full budget
    h.step()                                       # finishes the prompt (44 tokens)
    long = h.add(make_request("long", _prompt(51, 300), max_tokens=2))
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = h.step()
        assert out.num_batched_tokens <= 40       # `lone` decodes: the capped budget
        assert any(s.request is lone for s in out.scheduled)   # and it never waits
    h.run()
    _assert_matches_reference(lone)
    _assert_matches_reference(long)
