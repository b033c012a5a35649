#!/usr/bin/env python3
"""What constrained decoding costs the engine: N streams under a JSON schema vs N free ones.

In one process, through AsyncEngine (as benchmarks/engine_bench.py): rounds alternate between
N concurrent unconstrained streams and N concurrent streams under the 50-property nested
schema of benchmarks/grammar_backends.py, each stream exactly --max-tokens tokens long
(greedy, ignore_eos; the schema's documents are longer than that, so every token of a
constrained stream is masked and the batch keeps its shape in both modes). Reports output
tok/s per mode (median over rounds) and their ratio, the mask time per token (P50/P99, on the
mask thread), the engine thread's wait for a step's masks once the logits are ready (the part
not hidden behind the forward pass), and the schema's compile time (cold, then cached).

    python benchmarks/structured_bench.py [--streams 16] [--max-tokens 128] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from grammar_backends import nested_schema, pct

TOPICS = ["the sea", "a violin", "volcanoes", "bread", "winter", "a lighthouse", "chess", "bees",
          "the moon", "rivers", "clocks", "trains", "mountains", "paper", "gardens", "rain",
          "owls", "glass", "maps", "salt", "bridges", "comets", "wool", "tea", "copper", "ferns",
          "kites", "deserts", "coral", "lanterns", "foxes", "markets"]


async def one_round(engine, structured, streams: int, max_tokens: int, tag: str) -> tuple[int, float, str]:
    from shoal import SamplingParams
    from shoal.engine.events import Update

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, structured=structured)

    async def stream(i: int) -> tuple[int, str]:
        text = f"Describe {TOPICS[i % len(TOPICS)]} as a JSON record with many fields."
        rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])
        ids = engine.tokenizer.encode(rendered, add_special_tokens=False)
        count, pieces = 0, []
        async for event in engine.generate(f"{tag}-{i}", ids, params):
            if isinstance(event, Update):
                for out in event.outputs:
                    count += len(out.token_ids)
                    pieces.append(out.text)
        return count, "".join(pieces)

    start = time.perf_counter()
    results = await asyncio.gather(*[stream(i) for i in range(streams)])
    wall = time.perf_counter() - start
    return sum(c for c, _ in results), wall, results[0][1]


async def main_async(args: argparse.Namespace) -> None:
    from shoal.core.config import EngineConfig
    from shoal.core.structured_output import StructuredOutput
    from shoal.engine.async_engine import AsyncEngine

    engine = AsyncEngine(EngineConfig.from_env(model=args.model, compute=args.compute,
                                               max_num_seqs=max(64, args.streams)))
    schema = StructuredOutput.json_schema(nested_schema(50), field="bench")
    structured = engine.core.structured
    try:
        # Warm-up: the first constrained request builds the grammar vocabulary and compiles
        # the schema (cold); a second one finds it in the cache.
        await one_round(engine, None, 1, 4, "warm-free")
        started = time.perf_counter()
        await one_round(engine, schema, 1, 1, "warm-json")
        first_request = time.perf_counter() - started
        cold_compile = structured.compiler.compile_seconds[-1]
        started = time.perf_counter()
        await one_round(engine, schema, 1, 1, "warm-json-2")
        cached_request = time.perf_counter() - started
        structured.masks.fill_seconds.clear()
        structured.masks.wait_seconds.clear()

        rates: dict[str, list[float]] = {"free": [], "json": []}
        sample = ""
        for r in range(args.rounds):
            for mode in ("free", "json"):
                tokens, wall, text = await one_round(engine, schema if mode == "json" else None,
                                                     args.streams, args.max_tokens, f"{mode}{r}")
                if tokens != args.streams * args.max_tokens:
                    raise RuntimeError(f"{mode}: {tokens} tokens, expected {args.streams * args.max_tokens}")
                rates[mode].append(tokens / wall)
                sample = text if mode == "json" else sample
                print(f"round {r} {mode:>4}: {tokens / wall:7.1f} tok/s ({wall:.2f} s)", flush=True)
        fills = list(structured.masks.fill_seconds)
        waits = list(structured.masks.wait_seconds)
        free, constrained = statistics.median(rates["free"]), statistics.median(rates["json"])
        print("command:", " ".join(["python", *sys.argv]))
        print(f"engine: {engine.info.model_path} compute={engine.info.compute} "
              f"device={engine.info.device}; {args.streams} streams x {args.max_tokens} tokens, "
              f"{args.rounds} rounds each")
        print(f"unconstrained: {free:.1f} tok/s   under the schema: {constrained:.1f} tok/s   "
              f"ratio {constrained / free:.3f}")
        print(f"mask fill per token (mask thread): P50 {pct(fills, 50) * 1e3:.3f} ms  "
              f"P99 {pct(fills, 99) * 1e3:.3f} ms  ({len(fills)} tokens)")
        print(f"engine wait for a step's masks after the forward pass: P50 {pct(waits, 50) * 1e3:.3f} ms  "
              f"P99 {pct(waits, 99) * 1e3:.3f} ms  ({len(waits)} steps)")
        print(f"50-property schema compile: {cold_compile * 1e3:.1f} ms cold; first constrained "
              f"request end to end {first_request:.2f} s (grammar vocabulary built on first use), "
              f"next one {cached_request:.2f} s (cache hit)")
        print("a constrained output begins:", json.dumps(sample[:160]))
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--compute", default="fast", choices=["fast", "exact"])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
