"""run_until_disconnect: work for an HTTP request that stops when its client hangs up."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client hung up before its answer was ready: nothing failed, nobody is left to
    answer (the app records it as 499, as nginx does, and logs no traceback)."""

    def __init__(self) -> None:
        super().__init__("the client disconnected")


async def cancel_and_wait(*tasks: asyncio.Future) -> None:
    """Cancels `tasks` and returns once each has ended, whatever it raised.

    NOTE: cancel() only asks: a task cancelled and not awaited may still be inside an async
    generator, and closing that generator then fails with "aclose(): asynchronous generator
    is already running". Whoever closes the streams a task was reading must wait here first.
    """
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


async def run_until_disconnect(receive: Callable[[], Awaitable[dict]], work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the HTTP client disconnects first (non-streamed requests,
    and a streamed one until its first byte); raises ClientDisconnected then, once `work`
    has ended.

    `receive` is the ASGI receive callable; once the body has been read its next message
    is `http.disconnect`, which is how a client that hangs up is noticed while the
    response is still being computed.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        await cancel_and_wait(task)
        raise ClientDisconnected()
    finally:
        await cancel_and_wait(*(t for t in (task, watcher) if not t.done()))
