#!/usr/bin/env python3
"""Decode steps of N streams with and without the packed linears' pre-unpacked AMX copies,
interleaved in one process (issue 18: 32 streams).

Variants of one loaded fast-mode engine (SmolLM2-135M Q4_1 by default), switched between
short rounds so that a busy machine's drift hits all alike:
- unpacking: every AMX call unpacks the tiles it reads from the packed ones (before);
- copies:    PackedLinear.use_kernels' default: the Q8_0 weights read their copies (this
             model's output head), the Q4 ones unpack;
- q4 too:    the Q4 weights read copies as well (twice their bytes: the choice not made).
Each round starts N requests with short prompts, steps through their prefill, then times
--steps decode steps of the N streams. Every variant gives the same bits (tests/model/
test_packed_linear.py), so only time differs. Also printed: RSS after switching to each.

    python benchmarks/decode_step_ab.py --streams 16,32 --rounds 10
"""
from __future__ import annotations

import argparse
import statistics
import time

from shoal.core.openmp import set_openmp_defaults

set_openmp_defaults()   # as `shoal` does, before torch loads libgomp

from shoal.core.config import EngineConfig
from shoal.core.sampling_params import SamplingParams
from shoal.engine.builder import build_engine_core
from shoal.model.layers.packed import PackedLinear


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def use(model, kernels, variant: str) -> None:
    """Switches the model's packed linears to `variant` (the engine is idle)."""
    model.enable_fused_int8(kernels, amx_unpacked=variant != "unpacking")
    if variant == "q4 too":
        # NOTE: before the next step, which builds the new layer stack's table
        for linear in model.modules():
            if isinstance(linear, PackedLinear) and linear.unpacked is None:
                linear.unpacked = kernels.packed_unpack(linear.ggml_type, linear.tiles,
                                                        linear.out_features, linear.in_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M Q4_1")
    parser.add_argument("--streams", default="16,32")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
    args = parser.parse_args()
    levels = [int(n) for n in args.streams.split(",")]
    core, _ = build_engine_core(EngineConfig.from_env(model=args.model, compute="fast",
                                                      max_num_seqs=max(levels)))
    model, kernels = core.runner.model, core.runner.kernels
    if kernels is None or not kernels.int8_gemm_ready:
        raise SystemExit("needs the C++ kernels on a CPU with AMX")
    variants = ("unpacking", "copies", "q4 too")
    for variant in variants:
        use(model, kernels, variant)
        print(f"{variant:9s} RSS after switching {rss_mb():.0f} MB")
    steps: dict[tuple[int, str], list[float]] = {(n, v): [] for n in levels for v in variants}
    count = 0
    for _ in range(args.rounds):
        for n in levels:
            for variant in variants:
                use(model, kernels, variant)
                ids = []
                for i in range(n):
                    count += 1
                    ids.append(str(count))
                    prompt = core.tokenizer.encode(f"Story {count}: tell me about the sea.")
                    core.add_request(ids[-1], prompt, SamplingParams(
                        max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True))
                for _ in range(3):   # the prompts' prefill, then a plain decode step
                    core.step()
                for _ in range(args.steps):
                    started = time.perf_counter()
                    core.step()
                    steps[n, variant].append(time.perf_counter() - started)
                for request_id in ids:
                    core.abort_request(request_id)
    print(f"{args.rounds} rounds x {args.steps} decode steps per variant, interleaved")
    for n in levels:
        base = statistics.median(steps[n, variants[0]])
        for variant in variants:
            median = statistics.median(steps[n, variant])
            print(f"{n:3d} streams {variant:9s} step median {median * 1e3:6.2f} ms "
                  f"({n / median:6.1f} tok/s, {base / median:.3f}x unpacking's speed)")


if __name__ == "__main__":
    main()
