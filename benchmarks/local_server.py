"""Starts a `shoal serve` child on a free loopback port for a benchmark or a script.

Shared by the benchmarks and scripts/ that measure a server of their own: each gets a
throwaway model store (so a run never touches the user's), quiet logs, and waits until the
server answers `GET /`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_server(model: str, *args: str, env: dict[str, str] | None = None,
                       port: int | None = None, timeout: float = 300,
                       launcher: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`shoal serve --model MODEL ARGS…` on 127.0.0.1; returns (process, base URL) once it
    answers. `env` adds to (and overrides) this process's environment; `launcher` replaces
    `python -m shoal` (a script that runs shoal's CLI its own way)."""
    port = port or free_port()
    child_env = {**os.environ, "SHOAL_LOG_LEVEL": "warning",
                 "SHOAL_MODELS": tempfile.mkdtemp(prefix="shoal-bench-"), **(env or {})}
    process = subprocess.Popen([*(launcher or [sys.executable, "-m", "shoal"]), "serve", "--model", model,
                                "--port", str(port), *args], env=child_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"shoal serve exited with {process.returncode}")
        try:
            if httpx.get(url + "/", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"shoal serve did not start in {timeout:.0f} s")
