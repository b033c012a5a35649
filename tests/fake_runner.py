"""A deterministic stand-in for the model runner, reading its 'KV' through block tables.

Each KV slot holds what a real model's KV depends on: the token at that position and a
digest of the whole prefix up to it. The runner writes every scheduled token's slot
first, then "attends" over the request's slots through its block table (as a real runner
writes a layer's KV before its attention reads it), checks that every slot holds exactly
the KV the request expects, and derives the next token from those slots. A wrong prefix
hit, a stale or unwritten block or a short block table therefore raises right away, and
the output is a function of the full token history, so recompute after preemption
reproduces the same tokens.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable, Sequence

from shoal.core.sampling_params import SamplingParams
from shoal.engine.kv import NULL_BLOCK_ID, KVCacheManager
from shoal.engine.request import Request
from shoal.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


class KVMismatch(AssertionError):
    """The runner read KV that does not belong to the request's token history."""


def _digest(tokens: Sequence[int]) -> int:
    return int.from_bytes(hashlib.blake2b(repr(tuple(tokens)).encode(), digest_size=8).digest(), "little")


def next_token(tokens: Sequence[int], vocab_size: int) -> int:
    """The fake model: the next token is a hash of the whole history."""
    return _digest(tokens) % vocab_size


class FakeRunner:
    """Executes SchedulerOutputs against a simulated paged KV store."""

    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = 1000) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv: list[list[tuple[int, int] | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.tokens_computed = 0

    def _slot(self, block_ids: list[int], pos: int) -> tuple[int, int]:
        index = pos // self.block_size
        if index >= len(block_ids):
            raise KVMismatch(f"position {pos} lies past the block table ({len(block_ids)} blocks)")
        if block_ids[index] == NULL_BLOCK_ID:
            raise KVMismatch("the null block appears in a block table")
        return block_ids[index], pos % self.block_size

    def execute(self, output: SchedulerOutput) -> dict[str, int]:
        for entry in output.scheduled:            # 1. write every scheduled token's KV
            tokens = entry.request.all_token_ids
            for pos in range(entry.start_pos, entry.start_pos + entry.num_new_tokens):
                block, offset = self._slot(entry.block_ids, pos)
                self.kv[block][offset] = (tokens[pos], _digest(tokens[:pos + 1]))
            self.tokens_computed += entry.num_new_tokens
        sampled = {}
        for entry in output.scheduled:            # 2. attend over the whole prefix
            request = entry.request
            end = entry.start_pos + entry.num_new_tokens
            tokens = request.all_token_ids
            for pos in range(end):
                block, offset = self._slot(entry.block_ids, pos)
                if self.kv[block][offset] != (tokens[pos], _digest(tokens[:pos + 1])):
                    raise KVMismatch(f"{request.request_id}: wrong KV at position {pos} (block {block})")
            if entry.samples:
                sampled[request.request_id] = next_token(tokens[:end], self.vocab_size)
        return sampled


def make_request(request_id: str, prompt: Sequence[int], max_tokens: int = 8, **kwargs) -> Request:
    """A greedy request whose max_tokens is both the sampling limit and the resolved bound."""
    params = kwargs.pop("sampling_params", None) or SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(request_id=request_id, prompt_token_ids=list(prompt), sampling_params=params,
                   max_tokens=max_tokens, **kwargs)


def reference_output(prompt: Sequence[int], max_tokens: int, vocab_size: int = 1000,
                     eos_token_ids: frozenset[int] = frozenset(), max_model_len: int = 1 << 30) -> list[int]:
    """What a request generates alone, computed straight from the fake model."""
    tokens = list(prompt)
    out: list[int] = []
    while True:
        token = next_token(tokens, vocab_size)
        tokens.append(token)
        out.append(token)
        if token in eos_token_ids or len(out) >= max_tokens or len(tokens) >= max_model_len:
            return out


# The scheduler shape these tests were written for. NOTE: not the engine's defaults (those are
# EngineConfig's alone; SchedulerConfig has none): a small step budget and no decoding cap
# keep the tests' token arithmetic simple.
TEST_SCHEDULER_SHAPE: dict[str, object] = dict(
    max_model_len=4096, max_num_seqs=64, max_num_batched_tokens=512, enable_chunked_prefill=True,
    long_prefill_token_threshold=0, max_batched_tokens_while_decoding=0)


def scheduler_config(block_size: int = 4, **overrides: object) -> SchedulerConfig:
    """TEST_SCHEDULER_SHAPE with `overrides`."""
    settings = {**TEST_SCHEDULER_SHAPE, "block_size": block_size, **overrides}
    return SchedulerConfig(**settings)  # type: ignore[arg-type]


class Harness:
    """A scheduler, its KV manager and a fake runner, stepped together with checks."""

    def __init__(self, num_blocks: int = 64, block_size: int = 4, vocab_size: int = 1000,
                 clock: Callable[[], float] = time.monotonic, **config: object) -> None:
        self.config = scheduler_config(block_size, **config)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
        self.scheduler = Scheduler(self.config, self.kv, clock)
        self.runner = FakeRunner(num_blocks, block_size, vocab_size)
        self.outputs: list[SchedulerOutput] = []

    def add(self, request: Request) -> Request:
        self.scheduler.add_request(request)
        return request

    def step(self) -> SchedulerOutput:
        was_running = {r.request_id for r in self.scheduler.running}
        output = self.scheduler.schedule()
        memory_preemption = len(output.preempted) > output.num_seats_yielded
        if memory_preemption and any(s.request.request_id not in was_running for s in output.scheduled):
            raise AssertionError("a waiting request was admitted in a step that preempted for memory")
        if output.num_batched_tokens > self.config.max_num_batched_tokens:
            raise AssertionError(f"budget exceeded: {output.num_batched_tokens}")
        if len(self.scheduler.running) > self.config.max_num_seqs:
            raise AssertionError("max_num_seqs exceeded")
        self.scheduler.update_from_output(output, self.runner.execute(output))
        self.kv.check_integrity()
        self.outputs.append(output)
        return output

    def run(self, max_steps: int = 10_000, on_step: Callable[[int], None] | None = None) -> int:
        steps = 0
        while self.scheduler.has_unfinished_requests():
            if on_step is not None:
                on_step(steps)
            self.step()
            steps += 1
            if steps > max_steps:
                raise AssertionError("the scheduler made no progress")
        return steps
