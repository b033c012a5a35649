#!/usr/bin/env python3
"""How soon after `shoal serve` starts can a client generate? (process start -> first answer)

Starts `python -m shoal serve` on a free port several times and reports, per run, the
seconds until GET / answers and until a first one-token chat completion returns.
The default model and the compiled kernels are assumed cached (the first-ever start
also compiles the CPU kernels, about a minute).

    python benchmarks/serve_startup.py --runs 3 [--model path.gguf]
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run(model: str | None) -> tuple[float, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "shoal", "serve", "--port", str(port)]
    if model:
        args += ["--model", model]
    started = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"shoal serve exited with {process.returncode}")
            try:
                if httpx.get(url + "/", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        listening = time.monotonic() - started
        response = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        response.raise_for_status()
        return listening, time.monotonic() - started
    finally:
        process.terminate()
        process.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    results = [one_run(args.model) for _ in range(args.runs)]
    for i, (listening, answered) in enumerate(results, 1):
        print(f"run {i}: listening after {listening:.2f}s, first answer after {answered:.2f}s")
    print(f"median: listening {statistics.median(r[0] for r in results):.2f}s, "
          f"first answer {statistics.median(r[1] for r in results):.2f}s")


if __name__ == "__main__":
    main()
