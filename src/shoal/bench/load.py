"""Running one level on one target: closed loop (fixed concurrency) or open loop (arrival rate).

Closed loop: `level` workers each keep one session going and start the next as soon as it
ends. Open loop: sessions start on a schedule (`fixed` spacing or `poisson` arrivals at
`level` per second) whether or not earlier ones have finished, so a server that cannot keep
up builds a queue. A level ends after `requests` requests (closed) or sessions (open) have
started, or when `duration_s` has passed; requests in flight then are waited for and counted.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from shoal.bench.client import BenchRequest, StreamingClient, TimedRequest

SessionSource = Callable[[int], list[BenchRequest]]
_CONNECTION_RETRY_PAUSE_S = 0.1


@dataclass(frozen=True, slots=True)
class LevelPlan:
    mode: str                       # "closed" | "open"
    level: float                    # concurrency (closed) or sessions per second (open)
    requests: int | None            # a budget of requests (closed) / sessions (open) ...
    duration_s: float | None        # ... or of time
    arrival: str = "poisson"        # open loop: "poisson" | "fixed"
    seed: int = 0


@dataclass(slots=True)
class LevelRun:
    records: list[TimedRequest]                # in start order
    started_at: float                          # perf_counter
    duration_s: float


async def run_level(client: StreamingClient, plan: LevelPlan, sessions: SessionSource,
                    on_done: Callable[[TimedRequest], None]) -> LevelRun:
    started_at = time.perf_counter()
    deadline = started_at + plan.duration_s if plan.duration_s else None
    records: list[TimedRequest] = []
    started = 0

    async def run_session(requests: list[BenchRequest], budget_left: Callable[[], bool]) -> None:
        nonlocal started
        for request in requests:
            if not budget_left():
                return
            started += 1
            record = await client.send(request)
            records.append(record)
            on_done(record)
            if record.status == "connection":
                # NOTE: a server that is gone fails each request in a millisecond; without a
                # pause a closed loop would log thousands of identical failures a second.
                await asyncio.sleep(_CONNECTION_RETRY_PAUSE_S)

    if plan.mode == "closed":
        await _closed_loop(plan, sessions, run_session, deadline, lambda: started)
    else:
        await _open_loop(plan, sessions, run_session, started_at)
    duration = time.perf_counter() - started_at
    records.sort(key=lambda r: r.start)
    return LevelRun(records=records, started_at=started_at, duration_s=duration)


async def _closed_loop(plan: LevelPlan, sessions: SessionSource, run_session, deadline: float | None,
                       started: Callable[[], int]) -> None:
    def budget_left() -> bool:
        if plan.requests is not None and started() >= plan.requests:
            return False
        return deadline is None or time.perf_counter() < deadline

    next_session = 0

    async def worker() -> None:
        nonlocal next_session
        while budget_left():
            index, next_session = next_session, next_session + 1
            await run_session(sessions(index), budget_left)

    await asyncio.gather(*(worker() for _ in range(int(plan.level))))


def arrival_offsets(plan: LevelPlan) -> list[float]:
    """Start times (seconds from the level's start) of an open-loop level's sessions."""
    rng = random.Random(f"{plan.seed}/arrivals/{plan.level}")
    offsets: list[float] = []
    t = 0.0
    while True:
        if plan.requests is not None and len(offsets) >= plan.requests:
            return offsets
        if plan.duration_s is not None and t >= plan.duration_s:
            return offsets
        offsets.append(t)
        t += rng.expovariate(plan.level) if plan.arrival == "poisson" else 1.0 / plan.level


async def _open_loop(plan: LevelPlan, sessions: SessionSource, run_session, started_at: float) -> None:
    tasks = []
    for index, offset in enumerate(arrival_offsets(plan)):
        delay = started_at + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # NOTE: turns of a session started before the deadline may run past it: a conversation
        # is not cut short, its later turns simply count in this level.
        tasks.append(asyncio.create_task(run_session(sessions(index), lambda: True)))
    await asyncio.gather(*tasks)
