"""Per-request context shared by the guardrails: the caller's identity and the request id.

Both live in context variables: the HTTP middleware sets them once per request, and
everything that runs for that request (routes, the generation service, log records,
the audit log) reads them without the values being threaded through every call.
Starlette runs a route and its streaming body in tasks that inherit the context.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shoal.guard.keys import KeyLimits

INTERACTIVE = "interactive"
BATCH = "batch"
PRIORITY_CLASSES = (INTERACTIVE, BATCH)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a request, as the authentication step established it.

    key_id is None for an anonymous caller (auth off, as on loopback by default); the
    key itself is never kept here. allowed_models None means every model (names as
    residency.catalog.normalize_name gives them). admin: may manage models and keys.
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
current_request_id: ContextVar[str | None] = ContextVar("shoal_request_id", default=None)
