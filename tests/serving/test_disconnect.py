"""run_until_disconnect: a client that hangs up ends the work before anyone closes its streams."""
from __future__ import annotations

import asyncio

import pytest

from shoal.serving.disconnect import ClientDisconnected, run_until_disconnect


def test_a_client_leaving_ends_the_work_before_its_generator_is_closed() -> None:
    """The race behind 'aclose(): asynchronous generator is already running': the work is
    inside the generator when the client leaves; its caller closes the generator next."""
    cleaned = []

    async def run() -> None:
        reading = asyncio.Event()

        async def events():
            try:
                reading.set()
                await asyncio.sleep(3600)
                yield 1
            finally:
                await asyncio.sleep(0)          # cleanup takes a step, as the engine's does
                cleaned.append(True)

        gen = events()

        async def receive() -> dict:
            await reading.wait()
            return {"type": "http.disconnect"}

        with pytest.raises(ClientDisconnected):
            await run_until_disconnect(receive, gen.__anext__())
        assert cleaned == [True]                # the work has ended, its cleanup included
        await gen.aclose()                      # and closing the generator is no race

    asyncio.run(run())


def test_work_that_finishes_first_is_returned_and_the_watcher_stopped() -> None:
    async def run() -> int:
        never = asyncio.Event()

        async def receive() -> dict:
            await never.wait()
            return {"type": "http.disconnect"}

        async def work() -> int:
            await asyncio.sleep(0.01)
            return 7

        result = await run_until_disconnect(receive, work())
        await asyncio.sleep(0)
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        return result

    assert asyncio.run(run()) == 7
