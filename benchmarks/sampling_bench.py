#!/usr/bin/env python3
"""What random sampling costs a decode step: the kernels' sampler alone, and 32 streams.

(1) `CpuKernels.sample_rows` over R rows of a 49,152-token vocabulary shaped as a model's
    next-token logits (a few likely tokens over a long tail), per setting: milliseconds per
    call (the median of --repeats timings of 20 calls).
(2) The default model decoding --streams streams in-process (EngineCore, fast mode) at each
    temperature in --temperatures (top_p 0.9 for the non-zero ones): tokens/s and the step
    time, medians of 3 rounds of 60 steps.

To compare two checkouts, run it under each, alternately (PYTHONPATH=<checkout>/src).

    python benchmarks/sampling_bench.py [--rows 32] [--streams 32] [--temperatures 0,0.8]
"""
from __future__ import annotations

import argparse
import statistics
import time

from shoal.core.openmp import set_openmp_defaults

SETTINGS = {   # name: (temperature, top_k, top_p, min_p)
    "T 1.0 (OpenAI's default)": (1.0, 0, 1.0, 0.0),
    "T 0.8, top_p 0.9 (Ollama's default)": (0.8, 0, 0.9, 0.0),
    "T 0.7, top_k 40, top_p 0.95": (0.7, 40, 0.95, 0.0),
    "T 1.0, min_p 0.05": (1.0, 0, 1.0, 0.05),
}


def sampler_alone(rows: int, repeats: int) -> None:
    import torch

    from shoal.model.kernels.cpu import load_cpu_kernels

    ops = load_cpu_kernels()
    if ops is None:
        raise SystemExit("the C++ kernels could not be built here")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, 49152, generator=g)
    for r in range(rows):
        logits[r, torch.randint(0, 49152, (20,), generator=g)] += 10.0
    bits = torch.randint(0, 1 << 31, (rows,), generator=g)
    # NOTE: the per-call time of one build was bimodal across processes here (~5 or ~9 ms for
    # the same rows and settings): compare settings by their ratio to the first, in one process.
    print(f"| sampler, {rows} rows x 49,152 | ms per call (median of {repeats}) | vs the first |\n"
          "|---|---|---|")
    first = None
    for name, (temperature, top_k, top_p, min_p) in SETTINGS.items():
        args = (torch.full((rows,), temperature), torch.full((rows,), top_k, dtype=torch.int64),
                torch.full((rows,), top_p, dtype=torch.float64), torch.full((rows,), min_p), bits)
        ops.sample_rows(logits, *args)
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(20):
                ops.sample_rows(logits, *args)
            timings.append((time.perf_counter() - started) / 20 * 1e3)
        ms = statistics.median(timings)
        first = first or ms
        print(f"| {name} | {ms:.2f} | {ms / first:.2f}x |")


def decoding(streams: int, temperature: float) -> tuple[float, float]:
    from shoal.core.config import EngineConfig
    from shoal.core.sampling_params import SamplingParams
    from shoal.engine.builder import build_engine_core

    core, _ = build_engine_core(EngineConfig.from_env(model=None, compute="fast"))
    rates, steps_ms = [], []
    n = 0
    for _ in range(3):
        for _ in range(streams):
            n += 1
            core.add_request(str(n), core.tokenizer.encode(f"Story {n}: tell me about a cat"),
                             SamplingParams(max_tokens=100, temperature=temperature, top_p=0.9,
                                            ignore_eos=True))
        while core.num_waiting:
            core.step()
        started = time.perf_counter()
        for _ in range(60):
            core.step()
        seconds = time.perf_counter() - started
        rates.append(60 * streams / seconds)
        steps_ms.append(seconds / 60 * 1e3)
        while core.has_unfinished_requests():
            core.step()
    core.close()
    return statistics.median(rates), statistics.median(steps_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--temperatures", default="0,0.8")
    args = parser.parse_args()
    set_openmp_defaults()      # as the `shoal` command does, before torch loads libgomp
    sampler_alone(args.rows, args.repeats)
    print(f"\n| {args.streams} streams, temperature | tok/s | step ms |\n|---|---|---|")
    for temperature in (float(t) for t in args.temperatures.split(",")):
        rate, step = decoding(args.streams, temperature)
        print(f"| {temperature:g}{', top_p 0.9' if temperature else ' (greedy)'} | {rate:.0f} | {step:.1f} |")


if __name__ == "__main__":
    main()
