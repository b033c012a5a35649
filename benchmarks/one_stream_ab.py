"""One stream's decode step, before and after the one-call layer stack and the work pool,
interleaved in one process (issue 18, target 1).

Three variants of the same loaded fast-mode engine, switched between short rounds so that a
busy machine's drift hits all alike:
- before:    model/decoder.py's per-op path (~11 kernel calls per layer from Python), the
             kernels' parallel loops as OpenMP regions;
- stack+omp: the layers in one C++ call (kernels/csrc/decoder_stack.cpp), OpenMP regions;
- after:     the one-call stack with the loops on the work pool (kernels/csrc/pool.h).
Each round starts a request with a ~512-token prompt (its prefill step is timed), then times
15 decode steps of that one stream. All three give the same bits (tests/model/
test_packed_linear.py), so only time differs.

    python benchmarks/one_stream_ab.py --rounds 12

As `shoal` itself, it gives torch's OpenMP workers a short spin unless OMP_WAIT_POLICY or
GOMP_SPINCOUNT is set (shoal/core/openmp.py says why); `OMP_WAIT_POLICY=ACTIVE` shows the
OpenMP variants at their best.
"""
from __future__ import annotations

import argparse
import time

from shoal.core.openmp import set_openmp_defaults

set_openmp_defaults()   # as `shoal` does, before torch loads libgomp

from shoal.core.config import EngineConfig
from shoal.core.sampling_params import SamplingParams
from shoal.engine.builder import build_engine_core


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M Q4_1")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=15, help="decode steps timed per round")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    args = parser.parse_args()
    core, _ = build_engine_core(EngineConfig.from_env(model=args.model, compute="fast"))
    model, kernels = core.runner.model, core.runner.kernels
    if model.stack is None or kernels is None:
        raise SystemExit("needs the C++ kernels and a packed model of a plain pre-norm family")
    variants = {"before": (None, False), "stack+omp": (model.stack, False),
                "after": (model.stack, True)}
    decode: dict[str, list[float]] = {v: [] for v in variants}
    prefill: dict[str, list[float]] = {v: [] for v in variants}
    count = 0
    for _ in range(args.rounds):
        for name, (stack, pool) in variants.items():
            model.stack = stack
            kernels.set_work_pool(pool)
            count += 1
            ids = core.tokenizer.encode(f"Story {count}: tell me a story.")
            ids = (ids * (args.prompt_tokens // len(ids) + 1))[:args.prompt_tokens]
            core.add_request(str(count), ids, SamplingParams(max_tokens=args.steps + 8,
                                                             temperature=0.0, ignore_eos=True))
            started = time.perf_counter()
            core.step()
            prefill[name].append(time.perf_counter() - started)
            for _ in range(3):
                core.step()
            for _ in range(args.steps):
                started = time.perf_counter()
                core.step()
                decode[name].append(time.perf_counter() - started)
            core.abort_request(str(count))
    print(f"{args.rounds} rounds x {args.steps} decode steps per variant, interleaved")
    for name in variants:
        steps, prompts = sorted(decode[name]), sorted(prefill[name])
        n = len(steps)
        print(f"{name:10s} decode step median {steps[n // 2] * 1e3:7.2f} ms, p10 "
              f"{steps[n // 10] * 1e3:6.2f} ms, mean {sum(steps) / n * 1e3:7.2f} ms "
              f"({n / sum(steps):6.1f} tok/s) | {args.prompt_tokens}-token prefill median "
              f"{prompts[len(prompts) // 2] * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
