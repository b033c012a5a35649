#!/usr/bin/env python3
"""Does engine work slow the HTTP side? Probe latency of a cheap endpoint, idle vs under load.

While C closed-loop streaming clients keep a `shoal serve` (or any OpenAI-compatible
server) busy, a prober calls GET /v1/models every 20 ms on a fresh connection and records
how long each answer takes. If the engine thread starved the event loop (the GIL, a
blocking call), the loaded figures would be far above the idle ones.

With --pid (the server's process id, Linux) it also reports the CPU seconds the server's
main thread (uvicorn's event loop: HTTP parsing, JSON, SSE framing) spent against all its
other threads (the engine loop and torch's workers) during the loaded window.

    python benchmarks/http_overhead.py --url http://127.0.0.1:11434 --concurrency 32 --seconds 20 \
        --pid $(pgrep -f "shoal serve")
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
from process_cpu import cpu_seconds


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


async def probe(url: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        async with httpx.AsyncClient(timeout=30) as client:
            started = time.perf_counter()
            response = await client.get(url + "/v1/models")
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.02)
    return latencies


async def stream_loop(url: str, model: str, max_tokens: int, stop: asyncio.Event, counts: list[int]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        i = 0
        while not stop.is_set():
            i += 1
            body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        counts[0] += len(json.loads(line[6:])["choices"][0]["text"]) > 0


async def measure(url: str, model: str, concurrency: int, seconds: float, max_tokens: int,
                  pid: int | None = None) -> dict:
    stop = asyncio.Event()
    counts = [0]
    streams = [asyncio.ensure_future(stream_loop(url, model, max_tokens, stop, counts))
               for _ in range(concurrency)]
    await asyncio.sleep(2.0 if concurrency else 0)   # let the batch fill
    counts[0] = 0
    cpu_before = cpu_seconds(pid) if pid else None
    prober = asyncio.ensure_future(probe(url, stop))
    await asyncio.sleep(seconds)
    cpu_after = cpu_seconds(pid) if pid else None
    stop.set()
    latencies = await prober
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    return {"concurrency": concurrency, "probes": len(latencies),
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * pct(latencies, 99),
            "max_ms": 1000 * max(latencies), "stream_chunks_per_s": counts[0] / seconds,
            "cpu_event_loop_s": cpu_after[0] - cpu_before[0] if pid else None,
            # the other threads: the whole process less its event loop
            "cpu_engine_and_torch_s": ((cpu_after[1] - cpu_after[0]) - (cpu_before[1] - cpu_before[0])
                                       if pid else None), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:11434")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--pid", type=int, default=None, help="server pid, for per-thread CPU time")
    args = parser.parse_args()
    model = args.model or httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
    for c in (0, args.concurrency):
        r = asyncio.run(measure(args.url, model, c, args.seconds, args.max_tokens, args.pid))
        print(f"{'idle' if c == 0 else f'{c} streams':>10}: GET /v1/models p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms over {r['probes']} probes; "
              f"{r['stream_chunks_per_s']:.0f} stream chunks/s")
        if args.pid:
            print(f"{'':>10}  server CPU in {r['seconds']:.0f}s: event loop {r['cpu_event_loop_s']:.2f}s, "
                  f"engine + torch threads {r['cpu_engine_and_torch_s']:.2f}s")


if __name__ == "__main__":
    main()
