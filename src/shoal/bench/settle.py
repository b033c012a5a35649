"""Waiting for the machine to go quiet before a level starts.

Servers keep working after their last answer: vLLM's CPU build holds a core for about a
second after it goes idle (measured: 100% of a core for 1.1 s), so in an interleaved sweep
the next target's first requests would pay for the previous target's spin. Before each
level the bench waits until the local CPUs have been mostly idle for one sample window, up
to a limit. Where the servers run on another host this only costs the minimum pause.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
SAMPLE_S = 0.25            # one busy-fraction sample
QUIET_BUSY = 0.15          # below this fraction of all CPUs busy counts as quiet
MIN_PAUSE_S = 0.5          # always, so in-flight bookkeeping of the last level ends first


@dataclass(frozen=True, slots=True)
class Settled:
    waited_s: float
    quiet: bool               # False: the limit ran out first (or the load is not measurable)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs, or None where /proc/stat is not available."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields[:8]]
    idle = values[3] + values[4]                   # idle + iowait
    return sum(values) - idle, sum(values)


async def settle(limit_s: float) -> Settled:
    """Pauses until the machine's CPUs are quiet for a sample window, or `limit_s` has passed."""
    started = time.perf_counter()
    if limit_s <= 0:
        return Settled(0.0, False)
    await asyncio.sleep(min(MIN_PAUSE_S, limit_s))
    previous = _cpu_times()
    if previous is None:
        return Settled(time.perf_counter() - started, False)
    while time.perf_counter() - started + SAMPLE_S <= limit_s:
        await asyncio.sleep(SAMPLE_S)
        current = _cpu_times()
        busy, total = current[0] - previous[0], current[1] - previous[1]
        previous = current
        if total > 0 and busy / total < QUIET_BUSY:
            return Settled(time.perf_counter() - started, True)
    return Settled(time.perf_counter() - started, False)
