"""Engine replicas on a real local Ray cluster (tiny models): KV-aware routing, the prefix
index following the replicas' store/evict events, abort across the hop, and the real HTTP
front with --replicas 2 in both dialects. One cluster for the module keeps it bounded."""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")

from live_server import LiveServer

from shoal.core.config import EngineConfig
from shoal.core.errors import EngineDeadError
from shoal.core.sampling_params import SamplingParams
from shoal.engine.events import Update
from shoal.engine.kv.hashing import prompt_block_hashes
from shoal.serving.replicas.cluster import ReplicaOptions, blob_source, start_actors
from shoal.serving.replicas.model_files import ModelFile
from shoal.serving.replicas.replica_engine import ReplicaEngine
from shoal.serving.replicas.routing import Router
from shoal.serving.replicas.session import current_session

BLOCK = 16
KV_BLOCKS = 32      # small enough that a handful of distinct prompts evicts the first


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module, as the server has one (the poller lives on it)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def replicas(cluster, tiny_llama_dir: Path, loop):
    config = EngineConfig(model=str(tiny_llama_dir), kv_cache_bytes=KV_BLOCKS * 8192, block_size=BLOCK,
                          num_threads=1, max_model_len=256)
    actors = start_actors(config, ReplicaOptions(replicas=2, cpus=0.5))
    engine = ReplicaEngine(actors, Router("cache_aware"), poll_interval=0.2)
    yield engine
    engine.shutdown()
    loop.run_until_complete(asyncio.sleep(0.05))    # lets the poller's cancellation land


def _prompt(seed: int, length: int) -> list[int]:
    return [10 + (seed * 37 + i * 11) % 250 for i in range(length)]


async def _run(engine: ReplicaEngine, request_id: str, ids: list[int], max_tokens: int = 2) -> list[int]:
    tokens: list[int] = []
    async for event in engine.generate(request_id, ids, SamplingParams(max_tokens=max_tokens, temperature=0)):
        if isinstance(event, Update):
            for out in event.outputs:
                tokens.extend(out.token_ids)
    await engine.refresh()
    return tokens


def _route(engine: ReplicaEngine, request_id: str):
    return next(r for r in engine.routes if r.request_id == request_id)


def test_routing_sends_a_shared_prefix_to_the_replica_that_holds_it(replicas: ReplicaEngine, loop) -> None:
    async def main() -> None:
        homes = {}
        for p in range(2):          # two distinct 4-block system prompts land on the two replicas
            await _run(replicas, f"first-{p}", _prompt(p, 4 * BLOCK) + [7, 8, 9])
            homes[p] = _route(replicas, f"first-{p}").replica
        assert set(homes.values()) == {"r0", "r1"}, homes
        for p in (1, 0, 1, 0):      # the same prefix with other questions: to its home, 4 blocks matched
            rid = f"again-{p}-{time.monotonic_ns()}"
            await _run(replicas, rid, _prompt(p, 4 * BLOCK) + [20 + p, 21, 22, 23])
            route = _route(replicas, rid)
            assert (route.replica, route.matched_blocks, route.reason) == (homes[p], 4, "prefix")
        # and the replica really reused it: its prefix-cache hits went up
        assert replicas.stats().prefix_hits >= 4 * 4 * BLOCK

    loop.run_until_complete(main())


def test_the_index_follows_stores_and_evictions(replicas: ReplicaEngine, loop) -> None:
    async def main() -> None:
        # one session: the distinct prompts below all go to the first one's replica (new
        # prefixes would otherwise split between the replicas)
        current_session.set("evictions")
        first = _prompt(100, 6 * BLOCK)
        await _run(replicas, "evict-0", first + [1])
        home = next(r for r in replicas.replicas if r.state.name == _route(replicas, "evict-0").replica)
        hashes = prompt_block_hashes(first, BLOCK, replicas.cache_salt)
        assert set(hashes) <= home.state.cached
        # distinct prompts until the home replica has evicted the first prompt (the pool is small)
        for i in range(1, 40):
            await _run(replicas, f"evict-{i}", _prompt(100 + i, 10 * BLOCK) + [1])
            if not set(hashes) & ray.get(home.actor.cached_hashes.remote()):
                break
        for replica in replicas.replicas:
            real = ray.get(replica.actor.cached_hashes.remote())
            assert replica.state.cached == real      # the index is exactly what each replica holds
        assert not set(hashes) & home.state.cached  # ... and it saw the evictions

    loop.run_until_complete(main())


def test_a_disconnect_aborts_the_request_on_its_replica(replicas: ReplicaEngine, loop) -> None:
    async def main() -> None:
        stream = replicas.generate("leaver", _prompt(7, 20), SamplingParams(max_tokens=200, temperature=0,
                                                                          ignore_eos=True))
        async for event in stream:
            if isinstance(event, Update):
                break
        await stream.aclose()               # what a client that goes away causes
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await replicas.refresh()
            if replicas.stats().running == 0:
                break
            await asyncio.sleep(0.1)
        stats = replicas.stats()
        assert stats.running == 0 and stats.waiting == 0
        # far fewer than the 200 tokens asked for were generated by the replicas
        assert stats.generation_tokens < 200 + 200

    loop.run_until_complete(main())


def _keys(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "shoal", "keys", "create", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_http_front_with_two_replicas_serves_both_dialects(cluster, tiny_llama_dir: Path,
                                                               tmp_path: Path) -> None:
    env = {**os.environ, "SHOAL_HOME": str(tmp_path)}
    env.pop("SHOAL_KEYS_DB", None)
    admin, limited = _keys(env, "root", "--admin"), _keys(env, "two-a-minute", "--rpm", "2")
    # NOTE: round robin, so that the key's two requests surely land on different replicas
    # (cache_aware is tested above; it would send both to the replica holding their template's
    # first block).
    server = LiveServer(tiny_llama_dir, "--replicas", "2", "--ray-address", cluster, "--replica-cpus", "0.5",
                        "--routing", "round_robin", "--served-model-name", "tiny", env={"SHOAL_HOME": str(tmp_path), "SHOAL_AUTH": "on"},
                        log_path=tmp_path / "serve.log")
    try:
        server.wait_ready(timeout=240)
        with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {admin}"}) as http:
            def routed() -> dict[str, int]:
                return {r["replica"]: r["routed"] for r in http.get("/v1/replicas").json()["data"]}

            chat = http.post("/v1/chat/completions", json={
                "model": "tiny", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "the cat"}]}).json()
            assert chat["usage"]["completion_tokens"] >= 1, chat
            assert chat["choices"][0]["message"]["role"] == "assistant"
            with http.stream("POST", "/api/generate", json={"model": "tiny", "prompt": "the cat", "stream": True,
                                                            "options": {"num_predict": 4, "temperature": 0}}) as r:
                lines = [line for line in r.iter_lines() if line]
            assert r.status_code == 200 and '"done":true' in lines[-1].replace(" ", ""), lines
            bad = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": -1,
                                                          "messages": [{"role": "user", "content": "x"}]})
            assert bad.status_code == 400 and "error" in bad.json()
            # embeddings are not routed to replicas yet: a 400 that says so, in each dialect
            for path, body in (("/v1/embeddings", {"model": "tiny", "input": "x"}),
                               ("/api/embed", {"model": "tiny", "input": "x"})):
                refused = http.post(path, json=body)
                assert refused.status_code == 400 and "replicas" in refused.text, refused.text
            # a key's quota is the front's, not a replica's: its two requests a minute land on
            # both replicas, and the third is refused though each replica saw only one
            before = routed()
            for prompt in ("a", "b"):
                ok = http.post("/api/generate", headers={"Authorization": f"Bearer {limited}"}, json={
                    "model": "tiny", "prompt": prompt, "stream": False, "options": {"num_predict": 2}})
                assert ok.status_code == 200, ok.text
            after = routed()
            assert {name: after[name] - before[name] for name in after} == {"r0": 1, "r1": 1}
            refused = http.post("/v1/completions", headers={"Authorization": f"Bearer {limited}"},
                                json={"model": "tiny", "prompt": "c", "max_tokens": 2})
            assert refused.status_code == 429 and refused.json()["error"]["type"], refused.text
            metrics = http.get("/metrics").text
            for replica in ("r0", "r1"):
                assert f'shoal:replica_up{{model_name="tiny",replica="{replica}"}} 1.0' in metrics, metrics
            total = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("shoal:replica_routed_requests_total{"))
            assert total == 4      # the 400 and the 429 were refused before routing
            listed = http.get("/v1/replicas").json()["data"]
            assert [(r["model"], r["replica"], r["up"]) for r in listed] == [("tiny", "r0", True), ("tiny", "r1", True)]
            assert all(r["node"] and r["pid"] for r in listed)
            assert httpx.get(server.url + "/v1/replicas").status_code == 401     # behind the keys
    finally:
        server.stop()


def test_a_killed_replica_fails_no_waiting_request_and_comes_back(replicas: ReplicaEngine, loop) -> None:
    async def main() -> None:
        victim = replicas.replicas[0]
        before = victim.state.incarnation
        os.kill(await victim.actor.pid.remote(), signal.SIGKILL)
        # requests sent at once, before the front can have noticed: none may fail
        results = await asyncio.gather(*(_run(replicas, f"after-kill-{i}", _prompt(300 + i, 40), max_tokens=4)
                                         for i in range(6)), return_exceptions=True)
        assert all(isinstance(r, list) and r for r in results), results
        # Ray restarts the actor; the poller notices (a new incarnation: its index starts empty)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            await replicas.refresh()
            if victim.state.up and victim.state.incarnation != before:
                break
            await asyncio.sleep(0.5)
        assert victim.state.up and victim.state.incarnation != before
        # ... and the router uses it again
        for i in range(3):
            await _run(replicas, f"back-{i}", _prompt(400 + i, 20))
        assert "r0" in {_route(replicas, f"back-{i}").replica for i in range(3)}

    loop.run_until_complete(main())


def test_a_stream_whose_replica_dies_ends_with_an_engine_error(replicas: ReplicaEngine, loop) -> None:
    async def main() -> None:
        stream = replicas.generate("doomed", _prompt(500, 20), SamplingParams(max_tokens=200, temperature=0,
                                                                             ignore_eos=True))
        async for event in stream:
            if isinstance(event, Update):
                break       # it has streamed: it cannot be retried elsewhere
        home = next(r for r in replicas.replicas if r.state.name == _route(replicas, "doomed").replica)
        os.kill(await home.actor.pid.remote(), signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="died while streaming"):
            async for _event in stream:
                pass
        assert [r.request_id for r in replicas.routes].count("doomed") == 1

    loop.run_until_complete(main())


def test_a_replica_whose_engine_loop_hangs_is_treated_as_dead(replicas: ReplicaEngine, loop) -> None:
    """The test hook (SHOAL_TEST_HOOKS, set by the cluster fixture) stalls one replica's step
    loop for real while its actor still answers polls."""
    async def main() -> None:
        replicas.hang_after = 2.0
        try:
            prefix = _prompt(600, 2 * BLOCK)
            stream = replicas.generate("frozen", prefix + [1], SamplingParams(max_tokens=200, temperature=0,
                                                                            ignore_eos=True))
            async for event in stream:
                if isinstance(event, Update):
                    break
            home = next(r for r in replicas.replicas if r.state.name == _route(replicas, "frozen").replica)
            before = home.state.incarnation
            await home.actor.freeze.remote()
            started = time.monotonic()
            # requests that share the prefix go to the frozen replica (they wait there, unstreamed)
            waiting = [asyncio.ensure_future(_run(replicas, f"behind-{i}", prefix + [2 + i], max_tokens=3))
                       for i in range(3)]
            await asyncio.sleep(0.3)
            assert [_route(replicas, f"behind-{i}").replica for i in range(3)] == [home.state.name] * 3
            with pytest.raises(EngineDeadError, match="died while streaming"):
                async for _event in stream:
                    pass
            assert 2.0 <= time.monotonic() - started < 15
            # ... and were retried on the other replica: none failed
            assert all(tokens for tokens in await asyncio.gather(*waiting))
            for i in range(3):
                assert [r.replica for r in replicas.routes if r.request_id == f"behind-{i}"][-1] != home.state.name
            assert home.hangs == 1
            deadline = time.monotonic() + 90       # Ray restarts it; the router takes it back
            while time.monotonic() < deadline and not (home.state.up and home.state.incarnation != before):
                await replicas.refresh()
                await asyncio.sleep(0.5)
            assert home.state.up and home.state.incarnation != before
        finally:
            replicas.hang_after = 60.0

    loop.run_until_complete(main())


def test_a_replica_pulls_a_model_its_node_lacks_into_its_store_by_digest(cluster, tiny_llama_gguf: Path,
                                                                           tmp_path: Path, loop) -> None:
    """What a second node sees, on one machine: the front's path does not exist for the
    replicas, so they pull the blob from the front's BlobSource into their store."""
    data = tiny_llama_gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    source = blob_source({digest: str(tiny_llama_gguf)})
    store = tmp_path / "node-store"
    missing = ModelFile(str(tmp_path / "front-only" / f"sha256-{digest[7:]}"), digest, source, str(store))
    config = EngineConfig(model=missing.path, kv_cache_bytes=KV_BLOCKS * 8192, block_size=BLOCK, num_threads=1,
                          max_model_len=128)
    engine = ReplicaEngine(start_actors(config, ReplicaOptions(replicas=2, cpus=0.5), missing), Router("round_robin"))
    try:
        blob = store / "blobs" / f"sha256-{digest[7:]}"
        assert blob.read_bytes() == data          # both pulled the one blob (the second found it there)
        assert ray.get([r.actor.model_path.remote() for r in engine.replicas]) == [str(blob)] * 2
        for i in range(2):                         # and both serve from it
            assert loop.run_until_complete(_run(engine, f"pulled-{i}", _prompt(i, 20)))
        assert {r.replica for r in engine.routes} == {"r0", "r1"}
    finally:
        engine.shutdown()
    # a path the node has (a shared store) is used as it is: nothing is pulled
    shared = ModelFile(str(tiny_llama_gguf), digest, source, str(tmp_path / "other-store"))
    (actor,) = start_actors(config, ReplicaOptions(replicas=1, cpus=0.5), shared)
    try:
        assert ray.get(actor.model_path.remote()) == str(tiny_llama_gguf)
        assert not (tmp_path / "other-store" / "blobs").exists()
    finally:
        ray.kill(actor, no_restart=True)
    # bytes that do not hash to the digest never become a blob: the replica does not start
    liar = blob_source({"sha256:" + "0" * 64: str(tiny_llama_gguf)})
    wrong = ModelFile(str(tmp_path / "front-only" / "x"), "sha256:" + "0" * 64, liar, str(store))
    with pytest.raises(Exception, match="content has digest"):
        start_actors(config, ReplicaOptions(replicas=1, cpus=0.5, max_restarts=0), wrong)
    assert not (store / "blobs" / ("sha256-" + "0" * 64)).exists()
    for helper in (source, liar):
        ray.kill(helper, no_restart=True)


def test_sigterm_on_the_front_stops_its_replicas(cluster, tiny_llama_dir: Path, tmp_path: Path) -> None:
    server = LiveServer(tiny_llama_dir, "--ray", "--ray-address", cluster, "--replica-cpus", "0.5",
                        "--served-model-name", "tiny", log_path=tmp_path / "serve.log")
    try:
        server.wait_ready(timeout=240)
        (replica,) = httpx.get(server.url + "/v1/replicas", timeout=30).json()["data"]
        os.kill(replica["pid"], 0)                      # `--ray` alone: one replica, alive
    finally:
        server.process.terminate()                      # SIGTERM: drain, then stop the replicas
        assert server.process.wait(60) == 0, server.log()
        server.stop()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(replica["pid"], 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"replica process {replica['pid']} outlived its front")
