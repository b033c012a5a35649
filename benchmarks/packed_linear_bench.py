#!/usr/bin/env python3
"""Packed GGUF-block linears vs the int8 x int8 path, one kernel call at a time.

SmolLM2-135M's shapes (a Q4_1 gate/up 3072x576, a Q4_1 down 576x1536, the Q8_0 head
49152x576) with random blocks, at several batch sizes: the best of --reps calls of
`CpuKernels.packed_linear` (this CPU's variant: AMX tiles from 8 rows where the CPU has them)
against int8_linear_small (1-2 rows) or torch._int_mm + dequant_rows (more), as fast mode's
two recipes run them. Run with OMP_NUM_THREADS=1 for one core's figures.

    OMP_NUM_THREADS=1 python benchmarks/packed_linear_bench.py
"""
from __future__ import annotations

import argparse
import time

import torch

from shoal.model.kernels.cpu import load_cpu_kernels
from shoal.model.layers.packed import PACKED_TYPES, PackedLinear, PackedWeight

SHAPES = ((3, 3072, 576), (3, 576, 1536), (8, 49152, 576))   # (GGML type, out, in)


def random_packed(ggml_type: int, n: int, k: int) -> PackedWeight:
    _, block_bytes, nscales = PACKED_TYPES[ggml_type]
    raw = torch.randint(0, 256, (n, k // 32, block_bytes), dtype=torch.uint8)
    scales = (torch.rand(n, k // 32, nscales) * 0.02).to(torch.float16)
    raw[:, :, :2 * nscales] = scales.view(torch.uint8).reshape(n, k // 32, -1)
    return PackedWeight(ggml_type, raw.reshape(n, -1))


def best_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure(ops, layer: PackedLinear, w8: torch.Tensor, w_scale: torch.Tensor, m: int,
            reps: int) -> tuple[float, float]:
    """Best milliseconds of the packed linear and of the int8 path, for m rows."""
    n, k = layer.out_features, layer.in_features
    q, d, s = ops.quant_blocks(torch.randn(m, k))
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    x_scale = torch.rand(m, 1)
    packed = best_ms(lambda: ops.packed_linear(layer.ggml_type, layer.tiles, n, k, q, d, s, None), reps)
    if m <= 2:
        int8 = best_ms(lambda: ops.int8_linear_small(xq, x_scale, w8, w_scale, None), reps)
    else:
        int8 = best_ms(lambda: ops.dequant_rows(torch._int_mm(xq, w8.t()), x_scale, w_scale, None), reps)
    return packed, int8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,32,256")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    ops = load_cpu_kernels()
    if ops is None:
        raise SystemExit("the C++ kernels are unavailable")
    print(f"kernels: {ops.isa.name}, {torch.get_num_threads()} thread(s)")
    for ggml_type, n, k in SHAPES:
        layer = PackedLinear(random_packed(ggml_type, n, k))
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        w_scale = torch.rand(n)
        for m in (int(r) for r in args.rows.split(",")):
            reps = max(3, args.reps // 3) if n * m > 3_000_000 else args.reps
            packed, int8 = measure(ops, layer, w8, w_scale, m, reps)
            print(f"{layer.type_name} {n}x{k}, {m:3d} rows: packed {packed:8.3f} ms, int8 "
                  f"{int8:8.3f} ms, packed/int8 time {packed / int8:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
