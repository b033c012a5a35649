"""benchmarks/overload.py: what it says when everything fails, records kept as it goes, and SSE
read the way SSE is framed."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmark_scripts import BENCHMARKS, load_benchmark

SCRIPT = BENCHMARKS / "overload.py"


def _load_script():
    return load_benchmark("overload.py", "overload_script")


def _run(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_when_every_request_fails_it_says_what_failed_and_exits_non_zero(shoal_server) -> None:
    process = _run("--url", shoal_server.url, "--model", "no-such-model", "--sweep", "1,2,4",
                   "--sweep-seconds", "2", "--duration", "2")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, (out, err)
    assert "Traceback" not in err and "ZeroDivisionError" not in err, err
    assert "no request completed with 1 client(s)" in out      # it stops at the first level
    assert "404: " in out and "e.g. 404: " in out and "no-such-model" in out, out


def test_records_are_written_as_requests_end(shoal_server, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    process = _run("--url", shoal_server.url, "--rate", "2", "--duration", "600",
                   "--interactive-max-tokens", "2", "--batch-max-tokens", "2", "--records", str(records))
    try:
        deadline = time.monotonic() + 120
        while not (records.exists() and len(records.read_text().splitlines()) >= 2):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no record was written while the run went on"
            time.sleep(0.5)
    finally:
        process.kill()                      # a run that dies keeps what it measured
        process.communicate()
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert lines[0]["status"] == 200 and lines[0]["complete"] and lines[0]["kind"] in ("interactive", "batch")


def test_sse_is_split_at_newlines_only() -> None:
    overload = _load_script()
    data = 'data: {"a": "x\u2028y\u2029z\x85!"}\r\n\ndata: [DONE]\n\n'.encode()

    class Response:
        async def aiter_bytes(self):
            for i in range(0, len(data), 3):       # chunks that cut characters in half
                yield data[i:i + 3]

    async def lines() -> list[str]:
        return [line async for line in overload.sse_lines(Response())]

    got = asyncio.run(lines())
    assert got == ['data: {"a": "x\u2028y\u2029z\x85!"}', "", "data: [DONE]", ""]
    assert json.loads(got[0][6:]) == {"a": "x\u2028y\u2029z\x85!"}
