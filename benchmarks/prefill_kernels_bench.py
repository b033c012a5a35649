#!/usr/bin/env python3
"""Prompt-prefill kernels, this checkout's build against an earlier one, call by call.

At prompt sizes (hundreds of rows), with SmolLM2-135M's shapes: the paged attention of one
layer over a whole T-token prompt (9 query heads, 3 KV heads, head_dim 64, bfloat16 cache,
as fast mode keeps it), and over decoding queries (one per sequence; --decode), and the packed linears (Q4_1 qkv 960x576, gate/up 3072x576, down
576x1536; Q4_0 and Q8_0 at 1000x576) at M rows. Each figure is the best of --reps calls,
the two builds called alternately (this machine is shared: interleaving spreads its noise
over both); the packed results are checked bit-identical between the builds.

--against is a kernel library built from an earlier checkout, e.g. the one that checkout
left in the kernel cache:

    git stash; python -c "from shoal.model.kernels.cpu import load_cpu_kernels as l; print(l().path)"
    git stash pop
    OMP_NUM_THREADS=1 python benchmarks/prefill_kernels_bench.py --against /path/to/old.so
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from packed_linear_bench import random_packed

from shoal.model.kernels.cpu import CpuKernels, load_cpu_kernels
from shoal.model.layers.packed import PackedLinear

LINEARS = ((3, 960, 576), (3, 3072, 576), (3, 576, 1536), (2, 1000, 576), (8, 1000, 576))


def best_pair(calls: dict, reps: int) -> dict:
    """Best seconds of each named call, the calls alternating."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(reps):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def attention(old: CpuKernels, new: CpuKernels, tokens: int, reps: int) -> None:
    heads, kv, hd, bs = 9, 3, 64, 16
    blocks = (tokens + bs - 1) // bs
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(blocks, kv, hd, bs, generator=g).to(torch.bfloat16)
    vc = torch.randn(blocks, kv, bs, hd, generator=g).to(torch.bfloat16)
    q = torch.randn(tokens, heads, hd, generator=g)
    args = (q, kc, vc, torch.arange(blocks)[None], torch.tensor([0, tokens]), torch.tensor([0]), 0.125)
    best = best_pair({"old": lambda: old.paged_attention(*args), "new": lambda: new.paged_attention(*args)}, reps)
    diff = (old.paged_attention(*args) - new.paged_attention(*args)).abs().max().item()
    print(f"attention, one layer, {tokens:5d}-token prompt: before {best['old'] * 1e3:8.2f} ms, after "
          f"{best['new'] * 1e3:8.2f} ms, {best['old'] / best['new']:.2f}x (max difference {diff:.1e})",
          flush=True)


def decode_attention(old: CpuKernels, new: CpuKernels, seqs: int, context: int, reps: int) -> None:
    """One decoding query per sequence (9 heads over 3 KV heads), each at `context` keys."""
    heads, kv, hd, bs = 9, 3, 64, 16
    per_seq = (context + bs) // bs
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(seqs * per_seq, kv, hd, bs, generator=g).to(torch.bfloat16)
    vc = torch.randn(seqs * per_seq, kv, bs, hd, generator=g).to(torch.bfloat16)
    tables = torch.randperm(seqs * per_seq, generator=g).view(seqs, per_seq)
    q = torch.randn(seqs, heads, hd, generator=g)
    args = (q, kc, vc, tables, torch.arange(seqs + 1), torch.full((seqs,), context), 0.125)
    best = best_pair({"old": lambda: old.paged_attention(*args), "new": lambda: new.paged_attention(*args)}, reps)
    same = torch.equal(old.paged_attention(*args), new.paged_attention(*args))
    print(f"decode attention, one layer, {seqs} sequences at {context} keys: before "
          f"{best['old'] * 1e3:6.3f} ms, after {best['new'] * 1e3:6.3f} ms, "
          f"{best['old'] / best['new']:.2f}x, bit-identical {same}", flush=True)


def linear(old: CpuKernels, new: CpuKernels, ggml_type: int, n: int, k: int, rows: int, reps: int) -> None:
    layer = PackedLinear(random_packed(ggml_type, n, k))
    q, d, s = new.quant_blocks(torch.randn(rows, k))
    bias = torch.randn(n)

    def call(ops):
        return lambda: ops.packed_linear(ggml_type, layer.tiles, n, k, q, d, s, bias)

    best = best_pair({"old": call(old), "new": call(new)}, reps)
    same = torch.equal(call(old)(), call(new)())
    print(f"{layer.type_name} {n:4d}x{k:4d}, {rows:4d} rows: before {best['old'] * 1e3:7.3f} ms, after "
          f"{best['new'] * 1e3:7.3f} ms, {best['old'] / best['new']:.2f}x, bit-identical {same}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the earlier build's kernel library (.so)")
    parser.add_argument("--tokens", default="256,1000", help="prompt lengths for attention ('' for none)")
    parser.add_argument("--rows", default="64,256,512", help="batch rows for the linears")
    parser.add_argument("--decode", default="1x150,32x150,32x1000",
                        help="decode attention cases, SEQUENCESxCONTEXT, comma-separated ('' for none)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    new = load_cpu_kernels()
    if new is None:
        raise SystemExit("the C++ kernels are unavailable")
    old = CpuKernels(Path(args.against), new.isa)
    print(f"kernels: {new.isa.name}, {torch.get_num_threads()} thread(s)")
    for tokens in (int(t) for t in filter(None, args.tokens.split(","))):
        attention(old, new, tokens, args.reps)
    for case in filter(None, args.decode.split(",")):
        seqs, context = (int(x) for x in case.split("x"))
        decode_attention(old, new, seqs, context, args.reps)
    for ggml_type, n, k in LINEARS:
        for rows in (int(r) for r in args.rows.split(",")):
            linear(old, new, ggml_type, n, k, rows, args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
