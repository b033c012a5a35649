"""EngineStats: a snapshot of one engine's state and counters, for metrics scrapes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Read without locks from another thread: plain ints and lengths, each current at its
    own moment (a scrape needs no more)."""

    running: int                # requests in the running batch
    waiting: int                # requests waiting to be scheduled
    kv_usage: float             # fraction of KV cache blocks in use
    prefix_queries: int         # prompt tokens looked up in the prefix cache
    prefix_hits: int            # ... and found there
    preemptions: int
    prompt_tokens: int          # prompt tokens of requests whose prefill finished
    generation_tokens: int
