"""The bench's wait for a quiet machine before each level (shoal.bench.settle)."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.bench import settle as settle_module
from shoal.bench.settle import settle

BURN = "import time\nend = time.time() + 30\nwhile time.time() < end: pass\n"


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
def test_a_busy_machine_holds_the_level_back_until_the_limit() -> None:
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(4)]   # every core busy
    try:
        time.sleep(0.5)
        started = time.perf_counter()
        result = asyncio.run(settle(1.5))
        waited = time.perf_counter() - started
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert not result.quiet
    assert 1.2 <= waited <= 3.0 and abs(result.waited_s - waited) < 0.2


def test_it_starts_as_soon_as_the_cpus_go_quiet(monkeypatch) -> None:
    # (busy, total) jiffies: two busy windows (80%), then a quiet one (5%)
    readings = iter([(0, 0), (80, 100), (160, 200), (165, 300), (170, 400)])
    monkeypatch.setattr(settle_module, "_cpu_times", lambda: next(readings))
    monkeypatch.setattr(settle_module, "SAMPLE_S", 0.05)
    monkeypatch.setattr(settle_module, "MIN_PAUSE_S", 0.05)
    result = asyncio.run(settle(5.0))
    assert result.quiet and result.waited_s < 1.0


def test_no_wait_and_no_proc_stat(monkeypatch) -> None:
    assert asyncio.run(settle(0)).waited_s == 0
    monkeypatch.setattr(settle_module, "_cpu_times", lambda: None)
    monkeypatch.setattr(settle_module, "MIN_PAUSE_S", 0.05)
    result = asyncio.run(settle(5.0))
    assert not result.quiet and result.waited_s < 0.5
