#!/usr/bin/env python3
"""The naive baseline: transformers `generate` on the same weights, batch sizes 1..32.

Loads SmolLM2-135M-Instruct from the same GGUF (transformers dequantizes it to float32),
generates exactly --max-tokens tokens per sequence (min_new_tokens = max_new_tokens),
greedy, with left padding, and prints output tokens/s per batch size.

    python benchmarks/transformers_baseline.py --batches 1,4,16,32
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shoal.model.loader import resolve_model


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [f"Request {i}: write a long, detailed story about the sea." for i in range(batch)]
        inputs = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=args.max_tokens,
                                 min_new_tokens=args.max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            elapsed = time.perf_counter() - start
        generated = (out.shape[1] - inputs["input_ids"].shape[1]) * batch
        print(f"transformers generate batch {batch:2d}: {generated / elapsed:7.1f} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
