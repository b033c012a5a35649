"""Graceful shutdown: SIGTERM or SIGINT drains the server before uvicorn exits.

uvicorn's own handler starts its shutdown at once, and that shutdown begins by closing the
listening socket: a client arriving during the drain would get "connection refused"
instead of a 503 it can act on, and /readyz could not report the drain. DrainingServer
takes the signals itself. The first one starts the drain: readiness goes false and new
generate requests get 503 + Retry-After while the socket stays open; running requests
get `drain_timeout` to finish, then are aborted (their streams end with an "abort"
finish); only then is uvicorn asked to exit (it closes the socket, lets responses finish
writing, runs the lifespan shutdown that unloads models). A second signal cuts the drain
short, a third forces uvicorn's exit. The process exits 0: a drain is a normal stop, so
the signal is not re-raised after shutdown as uvicorn otherwise does.
"""
from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Protocol

import uvicorn

from shoal.serving.server_state import ServerLifecycle

log = logging.getLogger("shoal.server")

# How long aborted streams get to send their last chunk before uvicorn closes connections.
ABORT_GRACE_S = 5.0


class Drainable(Protocol):
    def num_in_flight(self) -> int: ...
    def abort_all(self) -> None: ...


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signals drain running requests first (see the module doc)."""

    def __init__(self, config: uvicorn.Config, lifecycle: ServerLifecycle, service: Drainable,
                 drain_timeout: float) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._service = service
        self._drain_timeout = drain_timeout
        self._signals = 0
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: this runs as a signal handler, between two bytecodes of whatever the loop
        # was doing: it only counts; on_tick (every 0.1 s, on the loop) acts on it.
        self._signals += 1
        if self._signals >= 3:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._signals and self._drain is None:
            self._drain = asyncio.ensure_future(self._run_drain())
        if self._drain is not None and self._drain.done():
            return True
        return await super().on_tick(counter)

    async def _run_drain(self) -> None:
        try:
            await self._wait_for_requests()
        except Exception:  # noqa: BLE001 - the server must still exit
            log.exception("draining failed; exiting anyway")

    async def _wait_for_requests(self) -> None:
        loop = asyncio.get_running_loop()
        self._lifecycle.draining = True
        running = self._service.num_in_flight()
        log.info("shutting down: not ready, new requests get 503; %d running request(s) get up "
                 "to %gs to finish (SHOAL_DRAIN_TIMEOUT)", running, self._drain_timeout)
        deadline = loop.time() + self._drain_timeout
        while self._service.num_in_flight() and loop.time() < deadline and self._signals < 2:
            await asyncio.sleep(0.1)
        left = self._service.num_in_flight()
        if left:
            log.warning("aborting %d request(s) still running at the end of the drain", left)
            self._service.abort_all()
            grace_end = loop.time() + ABORT_GRACE_S
            while self._service.num_in_flight() and loop.time() < grace_end:
                await asyncio.sleep(0.05)
        log.info("drained; exiting")
