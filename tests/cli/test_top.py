"""`shoal top` through a pseudo-terminal against a real server: it renders, redraws as the
server changes, and exits on `q` with the terminal given back."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

pexpect = pytest.importorskip("pexpect")

CLOCK = re.compile(r"· (\d\d:\d\d:\d\d)")


def _env(url: str, tmp_path) -> dict[str, str]:
    env = {**os.environ, "SHOAL_HOST": url, "SHOAL_HOME": str(tmp_path), "SHOAL_NO_AUTOSTART": "1",
           "TERM": "xterm-256color"}
    env.pop("SHOAL_API_KEY", None)
    return env


def test_top_renders_updates_and_quits_on_q(shoal_server, tmp_path) -> None:
    top = pexpect.spawn(sys.executable, ["-m", "shoal", "top"], env=_env(shoal_server.url, tmp_path),
                        encoding="utf-8", dimensions=(50, 120), timeout=60)
    try:
        top.expect("loaded models")
        top.expect("smollm2:135m")
        top.expect(CLOCK)
        first = top.match.group(1)
        top.expect(CLOCK)
        while top.match.group(1) == first:           # redrawn each second: the clock moves on
            top.expect(CLOCK)
        # what the server does shows up: a refused request, with its model and status
        httpx.post(shoal_server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "model-seen-by-top", "messages": [{"role": "user", "content": "hi"}]})
        top.expect("model-seen-by-top")
        top.send("q")
        top.expect(pexpect.EOF, timeout=15)
    finally:
        top.close(force=True)
    assert top.exitstatus == 0


def test_top_once_prints_one_view_and_a_missing_server_is_one_line(shoal_server, tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "shoal", "top", "--once"], env=_env(shoal_server.url, tmp_path),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "loaded models" in done.stdout and "smollm2:135m" in done.stdout and "q quits" in done.stdout
    gone = subprocess.run([sys.executable, "-m", "shoal", "top"], env=_env("127.0.0.1:9", tmp_path),
                          capture_output=True, text=True, timeout=60, check=False)
    assert gone.returncode == 1 and gone.stderr.startswith("shoal: could not connect")
    assert "Traceback" not in gone.stderr
