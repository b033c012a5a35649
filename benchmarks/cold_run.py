#!/usr/bin/env python3
"""Time to first token of `shoal run MODEL "hi"`: cold (no server running) and warm.

Each cold run uses a fresh SHOAL_HOME and a free port, so `shoal run` finds no server, starts
one in the background, loads the model and streams the answer; the clock runs from starting
the command to the first byte of the answer on its stdout. A warm run repeats the command
against the server the cold run left behind (model loaded). The model store is shared
(SHOAL_MODELS), so the model is pulled once beforehand and every cold run measures start-up
and load, not the download. Also reported: the server's own `load_duration` for the model
(from /api/generate on a freshly started server: the time to load weights and set up the
engine, as Ollama reports it).

    python benchmarks/cold_run.py --runs 3 [--model smollm2]
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_to_first_byte(args: list[str], env: dict[str, str], timeout: float = 600) -> float:
    """Seconds from starting `args` to the first byte on its stdout (the command then finishes)."""
    started = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert process.stdout is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        if not ready or not process.stdout.read(1):
            raise SystemExit(f"{' '.join(args)} printed nothing (exit code {process.wait()})")
        first = time.monotonic() - started
        process.stdout.read()
        if process.wait(timeout) != 0:
            raise SystemExit(f"{' '.join(args)} exited with {process.returncode}")
        return first
    finally:
        if process.poll() is None:
            process.kill()


def stop_server(home: Path, port: int) -> None:
    pid_file = home / f"server-{port}.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass
        time.sleep(1.0)


def one_run(model: str, models_dir: str) -> tuple[float, float, float]:
    """(cold TTFT, warm TTFT, server-reported load_duration) for one fresh SHOAL_HOME."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="shoal-cold-") as home:
        env = dict(os.environ, SHOAL_HOME=home, SHOAL_MODELS=models_dir, SHOAL_HOST=f"127.0.0.1:{port}")
        command = [sys.executable, "-m", "shoal", "run", model, "hi"]
        try:
            cold = time_to_first_byte(command, env)
            warm = time_to_first_byte(command, env)
            # a fresh load on the same server: unload, then one token with load_duration reported
            url = f"http://127.0.0.1:{port}"
            httpx.post(url + "/api/generate", json={"model": model, "keep_alive": 0}, timeout=60)
            reply = httpx.post(url + "/api/generate", timeout=120, json={
                "model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 1}}).json()
            load = reply["load_duration"] / 1e9
        finally:
            stop_server(Path(home), port)
    return cold, warm, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-cold-models-") as models_dir:
        env = dict(os.environ, SHOAL_MODELS=models_dir)
        subprocess.run([sys.executable, "-c", f"from shoal.store import ModelStore; ModelStore.from_env()"
                        f".pull({args.model!r})"], check=True, env=env, stdout=subprocess.DEVNULL)
        results = [one_run(args.model, models_dir) for _ in range(args.runs)]
    for i, (cold, warm, load) in enumerate(results, 1):
        print(f"run {i}: cold first token {cold:.2f}s, warm first token {warm:.2f}s, load_duration {load:.2f}s")
    print(f"median: cold {statistics.median(r[0] for r in results):.2f}s, "
          f"warm {statistics.median(r[1] for r in results):.2f}s, "
          f"load_duration {statistics.median(r[2] for r in results):.2f}s")


if __name__ == "__main__":
    main()
