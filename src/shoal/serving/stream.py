"""RequestStream: what a dialect reads of one admitted request.

The generate service acts on the engine's events once (engine/events.py) and hands them on
here; a dialect reads merged updates from the stream, and may first wait until the engine
has taken the request out of its queue, while a refusal can still be a plain HTTP error.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from shoal.engine.events import EngineEvent, Update
from shoal.engine.outputs import RequestOutput
from shoal.serving.disconnect import cancel_and_wait


class RequestStream:
    """One admitted request's updates: lists of merged RequestOutputs until every sample ends.

    The first read submits the request to the engine; closing the stream early aborts it.
    """

    __slots__ = ("_events", "_early")

    def __init__(self, events: AsyncGenerator[EngineEvent, None]) -> None:
        self._events = events
        self._early: list[RequestOutput] | None = None   # read by wait_scheduled(), not yet returned

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> list[RequestOutput]:
        if self._early is not None:
            outputs, self._early = self._early, None
            return outputs
        while True:
            event = await self._events.__anext__()
            if isinstance(event, Update):
                return merge_updates(event.outputs)

    async def wait_scheduled(self) -> None:
        """Returns once the request has left the engine's waiting queue: scheduled, or ended
        while it waited (call before the first read)."""
        try:
            event = await self._events.__anext__()
        except StopAsyncIteration:
            return
        if isinstance(event, Update):
            self._early = merge_updates(event.outputs)

    async def aclose(self) -> None:
        await self._events.aclose()


async def all_scheduled(streams: Sequence[RequestStream]) -> None:
    """Waits for every stream's wait_scheduled(); the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(stream.wait_scheduled()) for stream in streams]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        await cancel_and_wait(*tasks)


def merge_updates(updates: list[RequestOutput]) -> list[RequestOutput]:
    """Folds consecutive updates of the same sample into one (order kept by first appearance)."""
    if len(updates) == 1 or len({out.index for out in updates}) == len(updates):
        return updates          # the usual case: the reader kept up, nothing to fold
    merged: dict[int, RequestOutput] = {}
    for out in updates:
        prev = merged.get(out.index)
        if prev is None:
            merged[out.index] = RequestOutput(
                request_id=out.request_id, index=out.index, text=out.text,
                token_ids=list(out.token_ids), finished=out.finished,
                finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                logprobs=list(out.logprobs) if out.logprobs is not None else None,
                num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
                num_output_tokens=out.num_output_tokens, num_preemptions=out.num_preemptions,
                timings=out.timings, produced_at=out.produced_at,
                prompt_logprobs=out.prompt_logprobs)
            continue
        prev.text += out.text
        prev.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            prev.logprobs = (prev.logprobs or []) + list(out.logprobs)
        prev.finished, prev.finish_reason, prev.stop_reason = out.finished, out.finish_reason, out.stop_reason
        prev.num_cached_tokens = out.num_cached_tokens
        prev.num_output_tokens, prev.num_preemptions = out.num_output_tokens, out.num_preemptions
        prev.timings, prev.produced_at = out.timings, out.produced_at
        if out.prompt_logprobs is not None:
            prev.prompt_logprobs = out.prompt_logprobs
    return list(merged.values())
