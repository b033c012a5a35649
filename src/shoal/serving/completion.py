"""A non-streamed request's answer: its samples gathered from the stream, with usage figures."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from shoal.engine.outputs import PromptLogprob, RequestOutput, TokenLogprob
from shoal.serving.request import GenerateRequest


@dataclass(slots=True)
class CompletedSample:
    """One sample of a non-streamed request, as it ended."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class Completion:
    """A finished non-streamed request: its samples and the usage and timing figures."""

    samples: list[CompletedSample]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    last: RequestOutput | None          # the final update of the last sample to finish
    prompt_logprobs: list[PromptLogprob | None] | None = None


async def collect(req: GenerateRequest, stream: AsyncIterator[list[RequestOutput]]) -> Completion:
    """Gathers a started request's samples; closes the stream however it ends."""
    samples = [CompletedSample(index=i, logprobs=[] if req.params.logprobs is not None else None)
               for i in range(req.params.n)]
    num_cached = 0
    last: RequestOutput | None = None
    prompt_logprobs = None
    try:
        async for batch in stream:
            for out in batch:
                sample = samples[out.index]
                sample.text += out.text
                sample.token_ids.extend(out.token_ids)
                if out.logprobs and sample.logprobs is not None:
                    sample.logprobs.extend(out.logprobs)
                if out.finished:
                    sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
                    last = out
                num_cached = max(num_cached, out.num_cached_tokens)
                if out.prompt_logprobs is not None:
                    prompt_logprobs = out.prompt_logprobs
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return Completion(samples, len(req.prompt_token_ids), num_cached,
                      sum(len(s.token_ids) for s in samples), last, prompt_logprobs)
