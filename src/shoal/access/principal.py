"""The caller of a request: who it is, what it may use, its quotas, and the context variable
that carries it.

The HTTP middleware sets `current_principal` once per request, and everything that runs for
that request (routes, the generation service, log records, the audit log) reads it without
the value being threaded through every call. Starlette runs a route and its streaming body in
tasks that inherit the context.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from shoal.core.errors import InvalidParameterError

INTERACTIVE = "interactive"
BATCH = "batch"
PRIORITY_CLASSES = (INTERACTIVE, BATCH)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's quotas; None means no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None          # prompt + generated tokens
    max_concurrent: int | None = None
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None                 # a request's max_tokens is lowered to this

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent",
                     "max_prompt_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidParameterError(name, f"must be a whole number >= 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a request, as the authentication step established it.

    key_id is None for an anonymous caller (auth off, as on loopback by default); the
    key itself is never kept here. allowed_models None means every model (names as
    store.names.normalize_name gives them). admin: may manage models and keys.
    limits None: no per-key quotas (anonymous callers, SHOAL_ADMIN_KEY).
    """

    key_id: str | None = None
    name: str | None = None
    priority_class: str = INTERACTIVE
    allowed_models: frozenset[str] | None = None
    admin: bool = False
    limits: KeyLimits | None = None


ANONYMOUS = Principal()

current_principal: ContextVar[Principal] = ContextVar("shoal_principal", default=ANONYMOUS)
