#!/usr/bin/env python3
"""Decode attention through the CPU kernel per KV cache dtype (float32, bfloat16, float16).

SmolLM2's shape (9 query heads over 3 KV heads of 64), one query per sequence, random block
tables; the dtypes run interleaved, best of --repeats, so machine load hits them alike.

    python benchmarks/attention_kv_dtype.py --seqs 32 --context 500
"""
from __future__ import annotations

import argparse
import time

import torch

from shoal.model.kernels.cpu import load_cpu_kernels

BS, KV, GROUP, HD = 16, 3, 3, 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--context", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    ops = load_cpu_kernels()
    if ops is None:
        raise SystemExit("the C++ kernels did not build here")
    per_seq = (args.context + BS) // BS
    blocks = args.seqs * per_seq + 1
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(blocks, KV, HD, BS, generator=g), torch.randn(blocks, KV, BS, HD, generator=g)
    tables = torch.randperm(blocks - 1, generator=g)[:args.seqs * per_seq].view(args.seqs, per_seq) + 1
    q = torch.randn(args.seqs, KV * GROUP, HD, generator=g)
    starts = torch.arange(args.seqs + 1)
    first = torch.full((args.seqs,), args.context)
    caches = {dtype: (k.to(dtype), v.to(dtype)) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    best = dict.fromkeys(caches, float("inf"))
    for _ in range(args.repeats):
        for dtype, (kc, vc) in caches.items():
            t = time.perf_counter()
            ops.paged_attention(q, kc, vc, tables, starts, first, 0.125)
            best[dtype] = min(best[dtype], time.perf_counter() - t)
    print(f"decode attention, {args.seqs} sequences at context {args.context}, one layer, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}:")
    for dtype, seconds in best.items():
        print(f"  {str(dtype).removeprefix('torch.'):9s} {seconds * 1e6:8.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
