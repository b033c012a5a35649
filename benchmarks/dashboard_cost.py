"""What do open dashboards cost? Output tok/s at 16 streams with 0 vs 5 live feeds, in one run.

16 closed-loop streaming clients keep a `shoal serve` busy for the whole run (completions
with ignore_eos, so every request is exactly --max-tokens long). The run alternates phases
with no dashboard open and with --feeds dashboards open (each a GET /dashboard/feed read to
the end of every frame and parsed as JSON, as the page does), --rounds times each, so slow
drifts of a shared machine fall on both sides. Output tokens per phase come from the
server's own counter (shoal:generation_tokens on /metrics), read at the start and end of
each phase after a settle period.

On a shared, busy machine tok/s phases swing more than the effect being measured, so the
run also reads the server's CPU time from /proc (Linux, when it started the server or is
given --pid): the event-loop thread (HTTP, SSE, the dashboard's tick and feeds) against the
whole process. The difference in event-loop CPU between the two kinds of phase, as a share
of the process's CPU, is what the feeds took from everything else, independent of how many
other processes competed for the cores.

    python benchmarks/dashboard_cost.py                       # starts smollm2:135m itself
    python benchmarks/dashboard_cost.py --url http://127.0.0.1:11434 --model smollm2:135m
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import httpx
from local_server import start_local_server
from process_cpu import cpu_seconds

DEFAULT_MODEL_FILE = Path.home() / ".cache/shoal/models/SmolLM2-135M-Instruct.Q4_1.gguf"


async def stream_loop(client: httpx.AsyncClient, model: str, max_tokens: int, stop: asyncio.Event, i: int) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        body = {"model": model, "prompt": f"Story {i}.{n}: once upon a time", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    pass
        except httpx.HTTPError:
            await asyncio.sleep(0.5)


async def feed(url: str, headers: dict[str, str], frames: list[int]) -> None:
    """One open dashboard: reads the feed and parses every frame, until cancelled."""
    async with httpx.AsyncClient(timeout=None, headers=headers) as client, \
            client.stream("GET", url + "/dashboard/feed") as response:
        response.raise_for_status()
        buffer = ""
        async for chunk in response.aiter_text():
            buffer += chunk
            while "\n\n" in buffer:
                frame, buffer = buffer.split("\n\n", 1)
                json.loads(frame.partition("data: ")[2])
                frames[0] += 1


async def generation_tokens(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return sum(float(m) for m in re.findall(r"^shoal:generation_tokens_total\{[^}]*\} ([0-9.e+]+)$", text, re.MULTILINE))


async def run(args: argparse.Namespace, url: str, pid: int | None) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, headers=headers) as client:
        stop = asyncio.Event()
        loops = [asyncio.create_task(stream_loop(client, args.model, args.max_tokens, stop, i))
                 for i in range(args.streams)]
        await asyncio.sleep(args.warmup)
        results: dict[int, list[float]] = {0: [], args.feeds: []}
        cpu: dict[int, list[tuple[float, float]]] = {0: [], args.feeds: []}   # per phase, per second
        frames = [0]
        for round_ in range(args.rounds):
            for open_feeds in (0, args.feeds) if round_ % 2 == 0 else (args.feeds, 0):
                feeds = [asyncio.create_task(feed(url, headers, frames)) for _ in range(open_feeds)]
                await asyncio.sleep(args.settle)
                frames[0] = 0
                t0, n0, c0 = time.monotonic(), await generation_tokens(client), cpu_seconds(pid)
                await asyncio.sleep(args.seconds)
                t1, n1, c1 = time.monotonic(), await generation_tokens(client), cpu_seconds(pid)
                cpu[open_feeds].append(((c1[0] - c0[0]) / (t1 - t0), (c1[1] - c0[1]) / (t1 - t0)))
                for task in feeds:
                    task.cancel()
                await asyncio.gather(*feeds, return_exceptions=True)
                rate = (n1 - n0) / (t1 - t0)
                results[open_feeds].append(rate)
                loop_cpu, all_cpu = cpu[open_feeds][-1]
                print(f"round {round_ + 1}: {open_feeds} dashboards open: {rate:7.1f} output tok/s; server CPU "
                      f"{all_cpu:.2f} s/s, event loop {loop_cpu:.3f} s/s"
                      + (f" ({frames[0]} feed frames read)" if open_feeds else ""), flush=True)
        stop.set()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    base, loaded = statistics.median(results[0]), statistics.median(results[args.feeds])
    print(f"\nmedian output tok/s at {args.streams} streams: 0 dashboards {base:.1f}, "
          f"{args.feeds} dashboards {loaded:.1f}: {100 * (loaded / base - 1):+.2f}%")
    print(f"per-phase spread (0 dashboards): {min(results[0]):.1f} .. {max(results[0]):.1f}")
    if pid is not None:
        loop0 = statistics.mean(c[0] for c in cpu[0])
        loop5 = statistics.mean(c[0] for c in cpu[args.feeds])
        total = statistics.mean(c[1] for c in cpu[0] + cpu[args.feeds])
        print(f"event-loop CPU: {loop0:.4f} s/s with 0 dashboards, {loop5:.4f} s/s with {args.feeds}: the feeds "
              f"took {1000 * (loop5 - loop0):+.1f} ms of CPU a second, {100 * (loop5 - loop0) / total:+.2f}% of the "
              f"server's {total:.2f} CPU s/s")
    print("command: python benchmarks/dashboard_cost.py " + " ".join(sys.argv[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an existing server (default: start `shoal serve` on --model-file)")
    parser.add_argument("--model-file", default=str(DEFAULT_MODEL_FILE))
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--api-key", default=os.environ.get("SHOAL_API_KEY"), help="an admin key, with keys on")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--feeds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="phases of each kind, interleaved")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured length of a phase")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after opening/closing feeds")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--pid", type=int, help="the server's process id, for CPU figures (with --url)")
    args = parser.parse_args()
    process = None
    url = args.url
    if url is None:
        process, url = start_local_server(args.model_file, "--served-model-name", args.model)
    try:
        asyncio.run(run(args, url, process.pid if process is not None else args.pid))
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
