"""Scheduler: continuous batching with chunked prefill, prefix caching and preemption.

Each step hands every request up to `num_tokens - num_computed_tokens` tokens to compute
under one token budget; there are no separate prefill and decode phases. A request whose
computed tokens reach `num_tokens` samples its next token in that step.

Waiting requests are ordered by (class, priority, arrival_time) in a RequestQueue:
interactive requests before batch ones, then vLLM's priority (lower value first), then
arrival. A batch request that has waited `batch_aging_s` since arrival is owed a share:
while interactive requests wait, every AGED_BATCH_TURN-th admission goes to the oldest such
request, so a stream of interactive traffic cannot starve it, and a backlog of batch work
cannot hold interactive requests up.

Policy, in order:
0. Seats: when max_num_seqs requests run and interactive ones wait, running batch requests
   that were never preempted give up their seats (newest first); and the step keeps enough
   of its token budget for the prompts of the interactive requests at the queue's head.
1. Running requests: decoding ones first, then unfinished prompts (interactive before
   batch), each group in admission order. When a request's KV cannot grow, the running
   request that ranks last (largest (rank, priority, arrival_time): a batch request
   first) is preempted by recompute, possibly the request itself, and the allocation
   is retried.
2. Only if nothing was preempted for memory this step: waiting requests in that order. The head
   blocks the queue (FCFS) when its KV does not fit; the only requests passed over are
   n>1 siblings whose leader has not computed the prompt yet (they could not run anyway
   and keep their place).
Without chunked prefill a request's remaining tokens are scheduled in one go or it waits
for a step with room; the config then requires max_num_batched_tokens >= max_model_len,
so every prompt fits an otherwise empty step.

Contract with the engine: schedule(), run the whole SchedulerOutput (aborted requests
included: a request admitted in the same step may read KV they write), then
update_from_output(), before the next schedule().
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from shoal.core.config import EngineConfig
from shoal.core.errors import ContextLengthExceededError, InvalidParameterError, ShoalError
from shoal.engine.kv.hashing import update_block_hashes
from shoal.engine.kv.manager import KVCacheManager
from shoal.engine.limits import kv_tokens_needed
from shoal.engine.request import Request, RequestStatus
from shoal.engine.request_queue import RequestQueue


class SchedulerStateError(ShoalError):
    """The engine drove the scheduler out of order (a bug, not a user error)."""


@dataclass(slots=True, kw_only=True)
class SchedulerConfig:
    """Limits of one engine step and of the batch.

    NOTE: no defaults here: the engine derives these from its EngineConfig
    (from_engine_config), whose defaults are the only ones."""

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enable_chunked_prefill: bool
    long_prefill_token_threshold: int       # 0: no per-request cap on a prefill chunk
    # Step budget while some request is decoding (0: max_num_batched_tokens). A smaller
    # budget then bounds how long running streams wait between tokens when a long prompt
    # arrives, while a lone prompt still gets big, efficient chunks.
    max_batched_tokens_while_decoding: int

    @classmethod
    def from_engine_config(cls, config: EngineConfig, max_model_len: int) -> SchedulerConfig:
        """The scheduler's share of an EngineConfig, for the context length the model and
        its KV cache allow (see builder.plan_kv_cache)."""
        max_batched = config.max_num_batched_tokens
        if not config.enable_chunked_prefill:
            max_batched = max(max_batched, max_model_len)   # a whole prompt must fit one step
        return cls(max_model_len=max_model_len, max_num_seqs=config.max_num_seqs,
                   max_num_batched_tokens=max_batched, block_size=config.block_size,
                   enable_chunked_prefill=config.enable_chunked_prefill,
                   long_prefill_token_threshold=config.long_prefill_token_threshold,
                   max_batched_tokens_while_decoding=config.max_batched_tokens_while_decoding)

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(name, f"must be a positive integer, got {value!r}")
        for name in ("long_prefill_token_threshold", "max_batched_tokens_while_decoding"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidParameterError(name, f"must be an integer >= 0, got {value!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise InvalidParameterError(
                "max_num_batched_tokens",
                f"must be >= max_model_len ({self.max_model_len}) without chunked prefill, "
                f"got {self.max_num_batched_tokens}")


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: compute `num_new_tokens` tokens from `start_pos`."""

    request: Request
    num_new_tokens: int
    block_ids: list[int]
    start_pos: int
    num_tokens_at_schedule: int = field(init=False)

    def __post_init__(self) -> None:
        # NOTE: frozen here because update_from_output appends the sampled token.
        self.num_tokens_at_schedule = self.request.num_tokens

    @property
    def samples(self) -> bool:
        """True when this step computes the last known token, so a new one is sampled."""
        return (self.start_pos + self.num_new_tokens == self.num_tokens_at_schedule
                and not self.request.embed)


@dataclass(slots=True)
class SchedulerOutput:
    """What one step computes, and what changed since the previous step."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_seats_yielded: int = 0          # how many of `preempted` gave their seat to an interactive request
    num_batched_tokens: int = 0
    finished_request_ids: list[str] = field(default_factory=list)  # since the last step
    first_scheduled: list[Request] = field(default_factory=list)   # scheduled for the first time


class Scheduler:
    """Decides each step which requests compute how many tokens, within KV and token budgets."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if kv_manager.block_size != config.block_size:
            raise InvalidParameterError(
                "block_size", f"config says {config.block_size}, KV manager uses {kv_manager.block_size}")
        self.config = config
        self.kv = kv_manager
        self._clock = clock
        self.running: list[Request] = []
        self._waiting = RequestQueue()
        self._requests: dict[str, Request] = {}                      # every unfinished request
        self._seq: dict[str, int] = {}                               # insertion order, tie-break
        self._counter = itertools.count()
        self._finished_ids: list[str] = []
        self.num_preemptions_total = 0

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # -- request lifecycle -----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queues a new request; raises if it could never fit the model or the KV cache."""
        if request.request_id in self._requests:
            raise InvalidParameterError("request_id", f"{request.request_id!r} is already running")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise InvalidParameterError("request", "only a new, waiting request can be added")
        self._check_fits(request)
        leader = request.group_leader
        if leader is not None and leader is not request and not leader.is_finished \
                and self._requests.get(leader.request_id) is not leader:
            raise InvalidParameterError("group_leader", "the group's leader must be added first")
        update_block_hashes(request, self.config.block_size)
        self._requests[request.request_id] = request
        self._seq[request.request_id] = next(self._counter)
        self._push_waiting(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Aborts requests in any state, freeing their blocks now; unknown ids are ignored."""
        aborted = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        self._check_when_idle()
        return aborted

    def finish_request(self, request: Request, status: RequestStatus,
                       stop_reason: int | str | None = None) -> None:
        """Ends a request from outside (e.g. a stop string matched in the detokenizer)."""
        if not status.finished:
            raise InvalidParameterError("status", f"{status} is not a finished status")
        if request.is_finished or self._requests.get(request.request_id) is not request:
            return
        self._finish(request, status, stop_reason)
        self._check_when_idle()

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Picks this step's tokens: running requests first, then waiting ones."""
        output = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        now = self._clock()
        output.num_seats_yielded = self._yield_seats_to_interactive(output, now)
        budget = self._step_budget()
        reserved = self._interactive_reserve(budget)
        budget = self._schedule_running(output, budget - reserved, now) + reserved
        # NOTE: no admissions in a step that preempted for memory: the pool is evidently
        # short, and the preempted requests' blocks must not go to a newcomer at once.
        # Seats yielded to interactive requests are for exactly those admissions.
        if len(output.preempted) == output.num_seats_yielded:
            self._schedule_waiting(output, budget, now)
        output.num_batched_tokens = sum(s.num_new_tokens for s in output.scheduled)
        return output

    def update_from_output(self, output: SchedulerOutput,
                           sampled_token_ids: dict[str, int]) -> list[Request]:
        """Commits a computed step; returns the requests that received a new token."""
        now = self._clock()
        received = []
        for entry in output.scheduled:
            request = entry.request
            if request.is_finished:
                continue   # aborted or finished while the step ran
            if request.num_computed_tokens != entry.start_pos:
                raise SchedulerStateError(
                    f"request {request.request_id!r}: output applied twice or out of order")
            request.num_computed_tokens += entry.num_new_tokens
            if request.timings.prefill_done is None and request.num_computed_tokens >= request.num_prompt_tokens:
                request.timings.prefill_done = now
            if request.embed and request.num_computed_tokens >= request.num_prompt_tokens:
                # NOTE: an embedding is read off the prompt's last row: nothing is sampled,
                # and its blocks go back (to the prefix cache) at once.
                self._finish(request, RequestStatus.FINISHED_STOPPED)
                received.append(request)
                continue
            if not entry.samples:
                continue
            token = sampled_token_ids[request.request_id]
            request.append_output_token(token)
            update_block_hashes(request, self.config.block_size)
            if request.timings.first_token is None:
                request.timings.first_token = now
            self._check_stop(request, token)
            received.append(request)
        self._check_when_idle()
        return received

    # -- scheduling internals --------------------------------------------------------------

    def _step_budget(self) -> int:
        budget = self.config.max_num_batched_tokens
        cap = self.config.max_batched_tokens_while_decoding
        if cap and self.config.enable_chunked_prefill and any(
                r.num_tokens_to_compute == 1 for r in self.running):
            budget = min(budget, max(cap, 1))
        return budget

    def _schedule_running(self, output: SchedulerOutput, budget: int, now: float) -> int:
        # NOTE: decoding streams first (a token each), then prompts still being computed,
        # interactive before batch, each group in admission order. In plain admission order
        # a long batch prompt would take the step's budget from every stream admitted after
        # it, an interactive request's unfinished prompt included.
        order = sorted(self.running, key=lambda r: (r.num_tokens_to_compute > 1, r.batch))
        for request in order:
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue                       # preempted earlier in this loop
            num_new = self._tokens_to_schedule(request.num_tokens_to_compute, budget)
            if num_new == 0:
                continue
            # NOTE: while/else: the else branch runs once allocation succeeds, not after
            # `break` (the request preempted itself and left the running list).
            while not self.kv.allocate_slots(request, num_new):
                victim = self._lowest_priority_running(now)
                budget += self._unschedule(output, victim)
                self._preempt(victim)
                output.preempted.append(victim)
                if victim is request:
                    break
            else:
                output.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int, now: float) -> None:
        passed_over = []
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._waiting.peek(now)
            if not self._leader_ready(request):
                # NOTE: out of the queue until this step's admissions are done, so the next
                # peek looks past it; it keeps its place (its key) when it comes back.
                self._waiting.remove(request)
                passed_over.append(request)
                continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = self._tokens_to_schedule(request.num_tokens - num_hit, budget)
            if num_new == 0 or not self.kv.allocate_slots(request, num_new, hit_blocks, num_hit):
                break
            self._waiting.admit(request)
            self._admit(request, num_hit, output)
            output.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        for request in passed_over:
            self._push_waiting(request)

    def _yield_seats_to_interactive(self, output: SchedulerOutput, now: float) -> int:
        """With every seat (max_num_seqs) taken, running batch requests give theirs to waiting
        interactive ones, newest first; returns how many were preempted.

        Without this an interactive request waits for a batch answer to end, which under
        load means waiting out hundreds of tokens. A victim restarts by recompute (its full
        blocks stay in the prefix cache, so it loses little), and a request that has been
        preempted once is never displaced for a seat again, so every batch request, once
        readmitted, runs to its end: batch throughput pays a bounded price, and the waiting
        order (aged batch requests' share included) decides who gets a seat that falls free."""
        free = self.config.max_num_seqs - len(self.running)
        wanted = self._waiting.num_interactive() - max(free, 0)
        if wanted <= 0:
            return 0
        candidates = [r for r in self.running if r.batch and r.num_preemptions == 0]
        candidates.sort(key=lambda r: (r.arrival_time, self._seq[r.request_id]), reverse=True)
        for victim in candidates[:wanted]:
            self._preempt(victim)
            output.preempted.append(victim)
        return min(wanted, len(candidates))

    def _interactive_reserve(self, budget: int) -> int:
        """Step tokens kept from running requests' prompt chunks for the interactive requests
        at the head of the queue (as many as there are free seats).

        NOTE: running requests are scheduled first, and under load some are always in the
        middle of long batch prompts; without a reserve those chunks take the whole step
        budget (small while others decode) and an interactive request waits for them all.
        Decoding streams still get their token: the reserve leaves one per decoding stream,
        and running prompts at least half the budget."""
        heads = self._waiting.first_interactive(self.config.max_num_seqs - len(self.running))
        if not heads:
            return 0
        wanted = sum(r.num_tokens_to_compute for r in heads if self._leader_ready(r))
        decoding = sum(1 for r in self.running if r.num_tokens_to_compute == 1)
        # NOTE: at most half the budget: the head may not fit the KV cache this step, and
        # running prompts must keep moving (they may be what frees it).
        return max(0, min(wanted, budget - decoding, budget // 2))

    def _tokens_to_schedule(self, remaining: int, budget: int) -> int:
        if not self.config.enable_chunked_prefill:
            return remaining if remaining <= budget else 0
        num = min(remaining, budget)
        if self.config.long_prefill_token_threshold:
            num = min(num, self.config.long_prefill_token_threshold)
        return num

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(request, num_new, self.kv.get_block_ids(request.request_id),
                                request.num_computed_tokens)

    def _admit(self, request: Request, num_hit: int, output: SchedulerOutput) -> None:
        request.num_computed_tokens = num_hit
        if request.timings.scheduled is None:
            request.timings.scheduled = self._clock()
            request.num_cached_tokens = num_hit
            output.first_scheduled.append(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _leader_ready(self, request: Request) -> bool:
        leader = request.group_leader
        return (leader is None or leader is request or leader.is_finished
                or leader.num_computed_tokens >= leader.num_prompt_tokens)

    def _lowest_priority_running(self, now: float) -> Request:
        # NOTE: the inverse of the waiting order, so a request is never preempted in favour
        # of one the queue would have put behind it.
        return max(self.running, key=lambda r: (r.class_rank(now), r.priority, r.arrival_time,
                                                self._seq[r.request_id]))

    def _unschedule(self, output: SchedulerOutput, request: Request) -> int:
        """Drops a request already scheduled this step; returns the tokens it had."""
        for position, entry in enumerate(output.scheduled):
            if entry.request is request:
                del output.scheduled[position]
                return entry.num_new_tokens
        return 0

    def _preempt(self, request: Request) -> None:
        """Preempts by recompute: frees every block; the request restarts from the waiting queue."""
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        self._waiting.push(request, self._seq[request.request_id])

    # -- finishing -------------------------------------------------------------------------

    def _check_stop(self, request: Request, token: int) -> None:
        # NOTE: a stop token wins over the length limit it may hit at the same time, so
        # a sequence that ended naturally on its last allowed token reports "stop".
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if (not params.ignore_eos and token in request.eos_token_ids) or token in params.stop_token_ids:
                self._finish(request, RequestStatus.FINISHED_STOPPED, token)
                return
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            self._finish(request, RequestStatus.FINISHED_LENGTH)

    def _finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        request.status = status
        request.stop_reason = stop_reason
        request.timings.finished = self._clock()
        self.kv.free(request)
        if request in self.running:
            self.running.remove(request)
        else:
            self._waiting.remove(request)
        del self._requests[request.request_id]
        del self._seq[request.request_id]
        self._finished_ids.append(request.request_id)

    def _check_fits(self, request: Request) -> None:
        # NOTE: requests arrive validated (EngineLimits.validate); this stays as the
        # scheduler's own guard of the engine thread: a request that can never fit would
        # otherwise wait at the head of the queue forever, and every request behind it.
        num_prompt = request.num_prompt_tokens
        max_len = self.config.max_model_len
        if num_prompt == 0:
            raise InvalidParameterError("prompt", "must hold at least one token")
        if num_prompt > max_len:
            raise ContextLengthExceededError(num_prompt, request.max_tokens, max_len)
        max_kv_tokens = kv_tokens_needed(num_prompt, min(request.max_tokens, max_len - num_prompt))
        if self.kv.blocks_needed(max_kv_tokens) > self.kv.num_blocks:
            raise InvalidParameterError(
                "max_tokens", f"the request may need {max_kv_tokens} tokens of KV cache but it "
                f"holds only {self.kv.num_blocks * self.kv.block_size}")

    def _check_when_idle(self) -> None:
        if self._requests:
            return
        if self.kv.num_used_blocks:
            raise SchedulerStateError(f"idle, yet {self.kv.num_used_blocks} KV blocks are in use")
        self.kv.check_integrity()
