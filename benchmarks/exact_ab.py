"""Exact mode's decode step, three ways, interleaved in one process (issue 18, target 4).

Variants of the same loaded exact-mode (float32) engine, switched between short rounds so a
busy machine's drift hits all alike:
- mkl:    the per-op Python path with torch's F.linear (MKL sgemm): exact mode as the issue
          found it;
- kernel: the per-op path with every linear through kernels/csrc/f32_linear.cpp;
- stack:  the layers in one C++ call (decoder_stack.cpp's float32 variant), the default.
Each round starts N streams (short prompts), then times decode steps of all N together;
tok/s = N / step time. Also printed: the float32 weight bytes a step reads and the bandwidth
that implies, against a plain two-thread read of the same weights (the roofline).

    python benchmarks/exact_ab.py --streams 1,32 --rounds 6
"""
from __future__ import annotations

import argparse
import time

from shoal.core.openmp import set_openmp_defaults

set_openmp_defaults()   # as `shoal` does, before torch loads libgomp

import torch

from shoal.core.config import EngineConfig
from shoal.core.sampling_params import SamplingParams
from shoal.engine.builder import build_engine_core
from shoal.model.layers.linear import ExactLinear


def read_bandwidth(weights: list[torch.Tensor], rounds: int = 5) -> float:
    """GB/s of the fastest plain two-thread read that torch offers here of as many bytes as
    the weights, in one buffer: a sum, or MKL's matrix-vector product (which streams one big
    matrix near the memory's speed). How fast this machine streams those bytes when nothing
    else is computed; per-matrix reads of the model's 121 weights run slower (call overheads)."""
    width = weights[0].shape[1]
    rows = sum(w.numel() for w in weights) // width
    flat = torch.randn(rows, width)
    vector = torch.randn(width)
    best = float("inf")
    for read in (flat.sum, lambda: torch.mv(flat, vector)):
        for _ in range(rounds):
            started = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - started)
    return flat.numel() * 4 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M Q4_1 (dequantized)")
    parser.add_argument("--streams", default="1,32")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12, help="decode steps timed per round")
    args = parser.parse_args()
    core, _ = build_engine_core(EngineConfig.from_env(model=args.model, compute="exact"))
    model, kernels = core.runner.model, core.runner.kernels
    if model.stack is None or kernels is None:
        raise SystemExit("needs the C++ kernels and a model of a plain pre-norm family")
    linears = [m for m in model.modules() if isinstance(m, ExactLinear)]
    stack = model.stack

    def use(variant: str) -> None:
        model.stack = stack if variant == "stack" else None
        for linear in linears:
            linear.kernels = None if variant == "mkl" else kernels

    variants = ("mkl", "kernel", "stack")
    levels = [int(n) for n in args.streams.split(",")]
    times = {(v, n): [] for v in variants for n in levels}
    count = 0
    for _ in range(args.rounds):
        for n in levels:
            for variant in variants:
                use(variant)
                ids = []
                for _ in range(n):
                    count += 1
                    ids.append(str(count))
                    core.add_request(ids[-1], core.tokenizer.encode(f"Story {count}: once upon a time"),
                                     SamplingParams(max_tokens=args.steps + 8, temperature=0.0,
                                                    ignore_eos=True))
                while core.num_waiting:     # every prompt prefilled before timing
                    core.step()
                for _ in range(3):
                    core.step()
                for _ in range(args.steps):
                    started = time.perf_counter()
                    core.step()
                    times[(variant, n)].append(time.perf_counter() - started)
                for request_id in ids:
                    core.abort_request(request_id)
    use("stack")
    weight_bytes = sum(m.weight.numel() * 4 for m in linears)
    print(f"{args.rounds} rounds x {args.steps} decode steps per variant and level, interleaved; "
          f"{weight_bytes / 1e6:.0f} MB of float32 weights per step")
    roofline = read_bandwidth([m.weight for m in linears])
    print(f"roofline: a two-thread read of those weights runs at {roofline:.1f} GB/s "
          f"({roofline * 1e9 / weight_bytes:.1f} tok/s at one stream)")
    for n in levels:
        for variant in variants:
            steps = sorted(times[(variant, n)])
            median = steps[len(steps) // 2]
            print(f"{n:3d} streams  {variant:6s}  step median {median * 1e3:7.2f} ms  "
                  f"{n / median:7.1f} tok/s  weights at {weight_bytes / median / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
