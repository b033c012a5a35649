#!/usr/bin/env python3
"""Packed GGUF-block linears vs the int8 x int8 path, one kernel call at a time.

SmolLM2-135M's shapes (a Q4_1 gate/up 3072x576, a Q4_1 down 576x1536, the Q8_0 head
49152x576) with random blocks, at several batch sizes: the best of --reps calls of
`CpuKernels.packed_linear` (this CPU's variant: AMX tiles from 8 rows where the CPU has them)
against int8_linear_small (1-2 rows) or torch._int_mm + dequant_rows (more), as fast mode's
two recipes run them. Run with OMP_NUM_THREADS=1 for one core's figures.

    OMP_NUM_THREADS=1 python benchmarks/packed_linear_bench.py

--amx-unpacked instead times the packed linear with and without its pre-unpacked AMX copy
(CpuKernels.packed_unpack), the two alternating, medians of a call, on the CPU's threads;
each pass calls --layers distinct weights of the shape in turn, as a decode step does (with
1, a weight stays in cache from call to call, which a model's weights do not):

    python benchmarks/packed_linear_bench.py --amx-unpacked --rows 8,16,32,64 --layers 30
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from shoal.model.kernels.cpu import load_cpu_kernels
from shoal.model.layers.packed import PACKED_TYPES, PackedLinear, PackedWeight

SHAPES = ((3, 3072, 576), (3, 576, 1536), (8, 49152, 576))   # (GGML type, out, in)
# --amx-unpacked: the layers' shapes as a Q8_0 file has them too
UNPACKED_SHAPES = (*SHAPES, (8, 3072, 576), (8, 576, 1536))


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


def median_ms_alternating(fns: dict, reps: int) -> dict[str, float]:
    """Median milliseconds of each function, called in turn rep after rep (drift hits all)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def measure_unpacked(ops, layers: list[tuple[PackedLinear, torch.Tensor]], m: int,
                     reps: int) -> dict[str, float]:
    """Median milliseconds of one call, unpacking per call and reading the copy, over passes
    through `layers` (weight, its copy)."""
    first = layers[0][0]
    n, k = first.out_features, first.in_features
    q, d, s = ops.quant_blocks(torch.randn(m, k))

    def passes(with_copy: bool):
        def run():
            for layer, copy in layers:
                ops.packed_linear(layer.ggml_type, layer.tiles, n, k, q, d, s, None,
                                  copy if with_copy else None)
        return run

    times = median_ms_alternating({"per call": passes(False), "copy": passes(True)}, reps)
    return {name: t / len(layers) for name, t in times.items()}


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
    parser.add_argument("--amx-unpacked", action="store_true",
                        help="the AMX path with and without the pre-unpacked copy")
    parser.add_argument("--layers", type=int, default=30,
                        help="--amx-unpacked: distinct weights per shape, called in turn")
    args = parser.parse_args()
    ops = load_cpu_kernels()
    if ops is None:
        raise SystemExit("the C++ kernels are unavailable")
    print(f"kernels: {ops.isa.name}, {torch.get_num_threads()} thread(s)")
    for ggml_type, n, k in UNPACKED_SHAPES if args.amx_unpacked else SHAPES:
        if args.amx_unpacked:
            count = max(1, min(args.layers, 2**27 // (n * k)))   # the head: a few
            layers = [PackedLinear(random_packed(ggml_type, n, k)) for _ in range(count)]
            layers = [(layer, ops.packed_unpack(ggml_type, layer.tiles, n, k)) for layer in layers]
            if layers[0][1] is None:
                raise SystemExit("no AMX here: the kernels make no copy")
            for m in (int(r) for r in args.rows.split(",")):
                t = measure_unpacked(ops, layers, m, args.reps)
                layer, copy = layers[0]
                print(f"{layer.type_name} {n}x{k} (x{count}), {m:3d} rows: unpacking per call "
                      f"{t['per call']:7.3f} ms, copy {t['copy']:7.3f} ms, copy/per call "
                      f"{t['copy'] / t['per call']:.2f} (copy {copy.numel() / 2**20:.1f} MiB, "
                      f"tiles {layer.tiles.numel() / 2**20:.1f} MiB)", flush=True)
            continue
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
