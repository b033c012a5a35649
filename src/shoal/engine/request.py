"""Request: the engine's record of one sequence being generated."""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from shoal.core.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    """Why a sequence ended, as reported to callers.

    NOTE: a str enum: it equals, formats and json-serializes as its value, so the dialects
    compare it with and write it as the plain strings of their wire formats."""

    STOP = "stop"          # an EOS or stop token, or a stop string
    LENGTH = "length"      # max_tokens, or the model's context
    ABORT = "abort"        # cancelled before it ended


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = FinishReason.STOP.value
    FINISHED_LENGTH = FinishReason.LENGTH.value
    FINISHED_ABORTED = FinishReason.ABORT.value

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> FinishReason | None:
        # NOTE: a finished status's value is its finish reason's (see the members above).
        return FinishReason(self.value) if self.finished else None


@dataclass(slots=True)
class RequestTimings:
    """Wall-clock moments (time.monotonic seconds) in a request's life."""

    arrival: float = 0.0
    scheduled: float | None = None       # first admitted into the running batch
    first_token: float | None = None
    finished: float | None = None
    prefill_done: float | None = None    # prompt fully computed


@dataclass(eq=False, slots=True)
class Request:
    """One sequence: its prompt, its output so far, and how much of it the KV cache holds.

    The scheduler knows nothing of "prefill" or "decode": each step it gives a request
    up to `num_tokens - num_computed_tokens` tokens to compute. A request whose
    computed tokens reach `num_tokens` samples its next token in that step.

    `group_id` ties the n samples of one prompt together: the scheduler lets a sibling
    start only once the group's leader has computed the prompt, so the siblings find
    the prompt's blocks in the prefix cache instead of computing them again.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16                 # resolved bound (sampling_params.max_tokens or context room)
    priority: int = 0                    # lower value = more important (as vLLM)
    arrival_time: float = field(default_factory=time.monotonic)
    # Scheduling class: a batch request is taken only after every interactive one, until it
    # has waited `batch_aging_s` since arrival; from then on it is owed a share of
    # admissions, and memory preemption treats it as interactive, so it cannot starve.
    # `priority` orders requests within a class.
    batch: bool = False
    batch_aging_s: float = math.inf
    group_id: str | None = None
    group_leader: "Request | None" = None
    cache_salt: int = 0                  # mixed into block hashes (model/adapter identity)
    # True while the request needs the logits of its prompt positions (prompt_logprobs):
    # its prompt is then computed, never taken from the prefix cache
    skip_prefix_cache: bool = False
    embed: bool = False                  # prefill only: the prompt's pooled hidden state is the output

    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0           # prompt tokens found in the prefix cache at first schedule
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks, filled lazily
    timings: RequestTimings = field(default_factory=RequestTimings)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        self.timings.arrival = self.arrival_time

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV the sequence needs: prompt + output so far."""
        return len(self.all_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        """Tokens whose KV is not computed yet: the prompt's rest, or 1 while decoding."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def promoted_at(self) -> float:
        """When a batch request starts competing as interactive (inf: never)."""
        return self.arrival_time + self.batch_aging_s

    def class_rank(self, now: float) -> int:
        """0: ranks as interactive when choosing whom to preempt for memory; 1: as batch."""
        return int(self.batch and now < self.promoted_at)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
