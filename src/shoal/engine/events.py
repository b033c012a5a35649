"""What AsyncEngine.generate yields for one request: typed events, in the order they happen.

`Scheduled` comes at most once, when the engine first takes the request out of its waiting
queue, and before any Update computed after that; a request aborted while it still waits
gets its final Update without one. The iteration ends after the Update in which the last
sample finished.
"""
from __future__ import annotations

from dataclasses import dataclass

from shoal.engine.outputs import RequestOutput


@dataclass(frozen=True, slots=True)
class Scheduled:
    """The engine took the request into its running batch."""


@dataclass(frozen=True, slots=True)
class Update:
    """Every output of the request that arrived since the previous read, oldest first.

    NOTE: a reader that falls behind (a slow HTTP client) gets one larger Update instead
    of a growing backlog of small ones; the engine never waits for a reader.
    """

    outputs: list[RequestOutput]


EngineEvent = Scheduled | Update
