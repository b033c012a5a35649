#!/usr/bin/env python3
"""Model load time and peak RSS of fast mode's weight recipes, each in a fresh process.

For each recipe in turn (repeated --rounds times, interleaved, as the machine is shared): a
new Python process builds the engine (load time: EngineInfo.load_seconds, which covers
reading, packing or dequantizing + calibrating, and the KV cache plan), then runs
--streams concurrent greedy requests of --max-tokens tokens, and reports its peak RSS
(VmHWM). The kernels are built before the first round so no round pays for a compile.

    python benchmarks/load_memory.py --recipes packed,int8 --rounds 3 --streams 32
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys
from shoal import LLM, SamplingParams
from shoal.model.kernels.cpu import load_cpu_kernels
recipe, streams, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
load_cpu_kernels()
llm = LLM(fast_weights=recipe, max_num_seqs=max(64, streams))
prompts = [f"Request {i}: write a long story about the sea." for i in range(streams)]
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"recipe": llm.info.fast_weights, "load_s": llm.info.load_seconds,
                  "weights_mb": llm.info.weights_bytes / 2**20, "peak_rss_mb": hwm / 1024}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="packed,int8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    warm = "from shoal.model.kernels.cpu import load_cpu_kernels; load_cpu_kernels()"
    subprocess.run([sys.executable, "-c", warm], check=True)
    runs: dict[str, list[dict]] = {r: [] for r in recipes}
    for round_ in range(args.rounds):
        for recipe in recipes:
            out = subprocess.run([sys.executable, "-c", CHILD, recipe, str(args.streams),
                                  str(args.max_tokens)], check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            runs[recipe].append(row)
            print(f"round {round_ + 1} {recipe:7s} load {row['load_s']:.2f}s  weights "
                  f"{row['weights_mb']:.0f} MB  peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    for recipe, rows in runs.items():
        print(f"{recipe:7s} median load {statistics.median(r['load_s'] for r in rows):.2f}s, "
              f"median peak RSS at {args.streams} streams "
              f"{statistics.median(r['peak_rss_mb'] for r in rows):.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
