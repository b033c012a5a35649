#!/usr/bin/env python3
"""Engine replicas on Ray: KV-cache-aware routing against round robin on a shared-prefix load.

The workload: P distinct system prompts of T tokens each, U users per prompt asking a short
question (8 tokens) and reading M tokens back, C requests in flight at once, users in a
shuffled order (fixed seed). Each policy gets fresh replicas (empty prefix caches) on one
local Ray cluster and sees the same requests. Requests go straight through ReplicaEngine
(the object the HTTP front uses), so the figures are the routing and the engines, not HTTP.

Reported per policy: the prefix-cache hit rate (prompt tokens found cached / looked up, over
all replicas) beside its ceiling (each prompt's first request computes it all; a request's
last, partial block holds its own question), P50/P90 time to first token, total wall time,
requests per replica, and how many prompts were served by one replica only (cache-aware
routing should keep every prompt on one).

    python benchmarks/replicas_bench.py [--model PATH] [--replicas 2] [--threads 1] \\
        [--prompts 16] [--prefix-tokens 1000] [--users 8] [--max-tokens 64] [--concurrency 4] \\
        [--policies cache_aware,round_robin]

The issue's layout: --replicas 2 --threads 1, and for comparison --replicas 1 --threads 2.

    python benchmarks/replicas_bench.py --hop [--threads 1] [--max-tokens 64] [--runs 5]

measures the hop instead: one stream at a time, single-stream TTFT and decode tok/s of the
in-process AsyncEngine against one replica on Ray (`--replicas 1 --ray`), same model, threads.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import statistics
import sys
import time

import ray

from shoal.core.config import EngineConfig
from shoal.core.sampling_params import SamplingParams
from shoal.engine.events import Update
from shoal.model.default_model import default_model_path
from shoal.serving.replicas.cluster import ReplicaOptions, start_actors
from shoal.serving.replicas.replica_engine import ReplicaEngine
from shoal.serving.replicas.routing import Router


def workload(args, vocab: int) -> list[tuple[int, list[int]]]:
    """(prompt index, token ids) of every request, shuffled."""
    rng = random.Random(1234)
    prefixes = [[rng.randrange(100, vocab - 100) for _ in range(args.prefix_tokens)] for _ in range(args.prompts)]
    requests = [(p, prefix + [rng.randrange(100, vocab - 100) for _ in range(8)])
                for p, prefix in enumerate(prefixes) for _ in range(args.users)]
    rng.shuffle(requests)
    return requests


def hit_ceiling(args, block_size: int) -> float:
    """The best hit rate possible: every request but each prompt's first finds the prompt's
    full blocks cached, and no more."""
    prompt = args.prefix_tokens + 8
    cached = (args.prefix_tokens // block_size) * block_size
    return (args.users - 1) * cached / (args.users * prompt)


async def run_policy(engine: ReplicaEngine, requests: list[tuple[int, list[int]]], args) -> dict:
    ttfts: list[float] = []
    gate = asyncio.Semaphore(args.concurrency)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    async def one(i: int, ids: list[int]) -> None:
        async with gate:
            started = time.perf_counter()
            first = None
            async for event in engine.generate(f"bench-{i}", ids, params):
                if first is None and isinstance(event, Update):
                    first = time.perf_counter() - started
            ttfts.append(first if first is not None else float("nan"))

    engine.routes = collections.deque(maxlen=len(requests) + 16)
    started = time.perf_counter()
    await asyncio.gather(*(one(i, ids) for i, (_p, ids) in enumerate(requests)))
    wall = time.perf_counter() - started
    await engine.refresh()
    stats = engine.stats()
    per_replica = collections.Counter(route.replica for route in engine.routes)
    homes: dict[int, set[str]] = collections.defaultdict(set)
    for route in engine.routes:
        homes[requests[int(route.request_id.removeprefix("bench-"))][0]].add(route.replica)
    ttfts.sort()
    return {"hit_rate": stats.prefix_hits / max(1, stats.prefix_queries),
            "p50_ttft": statistics.median(ttfts), "p90_ttft": ttfts[int(0.9 * (len(ttfts) - 1))],
            "wall": wall, "per_replica": dict(sorted(per_replica.items())),
            "one_home": sum(len(h) == 1 for h in homes.values()), "decisions": dict(sorted(engine.decisions.items()))}


async def single_streams(engine, args, vocab: int) -> tuple[float, float]:
    """(median TTFT, median decode tok/s) of --runs single streams, after one warm-up."""
    rng = random.Random(99)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    ttfts, rates = [], []
    for run in range(args.runs + 1):
        ids = [rng.randrange(100, vocab - 100) for _ in range(100)]
        started = time.perf_counter()
        first = last = None
        tokens = 0
        async for event in engine.generate(f"hop-{run}", ids, params):
            if isinstance(event, Update):
                now = time.perf_counter()
                first = first or now
                last = now
                tokens += sum(len(o.token_ids) for o in event.outputs)
        if run:         # the first is a warm-up
            ttfts.append(first - started)
            rates.append((tokens - 1) / (last - first))
    return statistics.median(ttfts), statistics.median(rates)


def hop(args, config: EngineConfig) -> None:
    from shoal.engine.async_engine import AsyncEngine

    local = AsyncEngine(config)
    try:
        vocab = local.info.model_config.vocab_size
        in_process = asyncio.run(single_streams(local, args, vocab))
    finally:
        local.shutdown()
    engine = ReplicaEngine(start_actors(config, ReplicaOptions(replicas=1, cpus=args.threads)), Router())
    try:
        on_ray = asyncio.run(single_streams(engine, args, vocab))
    finally:
        engine.shutdown()
    print(f"{'engine':12s} {'P50 TTFT':>9s} {'decode tok/s':>13s}")
    for name, (ttft, rate) in (("in-process", in_process), ("ray x1", on_ray)):
        print(f"{name:12s} {ttft * 1000:7.0f}ms {rate:13.1f}")
    print(f"ray/in-process tok/s: {on_ray[1] / in_process[1]:.0%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kv-cache-bytes", default="512MiB")
    parser.add_argument("--policies", default="cache_aware,round_robin")
    parser.add_argument("--hop", action="store_true", help="measure the Ray hop (single streams) instead")
    parser.add_argument("--runs", type=int, default=5, help="--hop: single streams per engine")
    args = parser.parse_args()

    ray.init(num_cpus=max(os.cpu_count() or 1, args.replicas * args.threads), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    config = EngineConfig(model=args.model, num_threads=args.threads, kv_cache_bytes=args.kv_cache_bytes,
                          max_model_len=args.prefix_tokens + 8 + args.max_tokens + 16)
    print(f"$ python {' '.join(sys.argv)}")
    if args.hop:
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        hop(args, config)
        ray.shutdown()
        return 0
    print(f"{args.replicas} replica(s) x {args.threads} thread(s); {args.prompts} prompts x {args.prefix_tokens} "
          f"tokens, {args.users} users each, {args.max_tokens} tokens out, {args.concurrency} in flight; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    print(f"{'policy':12s} {'hit rate':>9s} {'P50 TTFT':>9s} {'P90 TTFT':>9s} {'wall':>7s}  prompts on one replica; "
          "requests per replica; router decisions")
    for policy in args.policies.split(","):
        actors = start_actors(config, ReplicaOptions(replicas=args.replicas, cpus=args.threads))
        engine = ReplicaEngine(actors, Router(policy))
        try:
            requests = workload(args, engine.info.model_config.vocab_size)
            if policy == args.policies.split(",")[0]:
                print(f"(KV cache per replica: {engine.info.num_blocks * engine.info.block_size} tokens; "
                      f"the prefixes: {args.prompts * args.prefix_tokens} tokens; hit-rate ceiling "
                      f"{hit_ceiling(args, engine.block_size):.1%})")
            result = asyncio.run(run_policy(engine, requests, args))
        finally:
            engine.shutdown()
        print(f"{policy:12s} {result['hit_rate']:9.1%} {result['p50_ttft'] * 1000:7.0f}ms "
              f"{result['p90_ttft'] * 1000:7.0f}ms {result['wall']:6.1f}s  {result['one_home']}/{args.prompts}; "
              f"{result['per_replica']}; {result['decisions']}", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
