#!/usr/bin/env python3
"""Short CUDA check: greedy agreement with the CPU engine, and tokens/s on the GPU.

Run on a machine with a GPU (one short session):
    python scripts/gpu_check.py [--model PATH] [--tokens 64]
Prints, for float32 and bfloat16 on CUDA: how many of the test prompts produce the
same greedy tokens as CPU exact mode, decode throughput at 1 and 32 streams, and at one
stream the share of memory bandwidth used: each decoded token reads every weight once, so
(weight bytes x tokens/s) against a device-to-device copy's measured bandwidth.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from shoal import LLM, SamplingParams

PROMPTS = ["What is the capital of France?", "Name three rivers.", "Write a haiku about snow.",
           "Explain photosynthesis in one sentence.", "How do I reverse a list in Python?",
           "What is 12 times 12?", "Describe a cat.", "Why is the sky blue?"]


def chats(llm: LLM, prompts: list[str]) -> list[list[int]]:
    return [llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                                 add_special_tokens=False) for p in prompts]


def greedy(llm: LLM, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens)
    return [r.outputs[0].token_ids for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def throughput(llm: LLM, prompts: list[list[int]], streams: int, tokens: int) -> float:
    batch = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(streams)]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(batch[:2], SamplingParams(temperature=0, max_tokens=4))   # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = llm.generate(batch, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sum(len(r.outputs[0].token_ids) for r in results) / (time.perf_counter() - start)


def weight_bytes(llm: LLM) -> int:
    """Bytes of the model's weights (parameters and weight buffers) on its device."""
    model = llm.engine.runner.model
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copy_bandwidth(device: str = "cuda", size: int = 1 << 30, rounds: int = 10) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * size * rounds / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    cpu = LLM(args.model, compute="exact", device="cpu")
    prompts = chats(cpu, PROMPTS)
    reference = greedy(cpu, prompts, args.tokens)
    del cpu
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s")
    ok = True
    for dtype in ("float32", "bfloat16"):
        gpu = LLM(args.model, compute="exact", device="cuda", dtype=dtype)
        got = greedy(gpu, prompts, args.tokens)
        same = sum(a == b for a, b in zip(got, reference))
        first_token_same = sum(a[:1] == b[:1] for a, b in zip(got, reference))
        print(f"cuda {dtype}: greedy identical to CPU exact for {same}/{len(prompts)} prompts "
              f"(first token: {first_token_same}/{len(prompts)})")
        for streams in (1, 32):
            rate = throughput(gpu, prompts, streams, 128)
            print(f"cuda {dtype}: {streams:2d} streams: {rate:8.1f} tok/s")
            if streams == 1:
                per_token = weight_bytes(gpu)
                used = per_token * rate
                print(f"cuda {dtype}: batch 1 reads {per_token / 1e6:.0f} MB of weights a token: "
                      f"{used / 1e9:.0f} GB/s, {100 * used / bandwidth:.1f}% of the copy bandwidth")
        if dtype == "float32" and first_token_same < len(prompts) - 1:
            ok = False
        del gpu
        torch.cuda.empty_cache()
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
