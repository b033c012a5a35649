#!/usr/bin/env python3
"""Overload run: drive a running server past its capacity and check it degrades cleanly.

1. Capacity: a closed-loop sweep (C clients, each sending its next request when the last
   ends) at rising C; capacity is the highest completed-request rate seen, reached where
   the rate stops growing (two levels in a row under 10% better). `--rate` skips the sweep.
2. Overload: open-loop Poisson arrivals at `--multiple` x capacity for `--duration` seconds,
   a mix of interactive (short prompt, short answer) and batch (long prompt, long answer)
   streaming chat requests, each class with its own API key (sent as Bearer; none: anonymous).
3. Report: per request its class, status, whether a 429/503 carried Retry-After, time to first
   token and total time (`--records`: a JSON line per request, written as it ends); the
   server's RSS every few seconds (`--pid`); then a PASS/FAIL line per criterion. The exit
   status is 0 only if every criterion passes; 2 when the sweep completes no request at all
   (a wrong --model, say), after the failures by status and an example of each.

    python benchmarks/overload.py --url http://127.0.0.1:11434 --pid $(pgrep -f "shoal serve") \\
        --duration 600 --interactive-key sk-i --batch-key sk-b --records /tmp/overload.jsonl
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import httpx

INTERACTIVE, BATCH = "interactive", "batch"
BATCH_TEXT = ("The river ran past the old mill, through fields of barley and under three stone "
              "bridges, before it reached the harbour town where the fishing boats were tied. ") * 12


@dataclass(slots=True)
class Outcome:
    """One request, as the client saw it."""

    kind: str                     # interactive | batch
    status: int | str             # HTTP status, or "error: ..." / "timeout" when none came
    retry_after: bool             # a Retry-After header was present
    ttft: float | None            # seconds to the first content token (admitted streams)
    total: float                  # seconds to the end of the answer or the rejection
    complete: bool                # a 200 stream that ended with [DONE]
    tokens: int = 0               # content chunks received
    error: str | None = None      # what went wrong: the start of the error body, or the exception


@dataclass(slots=True)
class Workload:
    url: str
    model: str
    keys: dict[str, str | None]
    max_tokens: dict[str, int]
    answer_bound: float

    def body(self, kind: str, i: int) -> dict:
        prompt = (f"Question {i}: name one planet and one fact about it." if kind == INTERACTIVE
                  else f"Document {i}. {BATCH_TEXT}\nSummarise the document in detail.")
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens[kind], "ignore_eos": True, "stream": True}

    def headers(self, kind: str) -> dict[str, str]:
        key = self.keys[kind]
        return {"Authorization": f"Bearer {key}"} if key else {}


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of an SSE body, split at "\n" only (a trailing "\r" dropped), as SSE defines them.

    NOTE: not httpx's aiter_lines: it splits as str.splitlines() does, also at U+2028, U+2029
    and U+0085, which a server may send raw inside a JSON string; the line is then cut in two
    and its JSON does not parse.
    """
    pending = b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode("utf-8", "replace")
    if pending:
        yield pending.removesuffix(b"\r").decode("utf-8", "replace")


async def one_request(client: httpx.AsyncClient, work: Workload, kind: str, i: int) -> Outcome:
    started = time.perf_counter()
    ttft, tokens, complete = None, 0, False
    try:
        async with asyncio.timeout(work.answer_bound):
            async with client.stream("POST", "/v1/chat/completions", json=work.body(kind, i),
                                     headers=work.headers(kind)) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", "replace")
                    return Outcome(kind, response.status_code, "retry-after" in response.headers,
                                   None, time.perf_counter() - started, False, error=body[:300])
                async for line in sse_lines(response):
                    if line == "data: [DONE]":
                        complete = True
                    elif line.startswith("data: {"):
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        if choices[0].get("delta", {}).get("content"):
                            tokens += 1
                            if ttft is None:
                                ttft = time.perf_counter() - started
                return Outcome(kind, 200, False, ttft, time.perf_counter() - started, complete, tokens)
    except TimeoutError:
        return Outcome(kind, "timeout", False, ttft, time.perf_counter() - started, False, tokens,
                       error=f"no answer within {work.answer_bound:g} s")
    except httpx.HTTPError as exc:
        return Outcome(kind, f"error: {type(exc).__name__}", False, ttft,
                       time.perf_counter() - started, False, tokens, error=str(exc)[:300] or None)
    except ValueError as exc:       # a data line that is not JSON
        return Outcome(kind, "error: bad stream", False, ttft, time.perf_counter() - started, False,
                       tokens, error=str(exc)[:300])


def client_for(work: Workload) -> httpx.AsyncClient:
    # NOTE: open-loop arrivals can have hundreds of requests in flight; the pool must not
    # become the queue that is being measured.
    return httpx.AsyncClient(base_url=work.url, timeout=httpx.Timeout(work.answer_bound),
                             limits=httpx.Limits(max_connections=4096, max_keepalive_connections=256))


def pick_kind(rng: random.Random, interactive_share: float) -> str:
    return INTERACTIVE if rng.random() < interactive_share else BATCH


# ---- capacity ----------------------------------------------------------------------------------

def succeeded(outcome: Outcome) -> bool:
    return outcome.status == 200 and outcome.complete


def failure_summary(outcomes: list[Outcome]) -> str:
    """What failed: counts by status, and one example error per status."""
    failed = [o for o in outcomes if not succeeded(o)]
    counts = Counter(str(o.status) for o in failed)
    examples: dict[str, str] = {}
    for o in failed:
        if o.error and str(o.status) not in examples:
            examples[str(o.status)] = o.error
    lines = [", ".join(f"{status}: {n}" for status, n in counts.most_common())]
    lines += [f"  e.g. {status}: {error}" for status, error in examples.items()]
    return "\n".join(lines)


async def closed_loop(work: Workload, clients: int, seconds: float, share: float
                      ) -> tuple[float, list[Outcome]]:
    """Completed requests per second with `clients` closed-loop clients, and the outcomes."""
    done: list[Outcome] = []
    rng = random.Random(clients)
    deadline = time.perf_counter() + seconds

    async def loop(client: httpx.AsyncClient, c: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            i += 1
            done.append(await one_request(client, work, pick_kind(rng, share), c * 100_000 + i))

    started = time.perf_counter()
    async with client_for(work) as client:
        await asyncio.gather(*(loop(client, c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return sum(succeeded(o) for o in done) / elapsed, done


async def measure_capacity(work: Workload, levels: list[int], seconds: float, share: float) -> float:
    """The best completed-request rate of the sweep; 0 (and what failed, printed) when a level
    completes no request at all: a wrong model or key fails the same way at every level."""
    best, flat = 0.0, 0
    print(f"capacity sweep ({seconds:g} s per level): clients -> completed requests/s")
    for clients in levels:
        rate, outcomes = await closed_loop(work, clients, seconds, share)
        print(f"  {clients:4d} -> {rate:7.2f}")
        if not any(succeeded(o) for o in outcomes):
            print(f"no request completed with {clients} client(s); {len(outcomes)} failed: "
                  f"{failure_summary(outcomes)}")
            return 0.0
        # NOTE: a level finishes only a few long requests, so one level's rate is noisy;
        # saturation is two levels in a row that do not beat the best by 10%.
        flat = flat + 1 if rate < best * 1.1 else 0
        best = max(best, rate)
        if flat == 2:
            break
    print(f"capacity: {best:.2f} requests/s")
    return best


# ---- the overload run ----------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def sample_rss(pid: int, every: float, stop: asyncio.Event, samples: list[tuple[float, int]]) -> None:
    started = time.perf_counter()
    while not stop.is_set():
        try:
            samples.append((time.perf_counter() - started, rss_bytes(pid)))
        except (OSError, RuntimeError):
            return                # the process is gone; "server stays up" reports it
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def overload(work: Workload, rate: float, duration: float, share: float, pid: int | None,
                   rss_every: float, seed: int, records: TextIO | None = None
                   ) -> tuple[list[Outcome], list[tuple[float, int]]]:
    """The open-loop run; each request's outcome is written to `records` (a JSON line, flushed)
    as it ends, so a run that dies keeps what it measured."""
    rng = random.Random(seed)
    stop = asyncio.Event()
    samples: list[tuple[float, int]] = []
    sampler = asyncio.ensure_future(sample_rss(pid, rss_every, stop, samples)) if pid else None
    tasks: list[asyncio.Task] = []

    async def one(client: httpx.AsyncClient, kind: str, i: int) -> Outcome:
        outcome = await one_request(client, work, kind, i)
        if records is not None:
            records.write(json.dumps(asdict(outcome)) + "\n")
            records.flush()
        return outcome

    async with client_for(work) as client:
        started = time.perf_counter()
        next_at, i = 0.0, 0
        while next_at < duration:
            await asyncio.sleep(max(0.0, started + next_at - time.perf_counter()))
            i += 1
            tasks.append(asyncio.ensure_future(one(client, pick_kind(rng, share), i)))
            next_at += rng.expovariate(rate)            # Poisson arrivals: open loop
        outcomes = list(await asyncio.gather(*tasks))
    stop.set()
    if sampler is not None:
        await sampler
    return outcomes, samples


# ---- report --------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def rss_growth_percent(samples: list[tuple[float, int]]) -> float:
    """Median RSS of the last fifth of the run against the first fifth, in percent."""
    fifth = max(1, len(samples) // 5)
    first = statistics.median(r for _, r in samples[:fifth])
    last = statistics.median(r for _, r in samples[-fifth:])
    return (last - first) / first * 100


def rss_slope_mib_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 2:
        return 0.0
    times = [t for t, _ in samples]
    values = [r / 2**20 for _, r in samples]
    return statistics.linear_regression(times, values).slope * 60


def report(outcomes: list[Outcome], samples: list[tuple[float, int]], args: argparse.Namespace,
           server_up: bool) -> bool:
    print(f"\n{len(outcomes)} requests")
    for kind in (INTERACTIVE, BATCH):
        counts = Counter(str(o.status) for o in outcomes if o.kind == kind)
        print(f"  {kind:12s} " + ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())))
    if outcomes and not any(succeeded(o) for o in outcomes):
        print(f"no request completed; what failed: {failure_summary(outcomes)}")
    errors_5xx = [o for o in outcomes if isinstance(o.status, int) and o.status >= 500
                  and not (o.status == 503 and o.retry_after)]
    bad_rejections = [o for o in outcomes if o.status in (429, 503) and not o.retry_after]
    unfinished = [o for o in outcomes if not (o.status == 200 and o.complete) and o.status not in (429, 503)]
    slowest = max((o.total for o in outcomes), default=0.0)
    ttfts = [o.ttft for o in outcomes if o.kind == INTERACTIVE and o.status == 200 and o.ttft is not None]
    print(f"5xx other than 503 + Retry-After: {len(errors_5xx)}")
    print(f"429/503 without Retry-After: {len(bad_rejections)}")
    print(f"neither a full answer nor a rejection: {len(unfinished)}")
    print(f"longest time to an answer or a rejection: {slowest:.2f} s")
    print(f"interactive TTFT (admitted, n={len(ttfts)}): P50 {pct(ttfts, 50):.3f} s, P99 {pct(ttfts, 99):.3f} s")
    growth = float("nan")
    # NOTE: the server's KV pool is allocated at start but its pages are touched as blocks
    # are first used, so RSS climbs to the pool's size early in a run; a leak is growth
    # after that, so the criterion reads only samples past --rss-warmup.
    steady = [(t, r) for t, r in samples if t >= args.rss_warmup]
    if samples:
        rss = [r / 2**20 for _, r in samples]
        print(f"server RSS ({len(samples)} samples): start {rss[0]:.0f} MiB, min {min(rss):.0f} MiB, "
              f"max {max(rss):.0f} MiB, end {rss[-1]:.0f} MiB")
    if len(steady) >= 5:
        growth = rss_growth_percent(steady)
        steady_mib = [r / 2**20 for _, r in steady]
        print(f"  after the first {args.rss_warmup:g} s: {min(steady_mib):.0f}-{max(steady_mib):.0f} MiB, "
              f"slope {rss_slope_mib_per_min(steady):+.2f} MiB/min, last fifth vs first {growth:+.1f}%")
    samples = steady
    checks = {
        "the server stays up": server_up,
        f"every request ends in a full answer or 429/503 with Retry-After within {args.answer_bound:g} s":
            not unfinished and not bad_rejections and slowest <= args.answer_bound,
        f"P99 interactive TTFT under {args.ttft_bound:g} s": bool(ttfts) and pct(ttfts, 99) < args.ttft_bound,
        f"RSS flat within {args.rss_growth:g}%": (abs(growth) <= args.rss_growth) if samples else None,
        "zero 5xx (503 + Retry-After is a rejection, not an error)": not errors_5xx,
    }
    passed = True
    for name, ok in checks.items():
        print(f"{'SKIP (no --pid)' if ok is None else 'PASS' if ok else 'FAIL'}: {name}")
        passed = passed and ok is not False
    return passed


def server_is_up(url: str, pid: int | None) -> bool:
    if pid is not None and not Path(f"/proc/{pid}").exists():
        return False
    try:
        return httpx.get(url + "/health", timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:11434")
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of overload (default 600)")
    parser.add_argument("--rate", type=float, default=None,
                        help="capacity in requests/s (default: measured by a closed-loop sweep)")
    parser.add_argument("--multiple", type=float, default=2.0, help="arrival rate as a multiple of capacity")
    parser.add_argument("--sweep", default="1,2,4,8,16,32,64", help="closed-loop client counts to try")
    parser.add_argument("--sweep-seconds", type=float, default=20.0)
    parser.add_argument("--interactive-key", default=None, help="API key of the interactive clients")
    parser.add_argument("--batch-key", default=None, help="API key of the batch clients")
    parser.add_argument("--interactive-share", type=float, default=0.5, help="fraction of arrivals that are interactive")
    parser.add_argument("--interactive-max-tokens", type=int, default=32)
    parser.add_argument("--batch-max-tokens", type=int, default=256)
    parser.add_argument("--pid", type=int, default=None, help="the server's process id, for RSS samples (Linux)")
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--ttft-bound", type=float, default=2.0, help="P99 interactive TTFT limit, seconds")
    parser.add_argument("--rss-growth", type=float, default=10.0, help="allowed RSS growth, percent")
    parser.add_argument("--rss-warmup", type=float, default=120.0,
                        help="seconds of the run before RSS must be flat (the KV pool's pages are touched)")
    parser.add_argument("--answer-bound", type=float, default=300.0,
                        help="longest acceptable time to an answer or a rejection, seconds")
    parser.add_argument("--records", type=Path, default=None,
                        help="write one JSON line per request of the overload run here, as each ends")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Workload(args.url.rstrip("/"), args.model,
                    {INTERACTIVE: args.interactive_key, BATCH: args.batch_key},
                    {INTERACTIVE: args.interactive_max_tokens, BATCH: args.batch_max_tokens},
                    args.answer_bound)
    capacity = args.rate or asyncio.run(measure_capacity(
        work, [int(c) for c in args.sweep.split(",")], args.sweep_seconds, args.interactive_share))
    if capacity <= 0:
        print("FAIL: no capacity to overload: no request completed in the capacity sweep "
              "(check --url, --model and the keys)")
        raise SystemExit(2)
    rate = capacity * args.multiple
    print(f"\noverload: {rate:.2f} arrivals/s ({args.multiple:g} x {capacity:.2f}) for {args.duration:g} s, "
          f"{args.interactive_share:.0%} interactive")
    records = args.records.open("w") if args.records else None
    try:
        outcomes, samples = asyncio.run(overload(work, rate, args.duration, args.interactive_share,
                                                 args.pid, args.rss_every, args.seed, records))
    finally:
        if records is not None:
            records.close()
    passed = report(outcomes, samples, args, server_is_up(work.url, args.pid))
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
