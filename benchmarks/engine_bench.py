#!/usr/bin/env python3
"""Side-by-side engine benchmark: shoal's engine vs an OpenAI-compatible peer server.

Closed loop: at each concurrency level, C clients each keep one streaming request in
flight; every request has a short, distinct prompt and asks for exactly
--max-tokens tokens (ignore_eos). Levels are interleaved across targets so machine
drift hits all alike. Also measured: time to first token of a lone long prompt, the
largest inter-token gap of 8 running streams while a long prompt arrives, a prefill burst
(--burst prompts of ~--burst-tokens tokens at once, --burst-max-tokens each: requests/s and
TTFT), and peak RSS. With --freeze-others, every other target that has a pid (--peer-pid: the
process and its children) is stopped (SIGSTOP) while one target is measured, and continued
after: one server at a time, as the issues' tables are measured, with levels still
interleaved; an idle server's own wake-ups then take nothing from the one measured.
`--ab-kernels OLD.so` runs every shoal measurement twice, with the
C++ kernels of an earlier build (before) and then this checkout's (after), interleaved.

shoal runs in-process through AsyncEngine, its client in the same process; for the same
client over HTTP, pass a `shoal serve` as a peer and --skip-shoal (as the issue 18 runs do).
Peers are reached over HTTP on loopback. Prints a table and writes JSON. `--fast-weights
packed,int8` runs one shoal engine per fast-mode weight recipe, levels interleaved, to
compare them (their peak RSS is the process's, shared: benchmarks/load_memory.py measures
each alone).

    python benchmarks/engine_bench.py --levels 1,4,16,32 \
        --peer llamacpp=http://127.0.0.1:8081 --peer-pid llamacpp=$(pgrep -f bin/llama-server) \
        --peer vllm=http://127.0.0.1:8082
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.core.openmp import set_openmp_defaults

set_openmp_defaults()   # as `shoal serve` runs, before torch loads libgomp

from step_trace import format_summary

TOPICS = ["the sea", "a violin", "volcanoes", "bread", "winter", "a lighthouse", "chess", "bees",
          "the moon", "rivers", "clocks", "trains", "mountains", "paper", "gardens", "rain",
          "owls", "glass", "maps", "salt", "bridges", "comets", "wool", "tea", "copper", "ferns",
          "kites", "deserts", "coral", "lanterns", "foxes", "markets"]


def short_prompt(i: int) -> str:
    return f"Request {i}: write a long, detailed story about {TOPICS[i % len(TOPICS)]}."


# NOTE: a per-run salt at the start of every long prompt, so no server (vLLM keeps its
# prefix cache across runs) answers a repeated prompt from cache.
RUN_SALT = os.urandom(4).hex()


_long_ids = itertools.count(100)


def fresh_long_prompt(approx_tokens: int) -> str:
    """A long prompt no earlier request shares a prefix with (A/B runs repeat each check)."""
    return long_prompt(next(_long_ids), approx_tokens)


def long_prompt(i: int, approx_tokens: int) -> str:
    """~approx_tokens tokens for SmolLM2's tokenizer (about 30 per sentence)."""
    sentence = (f"Note {i}: the committee reviewed section {{}} of the harbour plan, weighing "
                "costs, tides, shipping schedules and the concerns of local fishermen. ")
    parts, n = [f"Meeting {RUN_SALT}-{i}. "], 0
    while n < approx_tokens:
        parts.append(sentence.format(len(parts)))
        n += 30
    return "".join(parts) + "Summarise the discussion."


@dataclass
class RequestRecord:
    ttft: float
    itls: list[float]
    tokens: int
    e2e: float


@dataclass
class LevelResult:
    target: str
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    tok_per_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    itl_max: float
    extra: dict = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q / 100 * (len(values) - 1)))))
    return values[k]


# ---- targets ------------------------------------------------------------------------------
class ShoalTarget:
    name = "shoal"

    def __init__(self, args: argparse.Namespace, fast_weights: str | None = None) -> None:
        from shoal.core.config import EngineConfig
        from shoal.engine.async_engine import AsyncEngine

        config = EngineConfig.from_env(model=args.model, compute=args.compute,
                                       max_num_seqs=max([64, *args.levels]),
                                       fast_weights=fast_weights)
        started = time.monotonic()
        self.engine = AsyncEngine.from_config(config)
        self.load_s = time.monotonic() - started
        self.counter = 0
        self.name = f"shoal-{args.compute}" + (f"-{fast_weights}" if fast_weights else "")
        self.compute = args.compute
        self.trace = None
        if args.trace:
            from step_trace import Trace

            self.trace = Trace()
            self.trace.attach(self.engine)

    def tokens(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text)

    def use_kernel_library(self, path: str | None) -> None:
        """Fast mode: every C++ kernel from the library at `path` (a build of an earlier
        checkout: before) or this checkout's (None: after), switched between measurements.
        The libraries share one C interface; the engine is idle while it switches."""
        from shoal.model.kernels.cpu import CpuKernels, load_cpu_kernels

        ops = load_cpu_kernels()
        if path is not None:
            if getattr(self, "_old_kernels", None) is None:
                self._old_kernels = CpuKernels(Path(path), ops.isa)
            ops = self._old_kernels
        runner = self.engine.core.runner
        runner.kernels = ops
        runner.model.enable_fused_int8(ops)
        self.name = f"shoal-{self.compute}" + ("-before" if path else "")

    def use_variant(self, variant: object, args: argparse.Namespace) -> None:
        if args.ab_f32_kernel:
            self.use_f32_kernel(bool(variant))
        elif args.ab_kernels:
            self.use_kernel_library(None if variant else args.ab_kernels)

    def use_f32_kernel(self, on: bool) -> None:
        """Exact mode: float32 linears through the C++ kernel (on) or MKL's sgemm (off, the
        path before it), switched between levels for a before/after in one run."""
        from shoal.model.kernels.cpu import load_cpu_kernels
        from shoal.model.layers.linear import ExactLinear

        kernels = load_cpu_kernels() if on else None
        for module in self.engine.core.runner.model.modules():
            if isinstance(module, ExactLinear):
                module.kernels = kernels
        self.name = f"shoal-{self.compute}" + ("" if on else "-sgemm")

    async def stream(self, prompt: str, max_tokens: int) -> RequestRecord:
        from shoal import SamplingParams
        from shoal.engine.events import Update

        self.counter += 1
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        times: list[float] = []
        count = 0
        async for event in self.engine.generate(f"b{self.counter}", self.tokens(prompt), params):
            if not isinstance(event, Update):
                continue
            for out in event.outputs:
                if out.token_ids:
                    times.append(time.perf_counter())
                    count += len(out.token_ids)
        return RequestRecord(times[0] - start, [b - a for a, b in zip(times, times[1:])], count,
                             times[-1] - start)

    def rss_peak_mb(self) -> float:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    async def close(self) -> None:
        self.engine.shutdown()


class _CompletionEvents:
    """One streamed /v1/completions answer's events, read the same way whichever client got
    them: a token's arrival time per event with text, the count from the usage event."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.times: list[float] = []
        self.usage_tokens: int | None = None

    def note(self, event: dict, arrived: float) -> None:
        if event.get("usage"):
            self.usage_tokens = event["usage"].get("completion_tokens")
        choices = event.get("choices") or []
        if choices and choices[0].get("text"):
            self.times.append(arrived)

    def record(self) -> RequestRecord:
        times = self.times
        tokens = self.usage_tokens if self.usage_tokens is not None else len(times)
        return RequestRecord(times[0] - self.start, [b - a for a, b in zip(times, times[1:])],
                             tokens, times[-1] - self.start)


class PeerTarget:
    """Any OpenAI-compatible server over HTTP (llama.cpp's llama-server, vLLM, shoal serve).

    The client is lean_http's by default: on a 2-core machine the benchmark's clients share
    the servers' cores, and 32 httpx streams took 0.05 of a core at 318 tok/s, lean_http's
    0.02-0.03 at 660-730 (this process's CPU, printed per level): CPU the server under test
    gets back. `httpx` is kept for comparison (--client httpx)."""

    def __init__(self, name: str, url: str, model: str, pid: int | None,
                 client: str = "lean") -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.model = model
        self.pid = pid
        self.client = None
        if client == "httpx":
            import httpx

            # NOTE: no keep-alive: llama-server closes idle connections, and a reused, closed
            # one fails the next request ("server disconnected") through no fault of the server.
            self.client = httpx.AsyncClient(timeout=600, limits=httpx.Limits(
                max_connections=256, max_keepalive_connections=0))

    def body(self, prompt: str, max_tokens: int) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "temperature": 0, "ignore_eos": True, "cache_prompt": False,
                "stream_options": {"include_usage": True}}

    async def stream(self, prompt: str, max_tokens: int) -> RequestRecord:
        tokens = _CompletionEvents(time.perf_counter())
        if self.client is None:
            import orjson
            from lean_http import post_events

            def on_event(event: bytes, arrived: float) -> None:
                if event.startswith(b"data: ") and event != b"data: [DONE]":
                    tokens.note(orjson.loads(event[6:]), arrived)

            await post_events(self.url, "/v1/completions",
                              orjson.dumps(self.body(prompt, max_tokens)), on_event)
            return tokens.record()
        async with self.client.stream("POST", f"{self.url}/v1/completions",
                                      json=self.body(prompt, max_tokens)) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    tokens.note(json.loads(line[6:]), time.perf_counter())
        return tokens.record()

    def rss_peak_mb(self) -> float:
        if not self.pid:
            return float("nan")
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (vLLM serves from a child process)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


_STOPPED: set[int] = set()


def _continue_all() -> None:
    for pid in list(_STOPPED):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        _STOPPED.discard(pid)


atexit.register(_continue_all)   # a failed run must not leave a peer stopped


@contextlib.contextmanager
def others_stopped(targets: list, current: object, enabled: bool):
    """Every target but `current` that has a pid, stopped for the block (--freeze-others)."""
    pids = [p for t in targets if enabled and t is not current and getattr(t, "pid", None)
            for p in process_tree(t.pid)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
        _STOPPED.add(pid)
    try:
        yield
    finally:
        _continue_all()


# ---- measurements ---------------------------------------------------------------------------
async def closed_loop(target, concurrency: int, requests_per_client: int, max_tokens: int,
                      offset: int) -> LevelResult:
    records: list[RequestRecord] = []
    errors: list[str] = []

    async def client(c: int) -> None:
        for r in range(requests_per_client):
            try:
                records.append(await target.stream(short_prompt(offset + c * 1000 + r), max_tokens))
            except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                errors.append(type(exc).__name__)

    start, cpu_start = time.perf_counter(), time.process_time()
    await asyncio.gather(*[client(c) for c in range(concurrency)])
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    extra_trace = _trace_window(target, start, start + wall)
    itls = [x for rec in records for x in rec.itls]
    ttfts = [rec.ttft for rec in records]
    tokens = sum(rec.tokens for rec in records)
    result = LevelResult(target.name, concurrency, len(records), wall, tokens, tokens / wall,
                         pct(ttfts, 50), pct(ttfts, 99), pct(itls, 50), pct(itls, 99),
                         max(itls, default=float("nan")))
    result.extra["errors"] = len(errors)
    # this process's CPU: the clients' for a server over HTTP (what they take from it on a
    # machine they share), the engine's too for in-process shoal
    result.extra["bench_process_cores"] = cpu / wall
    if extra_trace:
        result.extra["trace"] = extra_trace
    return result


def _trace_window(target, since: float, until: float) -> dict | None:
    trace = getattr(target, "trace", None)
    return trace.summary(since, until) if trace is not None else None


async def long_prompt_ttft(target, approx_tokens: int) -> float:
    rec = await target.stream(fresh_long_prompt(approx_tokens), 8)
    return rec.ttft


async def prefill_burst(target, prompts: int, approx_tokens: int, max_tokens: int) -> dict:
    """`prompts` distinct long prompts sent at once, `max_tokens` answer tokens each:
    completed requests per second and the spread of their first tokens (issue 18's prefill
    target: 8 prompts of ~1,000 tokens, 32-token answers)."""
    started = time.perf_counter()
    records = await asyncio.gather(*(target.stream(fresh_long_prompt(approx_tokens), max_tokens)
                                     for _ in range(prompts)))
    wall = time.perf_counter() - started
    ttfts = [r.ttft for r in records]
    return {"burst_requests_per_s": prompts / wall, "burst_wall_s": wall,
            "burst_ttft_p50_s": pct(ttfts, 50), "burst_ttft_p99_s": pct(ttfts, 99)}


async def long_prompt_during_streams(target, approx_tokens: int, streams: int = 8,
                                     stream_tokens: int = 1000) -> dict:
    """Largest gap between tokens of running streams while a long prompt is prefilled.

    The streams ask for many tokens and the long prompt arrives once they decode; the
    check below makes sure they were still running when its first token came back.
    """
    async def runner(i: int) -> RequestRecord:
        return await target.stream(short_prompt(5000 + i), stream_tokens)

    started = time.perf_counter()
    tasks = [asyncio.create_task(runner(i)) for i in range(streams)]
    await asyncio.sleep(1.5)   # let the streams reach steady decoding
    intruder_start = time.perf_counter()
    intruder_rec = await target.stream(fresh_long_prompt(approx_tokens), 8)
    intruder_first_token = intruder_start + intruder_rec.ttft
    records = await asyncio.gather(*tasks)
    ends = [started + r.e2e for r in records]
    if min(ends) < intruder_first_token:
        raise RuntimeError("streams ended before the long prompt was served: raise their length")
    result = {"max_gap_s": max(max(r.itls) for r in records if r.itls),
              "intruder_ttft_s": intruder_rec.ttft}
    # NOTE: the window of the prefill only: from the long prompt's arrival to its first token.
    window = _trace_window(target, intruder_start, intruder_first_token)
    if window:
        result["trace"] = window
    return result


async def main_async(args: argparse.Namespace) -> dict:
    targets = []
    if not args.skip_shoal:
        for recipe in args.fast_weights or [None]:
            targets.append(ShoalTarget(args, recipe))
            print(f"{targets[-1].name} loaded in {targets[-1].load_s:.2f}s", flush=True)
    pids = dict(spec.split("=", 1) for spec in args.peer_pid)
    for spec in args.peer:
        name, _, url = spec.partition("=")
        pid = pids.get(name)
        targets.append(PeerTarget(name, url, args.peer_model, int(pid) if pid else None,
                                  args.client))
    results: list[LevelResult] = []
    stop_watch = asyncio.Event()
    watchers = [asyncio.create_task(t.trace.watch_loop(stop_watch)) for t in targets
                if getattr(t, "trace", None) is not None]
    for t in targets:   # warm-up: kernels, caches, first-request paths
        with others_stopped(targets, t, args.freeze_others):
            await closed_loop(t, 2, 1, 16, offset=90000)
            if args.levels:
                # NOTE: and the top level once: a server's first 32 streams touch KV-cache
                # memory for the first time (shoal's RSS grew 215 MB there), which the level
                # then paid for (one run: 619 tok/s at 32 streams, TTFT P50 0.78 s; 778-807
                # warm)
                await closed_loop(t, max(args.levels), 1, 16, offset=95000)
    if not args.levels:
        print("no concurrency levels: long-prompt checks only")
    variants = (False, True) if args.ab_f32_kernel or args.ab_kernels else (None,)

    def runs():
        """(target, variant) pairs in the interleaved order, each target switched to its variant
        (and, with --freeze-others, the other targets stopped while it is measured)."""
        for t in targets:
            for v in (variants if isinstance(t, ShoalTarget) else (None,)):
                if v is not None:
                    t.use_variant(v, args)
                with others_stopped(targets, t, args.freeze_others):
                    yield t

    for level in args.levels:
        for t in runs():
            per_client = max(1, args.requests_per_level // level) if args.requests_per_level else 2
            res = await closed_loop(t, level, per_client, args.max_tokens, offset=level * 100)
            res.extra["rss_peak_mb"] = t.rss_peak_mb()
            results.append(res)
            print(f"{res.target:16s} c={level:3d} reqs={res.requests:3d} {res.tok_per_s:7.1f} tok/s  "
                  f"TTFT p50 {res.ttft_p50:6.3f}s p99 {res.ttft_p99:6.3f}s  ITL p50 "
                  f"{res.itl_p50 * 1e3:6.1f}ms p99 {res.itl_p99 * 1e3:6.1f}ms max "
                  f"{res.itl_max * 1e3:6.1f}ms  RSS {res.extra['rss_peak_mb']:.0f}MB"
                  f"  p99/p50 {res.itl_p99 / res.itl_p50:.2f}"
                  f"  bench CPU {res.extra['bench_process_cores']:.2f} cores"
                  f"{'  ERRORS %d' % res.extra['errors'] if res.extra['errors'] else ''}", flush=True)
            if "trace" in res.extra:
                print(format_summary(f"c={level}", res.extra["trace"]), flush=True)
    extras = {}
    for _ in range(args.long_rounds):
        if args.long_prompt_tokens:
            for t in runs():
                ex = extras.setdefault(t.name, {})
                ttft = await long_prompt_ttft(t, args.long_prompt_tokens)
                gap = await long_prompt_during_streams(t, 1000, stream_tokens=args.gap_stream_tokens)
                ex.setdefault("long_prompt_ttft_s", []).append(ttft)
                ex.setdefault("max_gap_s", []).append(gap["max_gap_s"])
                ex.setdefault("intruder_ttft_s", []).append(gap["intruder_ttft_s"])
                print(f"{t.name:16s} lone ~{args.long_prompt_tokens}-token prompt TTFT "
                      f"{ttft:.2f}s; 1000-token prompt during 8 streams: max gap "
                      f"{gap['max_gap_s']:.2f}s (its TTFT {gap['intruder_ttft_s']:.2f}s)", flush=True)
                if "trace" in gap:
                    print(format_summary("long prompt's prefill", gap["trace"]), flush=True)
        if args.burst:
            for t in runs():
                ex = extras.setdefault(t.name, {})
                burst = await prefill_burst(t, args.burst, args.burst_tokens, args.burst_max_tokens)
                for k, v in burst.items():
                    ex.setdefault(k, []).append(v)
                print(f"{t.name:16s} {args.burst} x ~{args.burst_tokens}-token prompts at once, "
                      f"{args.burst_max_tokens} tokens each: {burst['burst_requests_per_s']:.2f} req/s, "
                      f"TTFT p50 {burst['burst_ttft_p50_s']:.2f}s p99 {burst['burst_ttft_p99_s']:.2f}s",
                      flush=True)
    stop_watch.set()
    for w in watchers:
        await w
    for t in targets:
        extras.setdefault(t.name, {})["rss_peak_mb"] = t.rss_peak_mb()
        await t.close()
    return {"levels": [asdict(r) for r in results], "extras": extras,
            "settings": {k: v for k, v in vars(args).items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="shoal model (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--compute", default="fast", choices=("fast", "exact"))
    parser.add_argument("--levels", default="1,4,16,32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-level", type=int, default=0,
                        help="total requests per level (default: 2 per client)")
    parser.add_argument("--peer", action="append", default=[], help="NAME=URL of an OpenAI-compatible server")
    parser.add_argument("--peer-model", default="smollm2")
    parser.add_argument("--client", default="lean", choices=("lean", "httpx"),
                        help="the peers' HTTP client: lean_http's (default) or httpx")
    parser.add_argument("--peer-pid", action="append", default=[],
                        help="NAME=PID of a peer's server process, for its peak RSS")
    parser.add_argument("--long-prompt-tokens", type=int, default=1300)
    parser.add_argument("--burst", type=int, default=8,
                        help="long prompts sent at once for the prefill burst (0: skip it)")
    parser.add_argument("--burst-tokens", type=int, default=1000)
    parser.add_argument("--burst-max-tokens", type=int, default=32)
    parser.add_argument("--gap-stream-tokens", type=int, default=1000,
                        help="tokens each of the 8 streams asks for in the gap check (they must "
                             "outlast the long prompt's prefill; fewer make the check quicker)")
    parser.add_argument("--long-rounds", type=int, default=1,
                        help="repeat the long-prompt checks and the burst (interleaved A/B)")
    parser.add_argument("--ab-kernels", default="",
                        help="fast mode: run each shoal measurement with the kernel library at "
                             "this path (an earlier build: before) and then this checkout's")
    parser.add_argument("--skip-shoal", action="store_true")
    parser.add_argument("--freeze-others", action="store_true",
                        help="stop the other targets' processes (--peer-pid) while one is measured")
    parser.add_argument("--ab-f32-kernel", action="store_true",
                        help="exact mode: run each level with MKL's sgemm (before) and then the "
                             "C++ float32 kernel (after)")
    parser.add_argument("--trace", action="store_true",
                        help="shoal: time every engine step, garbage collection and the asyncio "
                             "loop's lag, and print each level's slowest steps (step_trace.py)")
    parser.add_argument("--fast-weights", default="",
                        help="comma-separated fast-mode weight recipes (packed, int8): one shoal "
                             "engine each, interleaved (default: SHOAL_FAST_WEIGHTS's one)")
    parser.add_argument("--json", default="bench-results/engine_bench.json")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    args.fast_weights = [x.strip() for x in args.fast_weights.split(",") if x.strip()]
    result = asyncio.run(main_async(args))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
