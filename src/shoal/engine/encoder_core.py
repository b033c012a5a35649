"""EncoderCore: the engine of an embedding-only (encoder) model.

It answers what EngineCore answers to AsyncEngine (add, abort, step, limits, stats), but a
step is one forward pass of the SentenceEncoder over as many waiting inputs as fit the
token budget, whoever sent them: many short requests from many clients share one pass.
Inputs wait in the order the decoder's scheduler uses (interactive before batch, then
priority, then arrival), so a key's class applies here too. No KV cache, nothing to sample.
"""
from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.core.errors import InvalidParameterError
from shoal.core.sampling_params import SamplingParams
from shoal.engine.limits import EngineLimits
from shoal.engine.outputs import RequestOutput
from shoal.engine.request import FinishReason, RequestTimings
from shoal.engine.stats import EngineStats
from shoal.engine.turns import ENGINE_TURNS
from shoal.model.encoder import SentenceEncoder
from shoal.text.tokenizer import Tokenizer


@dataclass(order=True, slots=True)
class _Input:
    rank: tuple[int, int, float, int]           # (class, priority, arrival, sequence)
    request_id: str = field(compare=False)
    index: int = field(compare=False)
    token_ids: list[int] = field(compare=False)
    timings: RequestTimings = field(compare=False)


class EncoderCore:
    """Batches waiting embedding inputs into encoder forward passes."""

    def __init__(self, model: SentenceEncoder, tokenizer: Tokenizer, max_model_len: int,
                 max_num_seqs: int, max_batch_tokens: int, short_pass_tokens: int = 128) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_batch_tokens = max(max_batch_tokens, max_model_len)
        self.short_pass_tokens = short_pass_tokens
        # NOTE: no KV cache: an input may be as long as the context, however many wait.
        self.limits = EngineLimits(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                   vocab_size=model.config.vocab_size,
                                   kv_cache_tokens=max_model_len)
        self._waiting: list[_Input] = []
        self._left: dict[str, int] = {}            # request id -> inputs not yet answered
        self._reported: set[str] = set()           # request ids told they are scheduled
        self._sequence = itertools.count()
        self.on_first_scheduled: Callable[[list[str]], None] | None = None
        self.on_request_failed: Callable[[str, BaseException], None] | None = None
        self.num_prompt_tokens_total = 0
        self.num_running = 0
        # while loaded, the process's engines take turns (engine/turns.py)
        ENGINE_TURNS.encoders += 1
        self._closed = False
        self._seconds_per_token = 0.0      # measured, for passes sized to a decoder's step

    # ---- requests in -------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None, **_: object) -> None:
        raise InvalidParameterError("model", "this model only computes embeddings: it cannot "
                                             "generate text")

    def add_embedding_request(self, request_id: str, inputs: list[list[int]], priority: int = 0,
                              arrival_time: float | None = None, *, batch: bool = False,
                              batch_aging_s: float = math.inf) -> None:
        if request_id in self._left:
            raise InvalidParameterError("request_id", f"{request_id!r} is already running")
        for ids in inputs:
            self.limits.validate_embedding(ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        # NOTE: a batch request that has waited its aging time ranks as interactive here:
        # a step takes every waiting input that fits, so no turn-taking is needed.
        klass = 1 if batch and time.monotonic() - arrival < batch_aging_s else 0
        for index, ids in enumerate(inputs):
            heapq.heappush(self._waiting, _Input((klass, priority, arrival, next(self._sequence)),
                                                 request_id, index, list(ids),
                                                 RequestTimings(arrival=arrival)))
        self._left[request_id] = len(inputs)

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        if self._left.pop(request_id, None) is None:
            return []
        self._reported.discard(request_id)
        self._waiting = [item for item in self._waiting if item.request_id != request_id]
        heapq.heapify(self._waiting)
        return [RequestOutput(request_id=request_id, index=0, text="", token_ids=[], finished=True,
                              finish_reason=FinishReason.ABORT, produced_at=time.monotonic())]

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting)

    def has_work_ready(self) -> bool:
        return bool(self._waiting)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            ENGINE_TURNS.encoders -= 1

    def stats(self) -> EngineStats:
        return EngineStats(running=self.num_running, waiting=len(self._waiting), kv_usage=0.0,
                           prefix_queries=0, prefix_hits=0, preemptions=0,
                           prompt_tokens=self.num_prompt_tokens_total, generation_tokens=0)

    # ---- one step ----------------------------------------------------------------
    def _take_batch(self, budget: int) -> list[_Input]:
        """The waiting inputs in rank order while they fit the token and sequence budgets."""
        batch: list[_Input] = []
        tokens = 0
        while self._waiting and len(batch) < self.limits.max_num_seqs:
            n = len(self._waiting[0].token_ids)
            if batch and tokens + n > budget:
                break
            batch.append(heapq.heappop(self._waiting))
            tokens += n
        return batch

    def step(self) -> list[RequestOutput]:
        with ENGINE_TURNS as turns:
            budget = self.max_batch_tokens
            if turns.others_waiting or turns.decoders_busy:
                # NOTE: a decoder with streams waits for its turn: this pass takes at most
                # half its latest step (at the encoder's measured speed), so a stream's gap
                # between tokens grows by at most half while embeddings flood in.
                room = 0.5 * turns.last_decoder_seconds / max(self._seconds_per_token, 1e-9)
                budget = max(1, min(self.short_pass_tokens, int(room)))
            started = time.perf_counter()
            outputs, tokens = self._step(budget)
            if tokens:
                measured = (time.perf_counter() - started) / tokens
                self._seconds_per_token = (measured if self._seconds_per_token == 0
                                           else 0.8 * self._seconds_per_token + 0.2 * measured)
            return outputs

    def _step(self, budget: int) -> tuple[list[RequestOutput], int]:
        batch = self._take_batch(budget)
        if not batch:
            return [], 0
        now = time.monotonic()
        first = []
        for item in batch:
            item.timings.scheduled = now
            if item.request_id not in self._reported:
                self._reported.add(item.request_id)
                first.append(item.request_id)
        if first and self.on_first_scheduled is not None:
            self.on_first_scheduled(first)
        self.num_running = len(batch)
        try:
            vectors = self.model([item.token_ids for item in batch]).float().cpu()
        finally:
            self.num_running = 0
        done = time.monotonic()
        outputs = []
        for item, vector in zip(batch, vectors):
            left = self._left.get(item.request_id)
            if left is None:
                continue        # aborted while the pass ran
            if left == 1:
                del self._left[item.request_id]
                self._reported.discard(item.request_id)
            else:
                self._left[item.request_id] = left - 1
            item.timings.prefill_done = item.timings.finished = done
            self.num_prompt_tokens_total += len(item.token_ids)
            outputs.append(RequestOutput(
                request_id=item.request_id, index=item.index, text="", token_ids=[], finished=True,
                finish_reason=FinishReason.STOP, num_prompt_tokens=len(item.token_ids),
                timings=item.timings, produced_at=done, embedding=vector.numpy()))
        return outputs, sum(len(item.token_ids) for item in batch)
