"""What happens inside an in-process AsyncEngine while a benchmark runs: the evidence behind
its inter-token latencies (benchmarks/engine_bench.py --trace).

Records, with perf_counter times:
- every engine step: its duration, tokens, prefill tokens beside decodes, preemptions;
- every garbage collection (gc.callbacks): generation, duration, and the thread it stopped;
- the asyncio loop's lag: how late a 5 ms sleep wakes up (the loop shares the GIL and the
  two cores with the engine thread).
`summary()` condenses one window (a concurrency level) into figures, and names the slowest
steps with what they held.
"""
from __future__ import annotations

import asyncio
import gc
import resource
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Step:
    start: float
    end: float
    tokens: int
    prefill_tokens: int
    decodes: int
    preempted: int
    cpu: float          # the engine thread's own CPU time in the step (not its OpenMP workers')
    switches: int       # times the OS took the core from the engine thread during the step


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)
    collections: list[tuple[float, float, int, str]] = field(default_factory=list)
    lags: list[tuple[float, float]] = field(default_factory=list)
    _gc_start: float = 0.0

    def attach(self, engine) -> None:
        """Wraps the engine core's step and hooks the collector (the benchmark's process only)."""
        core = engine.core
        original_step, original_schedule = core.step, core.scheduler.schedule
        last = {}

        def schedule():
            out = original_schedule()
            last["out"] = out
            return out

        def step():
            before = resource.getrusage(resource.RUSAGE_THREAD)
            started = time.perf_counter()
            outputs = original_step()
            ended = time.perf_counter()
            out = last.pop("out", None)
            if out is not None and out.scheduled:
                after = resource.getrusage(resource.RUSAGE_THREAD)
                prefill = sum(s.num_new_tokens for s in out.scheduled if s.num_new_tokens > 1)
                decodes = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
                cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                self.steps.append(Step(started, ended, out.num_batched_tokens, prefill, decodes,
                                       len(out.preempted), cpu, after.ru_nivcsw - before.ru_nivcsw))
            return outputs

        core.scheduler.schedule = schedule
        core.step = step
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.collections.append((self._gc_start, time.perf_counter(), info["generation"],
                                     threading.current_thread().name))

    async def watch_loop(self, stop: asyncio.Event, period: float = 0.005) -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(period)
            self.lags.append((before, time.perf_counter() - before - period))

    def summary(self, since: float, until: float, top: int = 5) -> dict:
        steps = [s for s in self.steps if since <= s.start <= until]
        gcs = [c for c in self.collections if since <= c[0] <= until]
        lags = sorted(lag for t, lag in self.lags if since <= t <= until)
        durations = sorted(s.end - s.start for s in steps)
        decode_only = sorted(s.end - s.start for s in steps if not s.prefill_tokens)
        with_prefill = sorted(s.end - s.start for s in steps if s.prefill_tokens)

        def gc_in(step: Step) -> float:
            return sum(min(b, step.end) - max(a, step.start) for a, b, _, _ in gcs
                       if a < step.end and b > step.start)

        slowest = sorted(steps, key=lambda s: s.start - s.end)[:top]
        return {
            "steps": len(steps),
            "step_p50_ms": _pct(durations, 50) * 1e3, "step_p99_ms": _pct(durations, 99) * 1e3,
            "step_max_ms": (durations[-1] if durations else float("nan")) * 1e3,
            "decode_only_p50_ms": _pct(decode_only, 50) * 1e3,
            "decode_only_p99_ms": _pct(decode_only, 99) * 1e3,
            "steps_with_prefill": len(with_prefill),
            "with_prefill_p50_ms": _pct(with_prefill, 50) * 1e3,
            "with_prefill_max_ms": (with_prefill[-1] if with_prefill else float("nan")) * 1e3,
            "preemptions": sum(s.preempted for s in steps),
            "gc_count_by_gen": [sum(1 for c in gcs if c[2] == g) for g in range(3)],
            "gc_total_ms": sum(b - a for a, b, _, _ in gcs) * 1e3,
            "gc_max_ms": max((b - a for a, b, _, _ in gcs), default=0.0) * 1e3,
            "loop_lag_p50_ms": _pct(lags, 50) * 1e3, "loop_lag_p99_ms": _pct(lags, 99) * 1e3,
            "loop_lag_max_ms": (lags[-1] if lags else float("nan")) * 1e3,
            "cpu_share": sum(s.cpu for s in steps) / max(1e-9, sum(s.end - s.start for s in steps)),
            "involuntary_switches": sum(s.switches for s in steps),
            "slowest_steps": [{"ms": round((s.end - s.start) * 1e3, 1), "tokens": s.tokens,
                               "cpu_ms": round(s.cpu * 1e3, 1), "switches": s.switches,
                               "prefill": s.prefill_tokens, "decodes": s.decodes,
                               "preempted": s.preempted, "gc_ms": round(gc_in(s) * 1e3, 1)}
                              for s in slowest],
        }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def format_summary(name: str, s: dict) -> str:
    lines = [(f"  {name}: {s['steps']} steps, step P50 {s['step_p50_ms']:.1f} P99 {s['step_p99_ms']:.1f} "
             f"max {s['step_max_ms']:.1f} ms (decode-only P50 {s['decode_only_p50_ms']:.1f} P99 "
             f"{s['decode_only_p99_ms']:.1f}; {s['steps_with_prefill']} with prefill: P50 "
             f"{s['with_prefill_p50_ms']:.1f} max {s['with_prefill_max_ms']:.1f}); preemptions "
             f"{s['preemptions']}; gc by generation {s['gc_count_by_gen']} total "
             f"{s['gc_total_ms']:.1f} ms max {s['gc_max_ms']:.1f} ms; loop lag P50 "
             f"{s['loop_lag_p50_ms']:.1f} P99 {s['loop_lag_p99_ms']:.1f} max {s['loop_lag_max_ms']:.1f} ms; "
             f"engine thread on CPU {s['cpu_share']:.0%} of step time, "
             f"{s['involuntary_switches']} involuntary switches")]
    lines.append("    slowest steps: " + "; ".join(
        f"{x['ms']} ms ({x['tokens']} tok, {x['prefill']} prefill, {x['decodes']} dec, "
        f"cpu {x['cpu_ms']} ms, {x['switches']} sw"
        + (f", {x['preempted']} preempted" if x["preempted"] else "")
        + (f", gc {x['gc_ms']} ms" if x["gc_ms"] else "") + ")" for x in s["slowest_steps"]))
    return "\n".join(lines)
