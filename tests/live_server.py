"""A real `shoal serve` subprocess on a free loopback port, for the HTTP tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before in this process.

    NOTE: the port is released before the server binds it, so two servers started back to
    back could be given the same one, and the second's URL would reach the first server."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class LiveServer:
    """Starts `python -m shoal serve` with the given flags; `url` is its base URL."""

    def __init__(self, model: Path | str, *extra_args: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None, entry: tuple[str, ...] = ("-m", "shoal")) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # `entry`: what python runs instead of `-m shoal` (a script wrapping shoal's CLI)
        args = [sys.executable, *entry, "serve", "--model", str(model), "--port", str(self.port),
                *extra_args]
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        # NOTE: each server gets its own empty model store unless the test gives one.
        import tempfile

        store = tempfile.mkdtemp(prefix="shoal-test-store-")
        full_env = {**os.environ, "SHOAL_LOG_LEVEL": "warning", "SHOAL_MODELS": store, **(env or {})}
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 180.0) -> "LiveServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"shoal serve exited with {self.process.returncode}; log: {self.log()}")
            try:
                if httpx.get(self.url + "/", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"shoal serve did not become ready in {timeout}s; log: {self.log()}")

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-4000:]
        return "(no log kept)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def shoal_keys(home: Path, *args: str) -> str:
    """Runs `shoal keys ARGS…` on the key database under `home`, as a user would; its stdout."""
    env = {**os.environ, "SHOAL_HOME": str(home)}
    env.pop("SHOAL_KEYS_DB", None)
    done = subprocess.run([sys.executable, "-m", "shoal", "keys", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@contextmanager
def keyed_server(model: Path | str, home: Path, admin_key: str, *extra_args: str) -> Iterator[LiveServer]:
    """A ready server that requires keys (those `shoal_keys` made under `home`, and the
    SHOAL_ADMIN_KEY `admin_key`), serving `model` as smollm2:135m and smollm2."""
    server = LiveServer(model, "--served-model-name", "smollm2:135m,smollm2", *extra_args,
                        env={"SHOAL_HOME": str(home), "SHOAL_AUTH": "on", "SHOAL_ADMIN_KEY": admin_key},
                        log_path=home / "serve.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()
