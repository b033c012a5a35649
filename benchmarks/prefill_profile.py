#!/usr/bin/env python3
"""Where one prompt's prefill goes: every C++ kernel call timed during a lone prompt.

Loads the default model in fast mode (--recipe packed or int8), wraps each method of the
kernels object (and torch._int_mm, the int8 recipe's GEMM) with a timer, and runs a random
--tokens-token prompt with one output token --reps times (a different first token each time,
so the prefix cache never answers). Prints the best run: the whole prefill and each kernel's
share; "other" is Python, the embedding and whatever no wrapper saw (the MLP's activation
quantizer is bound before the wrappers go on). Compare two checkouts by running it under
each, alternately (PYTHONPATH=<checkout>/src).

    OMP_NUM_THREADS=1 python benchmarks/prefill_profile.py --recipe packed --tokens 1000
"""
from __future__ import annotations

import argparse
import collections
import random
import time

import torch

from shoal.core.sampling_params import SamplingParams
from shoal.engine.llm import LLM
from shoal.model.kernels.cpu import CpuKernels, load_cpu_kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="packed", choices=("packed", "int8"))
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(None, compute="fast", fast_weights=args.recipe)
    times: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            times[name] += time.perf_counter() - start
            counts[name] += 1
            return out
        return wrapper

    ops = load_cpu_kernels()
    for name in dir(CpuKernels):
        if not name.startswith("_") and callable(getattr(CpuKernels, name)):
            setattr(ops, name, timed(name, getattr(ops, name)))
    torch._int_mm = timed("torch._int_mm", torch._int_mm)
    rng = random.Random(0)
    prompt = [rng.randrange(100, 40000) for _ in range(args.tokens)]
    params = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([prompt[:50]], params)   # warm-up
    best = None
    for rep in range(args.reps):
        prompt[0] = 100 + rep
        times.clear()
        counts.clear()
        start = time.perf_counter()
        llm.generate([prompt], params)
        elapsed = time.perf_counter() - start
        if best is None or elapsed < best[0]:
            best = (elapsed, dict(times), dict(counts))
    elapsed, best_times, best_counts = best
    print(f"{args.recipe}: {args.tokens}-token prefill {elapsed * 1e3:.0f} ms, "
          f"{torch.get_num_threads()} thread(s)")
    for name, seconds in sorted(best_times.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {seconds * 1e3:8.1f} ms  {best_counts[name]:5d} calls")
    print(f"  {'other':28s} {(elapsed - sum(best_times.values())) * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
