"""The results JSON, schema "shoal-bench/1" (docs/benchmarks.md lists its keys)."""
from __future__ import annotations

import json
import os
import platform
import socket
from datetime import datetime, timezone
from pathlib import Path

from shoal.bench.client import TimedRequest
from shoal.bench.targets import BenchSetupError
from shoal.core.version import __version__

SCHEMA = "shoal-bench/1"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict:
    return {"hostname": socket.gethostname(), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "python": platform.python_version(), "shoal": __version__}


def level_value(value: float) -> int | float:
    """A level as the user wrote it: 4, not 4.0."""
    return int(value) if float(value).is_integer() else float(value)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def request_entry(target: str, level: float, index: int, start: float, record: TimedRequest) -> dict:
    """One measured request; `start` is seconds since the sweep began."""
    return {"target": target, "level": level_value(level), "index": index, "start": _rounded(start),
            "status": record.status, "error": record.error,
            "prompt_tokens": record.prompt_tokens, "output_tokens": record.output_tokens,
            "ttft": _rounded(record.ttft), "e2e": _rounded(record.e2e),
            "itls": [round(g, 6) for g in record.itls]}


def write_json(results: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def load_results(path: str | Path) -> dict:
    """A saved run; BenchSetupError when the file is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BenchSetupError(f"{path}: cannot read results ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise BenchSetupError(f"{path}: not a shoal bench results file (schema {SCHEMA!r})")
    return data
