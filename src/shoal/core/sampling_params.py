"""SamplingParams: how one request chooses its tokens, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from shoal.core.echo import clip
from shoal.core.errors import InvalidParameterError
from shoal.core.structured_output import StructuredOutput

# NOTE: OpenAI caps logprobs alternatives at 20; vLLM allows more but the cost grows
# with each, so shoal keeps OpenAI's bound.
MAX_LOGPROBS = 20


MAX_N = 128   # OpenAI's own limit on n


def _check_number(name: str, value: object, *, integer: bool = False) -> None:
    # bool is an int subclass in Python; a JSON `true` for a number is a type error.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(name, f"must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        if not float(value).is_integer():
            raise InvalidParameterError(name, f"must be an integer, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidParameterError(name, f"must be a finite number, got {value!r}")


@dataclass(slots=True)
class SamplingParams:
    """Generation settings of one request (OpenAI, vLLM and Ollama knobs in one place).

    temperature 0 means greedy. top_k <= 0 and top_p == 1 disable those filters.
    max_tokens None means "until the context is full or a stop condition hits".
    logprobs None returns no logprobs; k >= 0 returns the chosen token's logprob plus
    the k most likely alternatives.
    repetition_window limits repetition/presence/frequency penalties to the last N
    tokens (Ollama's repeat_last_n); None looks at all of them.
    structured constrains the output to a JSON schema, regex, choice or grammar; EOS is
    then allowed only where the constraint is complete.
    prompt_logprobs None returns none; k >= 0 returns each prompt token's log-probability
    and rank with the k most likely alternatives (vLLM's); the prompt is then computed, not
    taken from the prefix cache.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_window: int | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("n", "min_tokens", "top_k"):
            _check_number(name, getattr(self, name), integer=True)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name))
        self.n = int(self.n)
        self.min_tokens = int(self.min_tokens)
        self.top_k = int(self.top_k)
        if not 1 <= self.n <= MAX_N:
            # NOTE: bounded because every sample is a request object and a stream: an
            # unbounded n is a one-line denial of service (a billion samples exhausted memory).
            raise InvalidParameterError("n", f"must be in 1..{MAX_N}, got {self.n}")
        if self.max_tokens is not None:
            _check_number("max_tokens", self.max_tokens, integer=True)
            self.max_tokens = int(self.max_tokens)
            if self.max_tokens < 1:
                raise InvalidParameterError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise InvalidParameterError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameterError(
                "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.temperature < 0:
            raise InvalidParameterError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            # NOTE: vLLM and some clients send -1 for "disabled"; normalise to 0.
            if self.top_k != -1:
                raise InvalidParameterError("top_k", f"must be >= 0 (or -1 to disable), got {self.top_k}")
            self.top_k = 0
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParameterError("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise InvalidParameterError(
                "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidParameterError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_window is not None:
            _check_number("repetition_window", self.repetition_window, integer=True)
            self.repetition_window = int(self.repetition_window)
            if self.repetition_window < 0:
                raise InvalidParameterError(
                    "repetition_window", f"must be >= 0, got {self.repetition_window}")
        if self.seed is not None:
            _check_number("seed", self.seed, integer=True)
            self.seed = int(self.seed)
        if self.logprobs is not None:
            _check_number("logprobs", self.logprobs, integer=True)
            self.logprobs = int(self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise InvalidParameterError(
                    "logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None:
            _check_number("prompt_logprobs", self.prompt_logprobs, integer=True)
            self.prompt_logprobs = int(self.prompt_logprobs)
            if not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise InvalidParameterError(
                    "prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_token_ids("stop_token_ids", self.stop_token_ids)
        if self.logit_bias:
            self.logit_bias = self._normalise_logit_bias(self.logit_bias)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidParameterError(
                "structured", f"must be a StructuredOutput, got {type(self.structured).__name__}")

    @staticmethod
    def _normalise_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise InvalidParameterError("stop", "must be a string or a list of strings")
        if any(s == "" for s in stop):
            raise InvalidParameterError("stop", "stop strings must not be empty")
        return list(stop)

    @staticmethod
    def _normalise_token_ids(name: str, ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise InvalidParameterError(name, "must be a list of integers")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InvalidParameterError(name, f"must hold non-negative integers, got {t!r}")
        return list(ids)

    @staticmethod
    def _normalise_logit_bias(bias: object) -> dict[int, float]:
        if not isinstance(bias, dict):
            raise InvalidParameterError("logit_bias", "must map token ids to numbers")
        out: dict[int, float] = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise InvalidParameterError("logit_bias", f"key {clip(repr(key))} is not a token id") from None
            _check_number("logit_bias", value)
            if token < 0 or not -100.0 <= float(value) <= 100.0:
                raise InvalidParameterError(
                    "logit_bias", f"token {clip(repr(key))}: bias must be in [-100, 100] for a token id >= 0")
            out[token] = float(value)
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Checks the token ids the params mention exist in the model's vocabulary; a top_k
        at or above its size keeps every token, so it becomes 0 (no filter)."""
        if self.top_k >= vocab_size:
            # NOTE: the sampler packs top_k into int64; 10**30 would kill the engine loop.
            self.top_k = 0
        for token in self.stop_token_ids:
            if token >= vocab_size:
                raise InvalidParameterError(
                    "stop_token_ids", f"token {token} is outside the vocabulary ({vocab_size})")
        for token in (self.logit_bias or {}):
            if token >= vocab_size:
                raise InvalidParameterError(
                    "logit_bias", f"token {token} is outside the vocabulary ({vocab_size})")
