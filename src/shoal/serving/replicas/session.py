"""The routing session of the request being served (session affinity, docs/scale-out.md).

The HTTP edge sets it from the header SHOAL_SESSION_HEADER names; ReplicaEngine reads it when
it routes the request. A context variable, not a request field, because only the replica
router cares: the dialects and the in-process engine never see it.
"""
from __future__ import annotations

from contextvars import ContextVar

MAX_SESSION_ID = 256        # longer ids are cut: they only key a dict

current_session: ContextVar[str | None] = ContextVar("shoal_session", default=None)
