"""Which replica a request goes to: KV-cache-aware, least loaded, or round robin.

The front keeps, per replica, the set of prefix-block hashes the replica reported as cached
(its KV manager's store/evict events) and its requests in flight. A request's prompt block
hashes (engine/kv/hashing.py, the engine's own function) then tell exactly how many leading
blocks each replica could reuse.
"""
from __future__ import annotations

import random
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shoal.core.errors import InvalidParameterError

POLICIES = ("cache_aware", "least_loaded", "round_robin")
MAX_SESSIONS = 100_000      # sessions remembered (least recently seen forgotten first)


@dataclass(slots=True, eq=False)
class ReplicaState:
    """What the router knows of one replica."""

    name: str
    cached: set[int] = field(default_factory=set)   # prefix-block hashes it holds
    in_flight: int = 0                              # requests routed to it, not yet ended
    up: bool = True
    routed: int = 0                                 # requests ever routed to it
    incarnation: str | None = None                  # the actor's life (a restart starts afresh)
    # NOTE: the prompt blocks of its requests in flight count as held: a burst of requests
    # sharing a new prefix then sticks to one replica before its first store event arrives.
    pending: Counter[int] = field(default_factory=Counter)
    # the first block of each prompt routed here, while the replica may hold it: how many
    # distinct prompts (prefix families) live here, for placing new ones evenly
    roots: set[int] = field(default_factory=set)

    def apply(self, incarnation: str, events: Iterable[tuple[bool, int]]) -> None:
        """Applies a batch of (stored?, hash) events, in the order the replica made them."""
        if incarnation != self.incarnation:
            self.cached.clear()       # a restarted replica starts with an empty cache
            self.roots.clear()
            self.incarnation = incarnation
        for stored, block_hash in events:
            if stored:
                self.cached.add(block_hash)
            else:
                self.cached.discard(block_hash)
                self.roots.discard(block_hash)

    def begin(self, hashes: Sequence[int]) -> None:
        """A request with these prompt blocks was routed here."""
        self.in_flight += 1
        self.routed += 1
        self.pending.update(hashes)
        if hashes:
            self.roots.add(hashes[0])

    def end(self, hashes: Sequence[int]) -> None:
        self.in_flight -= 1
        self.pending.subtract(hashes)
        self.pending += Counter()       # drops the zero counts

    def held_prompts(self) -> int:
        """Distinct prompts (by their first block) this replica holds or is computing."""
        return sum(1 for h in self.roots if h in self.cached or h in self.pending)

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        """Leading prompt blocks this replica holds (a chain: a gap ends the match)."""
        count = 0
        for block_hash in hashes:
            if block_hash not in self.cached and block_hash not in self.pending:
                break
            count += 1
        return count


@dataclass(slots=True)
class Decision:
    replica: ReplicaState
    matched_blocks: int
    reason: str           # "prefix", "new_prefix", "least_loaded", "imbalance", "round_robin", "session"


class Router:
    """Scores replicas: matched_blocks / prompt_blocks - beta * relative_load, unless the load
    is imbalanced beyond `imbalance` requests, then least loaded of two random picks. A prompt
    no replica holds any block of goes to the one holding the fewest prompts, then blocks.

    A request with a session id goes where the session's last request went while that replica
    is up and not loaded beyond `imbalance` requests more than the least loaded; otherwise the
    policy picks, and the session follows its pick.
    """

    def __init__(self, policy: str = "cache_aware", beta: float = 0.5, imbalance: int = 4,
                 rng: random.Random | None = None, max_sessions: int = MAX_SESSIONS) -> None:
        if policy not in POLICIES:
            raise InvalidParameterError("routing", f"must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.beta = beta
        self.imbalance = imbalance
        self._rng = rng or random.Random()
        self._next = 0
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, ReplicaState] = OrderedDict()

    def choose(self, replicas: Sequence[ReplicaState], hashes: Sequence[int],
               exclude: Iterable[ReplicaState] = (), session: str | None = None) -> Decision | None:
        """The replica for a prompt with these block hashes; None when none is up."""
        skip = set(map(id, exclude))
        candidates = [r for r in replicas if r.up and id(r) not in skip]
        if not candidates:
            return None
        if session is None:
            return self._choose(candidates, hashes)
        home = self._sessions.get(session)
        least = min(r.in_flight for r in candidates)
        if home is not None and any(r is home for r in candidates) and home.in_flight - least <= self.imbalance:
            self._sessions.move_to_end(session)
            return Decision(home, home.matched_blocks(hashes), "session")
        decision = self._choose(candidates, hashes)
        self._sessions[session] = decision.replica
        self._sessions.move_to_end(session)
        if len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return decision

    def session_home(self, session: str) -> ReplicaState | None:
        return self._sessions.get(session)

    def _choose(self, candidates: list[ReplicaState], hashes: Sequence[int]) -> Decision:
        if self.policy == "round_robin":
            self._next += 1
            pick = candidates[self._next % len(candidates)]
            return Decision(pick, pick.matched_blocks(hashes), "round_robin")
        if self.policy == "least_loaded":
            return self._least_loaded(candidates, hashes, "least_loaded")
        loads = [r.in_flight for r in candidates]
        if max(loads) - min(loads) > self.imbalance:
            return self._least_loaded(candidates, hashes, "imbalance")
        matches = [r.matched_blocks(hashes) for r in candidates]
        if not any(matches):
            # a new prefix: to the replica holding the fewest prompts, then blocks (its requests
            # in flight counted), so that the prefixes, and the cache they need, split evenly;
            # one that got more than its cache holds would evict its own prompts
            pick = min(candidates, key=lambda r: (r.held_prompts(), len(r.cached) + len(r.pending),
                                                  r.in_flight, r.routed))
            return Decision(pick, 0, "new_prefix")
        most = max(1, max(loads))
        blocks = max(1, len(hashes))

        def score(r: ReplicaState) -> tuple[float, int, int]:
            # ties (e.g. no replica holds the prefix): fewer in flight, then fewer ever routed
            return (r.matched_blocks(hashes) / blocks - self.beta * r.in_flight / most, -r.in_flight, -r.routed)

        pick = max(candidates, key=score)
        matched = pick.matched_blocks(hashes)
        return Decision(pick, matched, "prefix" if matched else "least_loaded")

    def _least_loaded(self, candidates: list[ReplicaState], hashes: Sequence[int], reason: str) -> Decision:
        # power of two choices: near the least loaded, without every front herding onto one
        pair = self._rng.sample(candidates, min(2, len(candidates)))
        pick = min(pair, key=lambda r: (r.in_flight, r.routed))
        return Decision(pick, pick.matched_blocks(hashes), reason)
