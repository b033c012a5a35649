#!/usr/bin/env python3
"""What `tools` with tool_choice "auto" costs free text: the lazy call grammar's per-step price.

In one process, through AsyncEngine (as benchmarks/structured_bench.py): for each stream count,
rounds alternate between three modes over the same questions, each stream exactly --max-tokens
tokens long (greedy, ignore_eos):
  plain       no tools
  prompt      the tools rendered by the built-in tool prompt, no grammar
  auto        the same prompt under tool_choice "auto"'s lazy grammar (text free until the
              model writes <tool_call>), as a chat request with tools runs
"auto" vs "prompt" is the grammar's cost (same prompt length); "prompt" vs "plain" is the
longer prompt's. Reports output tok/s per mode (median over rounds) and the mask fill time per
token.

    python benchmarks/tools_bench.py [--streams 1,4,16] [--max-tokens 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from grammar_backends import pct

QUESTIONS = ["the sea", "a violin", "volcanoes", "bread", "winter", "a lighthouse", "chess", "bees",
             "the moon", "rivers", "clocks", "trains", "mountains", "paper", "gardens", "rain"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web",
                                      "parameters": {"type": "object", "properties": {
                                          "query": {"type": "string"}, "limit": {"type": "integer"}},
                                          "required": ["query"]}}},
]


async def one_round(engine, mode: str, streams: int, max_tokens: int, tag: str) -> tuple[int, float]:
    from shoal import SamplingParams
    from shoal.engine.events import Update
    from shoal.text.tools import plan_tools

    tokenizer = engine.tokenizer
    plan = plan_tools(TOOLS, "auto", None, tokenizer.chat_template, tokenizer)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            structured=plan.structured if mode == "auto" else None)

    async def stream(i: int) -> int:
        messages = [{"role": "user", "content": f"Tell me about {QUESTIONS[i % len(QUESTIONS)]}."}]
        if mode != "plain":
            messages = plan.messages(messages)
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        count = 0
        async for event in engine.generate(f"{tag}-{i}", ids, params):
            if isinstance(event, Update):
                count += sum(len(out.token_ids) for out in event.outputs)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*[stream(i) for i in range(streams)])
    return sum(counts), time.perf_counter() - start


async def main_async(args: argparse.Namespace) -> None:
    from shoal.core.config import EngineConfig
    from shoal.engine.async_engine import AsyncEngine

    levels = [int(s) for s in args.streams.split(",")]
    engine = AsyncEngine(EngineConfig.from_env(model=args.model, compute=args.compute,
                                               max_num_seqs=max(64, *levels)))
    masks = engine.core.structured.masks
    try:
        for mode in ("plain", "prompt", "auto"):          # warm-up: kernels, grammar vocabulary, compile
            await one_round(engine, mode, 1, 4, f"warm-{mode}")
        print("command:", " ".join(["python", *sys.argv]))
        print(f"engine: {engine.info.model_path} compute={engine.info.compute} device={engine.info.device}")
        for streams in levels:
            rates: dict[str, list[float]] = {"plain": [], "prompt": [], "auto": []}
            masks.fill_seconds.clear()
            for r in range(args.rounds):
                for mode in rates:
                    tokens, wall = await one_round(engine, mode, streams, args.max_tokens, f"{streams}-{mode}{r}")
                    if tokens != streams * args.max_tokens:
                        raise RuntimeError(f"{mode}: {tokens} tokens, expected {streams * args.max_tokens}")
                    rates[mode].append(tokens / wall)
            med = {m: statistics.median(v) for m, v in rates.items()}
            fills = list(masks.fill_seconds)
            print(f"{streams:3d} streams x {args.max_tokens} tokens: plain {med['plain']:7.1f} tok/s   "
                  f"tools prompt {med['prompt']:7.1f}   tools auto (lazy grammar) {med['auto']:7.1f}   "
                  f"auto/prompt {med['auto'] / med['prompt']:.3f}   mask fill P50 {pct(fills, 50) * 1e3:.3f} ms "
                  f"P99 {pct(fills, 99) * 1e3:.3f} ms", flush=True)
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--compute", default="fast", choices=["fast", "exact"])
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
