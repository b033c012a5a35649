"""Per-key quotas: requests and tokens per sliding minute, concurrent requests, request sizes.

GenerationService calls `admit(req)` where it admits a request (so every endpoint of both
dialects is counted the same way) and gets a QuotaLease, which it closes when the request's
stream ends or its client leaves. State is in memory, per server process.

Tokens: at admission a request reserves prompt + n x max_tokens (but never more than the
key's whole per-minute budget, so a large request still runs when the key is idle); when it
ends, the reservation becomes the tokens really used (prompt + generated), counted for the
minute after it ended. A request that never reached the engine is refunded in full.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from shoal.access.model_access import check_model_access
from shoal.access.principal import KeyLimits
from shoal.core.errors import InvalidParameterError, RateLimitedError
from shoal.serving.request import GenerateRequest

WINDOW_SECONDS = 60.0


class QuotaLease:
    """One admitted request's share of its key's quotas; closed exactly once."""

    __slots__ = ("_usage", "_admitted_at", "_prompt_tokens", "reserved", "_open")

    def __init__(self, usage: "_KeyUsage | None", admitted_at: float, prompt_tokens: int,
                 reserved: int) -> None:
        self._usage, self._admitted_at = usage, admitted_at
        self._prompt_tokens, self.reserved = prompt_tokens, reserved
        self._open = usage is not None

    def finish(self, output_tokens: int) -> None:
        """The request ended (or its client left) after `output_tokens` were generated."""
        if self._open:
            self._open = False
            self._usage.close(self, self._prompt_tokens + output_tokens)

    def cancel(self) -> None:
        """The request never ran (refused later in admission, or dropped before starting)."""
        if self._open:
            self._open = False
            self._usage.refund(self, self._admitted_at)


UNLIMITED = QuotaLease(None, 0.0, 0, 0)


class _KeyUsage:
    """One key's recent requests and tokens, over a sliding window."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.requests: deque[float] = deque()              # admission times
        self.tokens: deque[tuple[float, int]] = deque()    # (end time, tokens used)
        self.running: set[QuotaLease] = set()

    def prune(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_SECONDS:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_SECONDS:
            self.tokens.popleft()

    def tokens_in_use(self) -> int:
        return sum(t for _, t in self.tokens) + sum(lease.reserved for lease in self.running)

    def seconds_until_tokens_free(self, needed: int, now: float) -> float:
        """When `needed` tokens of the window will have aged out, taking running requests
        as if they ended now (the soonest they could stop counting)."""
        entries = sorted([*self.tokens, *((now, lease.reserved) for lease in self.running)])
        freed = 0
        for ended, tokens in entries:
            freed += tokens
            if freed >= needed:
                return ended + WINDOW_SECONDS - now
        return WINDOW_SECONDS

    def close(self, lease: QuotaLease, used_tokens: int) -> None:
        self.running.discard(lease)
        self.tokens.append((self.clock(), used_tokens))

    def refund(self, lease: QuotaLease, admitted_at: float) -> None:
        self.running.discard(lease)
        try:
            self.requests.remove(admitted_at)
        except ValueError:
            pass        # already out of the window


class KeyQuotas:
    """The quotas of every key, enforced at admission."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._usage: dict[str, _KeyUsage] = {}

    def admit(self, req: GenerateRequest) -> QuotaLease:
        """Checks the caller's key against the request and takes its share, or raises:
        403 (model not allowed), 400 (prompt over the key's size limit), 429 (over a limit).
        Lowers the request's max_tokens to the key's cap when it asks for more."""
        principal = req.principal
        check_model_access(principal, req.model)
        limits = principal.limits
        if limits is None or principal.key_id is None:
            return UNLIMITED
        num_prompt = len(req.prompt_token_ids)
        _apply_size_limits(req, limits, principal.name or principal.key_id)
        max_tokens = req.params.max_tokens
        if max_tokens is None:
            max_tokens = max(0, req.model.max_model_len - num_prompt)
        reserved = num_prompt + req.params.n * max_tokens
        if limits.tokens_per_minute is not None:
            reserved = min(reserved, limits.tokens_per_minute)

        now = self.clock()
        usage = self._usage.setdefault(principal.key_id, _KeyUsage(self.clock))
        usage.prune(now)
        who = f"for key '{principal.name}'"
        rpm = limits.requests_per_minute
        if rpm is not None and len(usage.requests) >= rpm:
            wait = usage.requests[len(usage.requests) - rpm] + WINDOW_SECONDS - now
            raise RateLimitedError(f"rate limit: {rpm} requests per minute {who}",
                                   retry_after=math.ceil(wait), model=req.model.name)
        tpm = limits.tokens_per_minute
        if tpm is not None:
            in_use = usage.tokens_in_use()
            if in_use + reserved > tpm:
                wait = usage.seconds_until_tokens_free(in_use + reserved - tpm, now)
                raise RateLimitedError(
                    f"rate limit: {tpm} tokens per minute {who} (this request needs up to "
                    f"{reserved}; {in_use} are in use)", retry_after=math.ceil(wait),
                    model=req.model.name)
        concurrent = limits.max_concurrent
        if concurrent is not None and len(usage.running) >= concurrent:
            # NOTE: nothing says when a running request ends; 1 s is the polite minimum.
            raise RateLimitedError(f"rate limit: {concurrent} concurrent requests {who}",
                                   retry_after=1, model=req.model.name)
        lease = QuotaLease(usage, now, num_prompt, reserved)
        usage.requests.append(now)
        usage.running.add(lease)
        return lease


def _apply_size_limits(req: GenerateRequest, limits: KeyLimits, who: str) -> None:
    num_prompt = len(req.prompt_token_ids)
    if limits.max_prompt_tokens is not None and num_prompt > limits.max_prompt_tokens:
        raise InvalidParameterError("prompt", f"the prompt has {num_prompt} tokens; the API key "
                                    f"'{who}' allows at most {limits.max_prompt_tokens}")
    if limits.max_tokens is not None:
        room = max(1, req.model.max_model_len - num_prompt)
        asked = req.params.max_tokens if req.params.max_tokens is not None else room
        req.params.max_tokens = min(asked, limits.max_tokens)
        req.params.min_tokens = min(req.params.min_tokens, req.params.max_tokens)
