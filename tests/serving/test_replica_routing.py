"""The router's decisions over the per-replica prefix index (no Ray needed: plain state)."""
from __future__ import annotations

import random

import pytest

from shoal.core.errors import InvalidParameterError
from shoal.engine.kv.hashing import hash_block, prompt_block_hashes
from shoal.serving.replicas.routing import ReplicaState, Router


def _hashes(seed: int, blocks: int = 4) -> list[int]:
    return prompt_block_hashes([seed * 1000 + i for i in range(blocks * 16 + 3)], 16, salt=7)


def test_prompt_hashes_are_the_engines_chain() -> None:
    ids = list(range(40))
    first = hash_block(None, ids[:16], 7)
    assert prompt_block_hashes(ids, 16, 7) == [first, hash_block(first, ids[16:32], 7)]


def test_cache_aware_prefers_the_holder_until_load_is_imbalanced() -> None:
    a, b = ReplicaState("a"), ReplicaState("b")
    prompt = _hashes(1)
    b.apply("b1", [(True, h) for h in prompt[:3]])
    router = Router("cache_aware", imbalance=2, rng=random.Random(0))
    decision = router.choose([a, b], prompt)
    assert (decision.replica, decision.matched_blocks, decision.reason) == (b, 3, "prefix")
    b.in_flight = 3                 # imbalanced beyond 2: least loaded wins
    decision = router.choose([a, b], prompt)
    assert (decision.replica, decision.reason) == (a, "imbalance")
    b.in_flight = 1                 # balanced: 3/4 - 0.5*1 beats 0
    assert router.choose([a, b], prompt).replica is b
    b.up = False
    assert router.choose([a, b], prompt).replica is a
    assert router.choose([a, b], prompt, exclude=[a]) is None


def test_evictions_and_restarts_update_the_index() -> None:
    r = ReplicaState("r", incarnation="one")
    prompt = _hashes(2)
    r.apply("one", [(True, h) for h in prompt])
    assert r.matched_blocks(prompt) == 4
    r.apply("one", [(False, prompt[1])])          # a gap ends the chain
    assert r.matched_blocks(prompt) == 1
    r.apply("two", [])                            # a restarted replica holds nothing
    assert r.matched_blocks(prompt) == 0 and not r.cached


def test_a_burst_on_a_new_prefix_sticks_to_one_replica() -> None:
    a, b = ReplicaState("a"), ReplicaState("b")
    router = Router("cache_aware")
    prompt = _hashes(3)
    first = router.choose([a, b], prompt).replica
    first.begin(prompt)
    second = router.choose([a, b], prompt)
    assert second.replica is first and second.matched_blocks == 4
    first.end(prompt)
    assert not first.pending and first.in_flight == 0


def test_round_robin_and_least_loaded() -> None:
    replicas = [ReplicaState(n) for n in "abc"]
    router = Router("round_robin")
    assert len({router.choose(replicas, []).replica.name for _ in range(3)}) == 3
    replicas[0].in_flight, replicas[1].in_flight = 5, 5
    least = Router("least_loaded", rng=random.Random(1))
    picks = [least.choose(replicas, []).replica.name for _ in range(20)]
    # of two random picks the less loaded: c whenever it is drawn (2 pairs in 3)
    assert picks.count("c") >= 10
    with pytest.raises(InvalidParameterError):
        Router("random")


@pytest.mark.parametrize("env", [{"SHOAL_ROUTING": "random"}, {"SHOAL_REPLICA_CPUS": "0"},
                                 {"SHOAL_REPLICA_CPUS": "lots"}, {"SHOAL_REPLICAS": "-1"}])
def test_bad_replica_settings_are_named(env: dict[str, str]) -> None:
    from shoal.serving.settings import ServerSettings

    with pytest.raises(InvalidParameterError):
        ServerSettings.from_env(env)


def test_replica_settings_turn_replicas_on() -> None:
    from shoal.serving.settings import ServerSettings

    assert not ServerSettings.from_env({}).replicated
    for env in ({"SHOAL_REPLICAS": "2"}, {"SHOAL_RAY": "1"}, {"SHOAL_RAY_ADDRESS": "auto"}):
        assert ServerSettings.from_env(env).replicated, env
    settings = ServerSettings.from_env({"SHOAL_REPLICA_CPUS": "2.5", "SHOAL_ROUTING": "Round_Robin"})
    assert (settings.replica_cpus, settings.routing) == (2.5, "round_robin")


def test_a_session_sticks_to_its_replica_until_it_is_down_or_overloaded() -> None:
    a, b = ReplicaState("a"), ReplicaState("b")
    router = Router("round_robin", imbalance=2)
    home = router.choose([a, b], [], session="chat-1").replica
    other = b if home is a else a
    # round robin would alternate; the session stays put
    assert {router.choose([a, b], [], session="chat-1").replica.name for _ in range(5)} == {home.name}
    assert router.choose([a, b], [], session="chat-1").reason == "session"
    home.in_flight = 3              # 3 more than the least loaded (> 2): the session moves
    moved = router.choose([a, b], [], session="chat-1")
    assert moved.replica is other and moved.reason != "session"
    home.in_flight = 0
    assert router.choose([a, b], [], session="chat-1").replica is other    # and stays where it went
    other.up = False                # its replica is down: back to one that is up
    assert router.choose([a, b], [], session="chat-1").replica is home
    assert router.choose([a, b], [], session="chat-1", exclude=[home]) is None


def test_cache_aware_with_a_session_and_the_session_table_is_bounded() -> None:
    a, b = ReplicaState("a"), ReplicaState("b")
    prompt = _hashes(4)
    b.apply("b1", [(True, h) for h in prompt])
    router = Router("cache_aware", max_sessions=2)
    assert router.choose([a, b], prompt, session="s1").replica is b      # the policy's pick first
    a.apply("a1", [(True, h) for h in prompt])
    assert router.choose([a, b], prompt, session="s1").replica is b      # then the session's
    router.choose([a, b], prompt, session="s2")
    router.choose([a, b], prompt, session="s3")
    assert router.session_home("s1") is None and router.session_home("s3") is not None


def test_the_session_header_setting() -> None:
    from shoal.serving.settings import ServerSettings

    assert ServerSettings.from_env({}).session_header == "X-Session-ID"
    assert ServerSettings.from_env({"SHOAL_SESSION_HEADER": "Off"}).session_header == ""
    assert ServerSettings.from_env({"SHOAL_SESSION_HEADER": "X-Conversation"}).session_header == "X-Conversation"
    with pytest.raises(InvalidParameterError, match="session_header"):
        ServerSettings.from_env({"SHOAL_SESSION_HEADER": "no spaces: here"})


def test_placement_gives_each_replica_a_gpu_on_gpu_clusters() -> None:
    from shoal.serving.replicas.cluster import placement

    assert placement(None, None, 0.0) == (1, 0.0)        # no GPUs: one replica on CPUs
    assert placement(3, None, 0.0) == (3, 0.0)
    assert placement(None, None, 4.0) == (4, 1.0)        # one replica per GPU
    assert placement(2, None, 4.0) == (2, 1.0)           # --replicas 2: two, a GPU each
    assert placement(None, 0.0, 4.0) == (1, 0.0)         # --replica-gpus 0: on CPUs
    assert placement(None, 2.0, 4.0) == (1, 2.0)         # --replica-gpus given: as asked
    assert placement(3, 0.5, 1.0) == (3, 0.5)


def test_replica_gpus_default_to_auto() -> None:
    from shoal.serving.settings import ServerSettings

    assert ServerSettings.from_env({}).replica_gpus is None
    assert ServerSettings.from_env({"SHOAL_REPLICA_GPUS": "Auto"}).replica_gpus is None
    assert ServerSettings.from_env({"SHOAL_REPLICA_GPUS": "0"}).replica_gpus == 0.0
    with pytest.raises(InvalidParameterError, match="replica_gpus"):
        ServerSettings.from_env({"SHOAL_REPLICA_GPUS": "-1"})


def test_new_prefixes_go_where_the_fewest_prompts_are_held() -> None:
    a, b = ReplicaState("a"), ReplicaState("b")
    router = Router("cache_aware")
    a.begin(_hashes(10, blocks=6))
    a.end(_hashes(10, blocks=6))
    a.apply("a1", [(True, h) for h in _hashes(10, blocks=6)])
    decision = router.choose([a, b], _hashes(11))         # nobody holds it: to the emptier one
    assert (decision.replica, decision.reason) == (b, "new_prefix")
    b.begin(_hashes(11, blocks=2))                        # prompts in flight count: two on b ...
    b.begin(_hashes(12, blocks=2))
    assert router.choose([a, b], _hashes(13)).replica is a    # ... one on a (though it holds more blocks)
    a.apply("a1", [(False, _hashes(10, blocks=6)[0])])        # a evicted its prompt's first block
    assert a.held_prompts() == 0 and b.held_prompts() == 2
    # sixteen new prefixes in a row, each kept where it went: an even split
    c, d = ReplicaState("c"), ReplicaState("d")
    for seed in range(100, 116):
        router.choose([c, d], _hashes(seed)).replica.apply("x", [(True, h) for h in _hashes(seed)])
    assert len(c.cached) == len(d.cached) == 8 * 4
