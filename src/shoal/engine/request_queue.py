"""RequestQueue: the scheduler's waiting requests, and which of them it admits next.

Order: interactive requests before batch ones, then vLLM's priority (lower value first),
then arrival, then the order the scheduler added them in. A batch request that has waited
its aging time (`Request.promoted_at`) is owed a share: while interactive requests wait,
every AGED_BATCH_TURN-th admission goes to the oldest such request.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from shoal.engine.request import Request

# While interactive requests wait, every this-many-th admission goes to a batch request that
# has waited its aging time (SHOAL_BATCH_AGING), so aged batch work always keeps moving.
AGED_BATCH_TURN = 4


@dataclass(order=True, frozen=True, slots=True)
class QueuedRequest:
    """A waiting request with the key the queue orders it by (the fields compare in order)."""

    batch: bool           # interactive (False) before batch (True)
    priority: int
    arrival_time: float
    seq: int              # the scheduler's insertion order: the last tie-break
    request: Request = field(compare=False)


class RequestQueue:
    """Waiting requests in admission order, with the aged batch requests' share of admissions."""

    def __init__(self) -> None:
        self._entries: list[QueuedRequest] = []     # kept sorted
        # interactive admissions since a batch request was last admitted
        self._interactive_streak = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, request: Request, seq: int) -> None:
        """Queues a new or preempted request; `seq` breaks ties and stays the request's own."""
        bisect.insort(self._entries, QueuedRequest(request.batch, request.priority,
                                                   request.arrival_time, seq, request))

    def peek(self, now: float) -> Request:
        """The request to admit next: the head, except that the oldest aged batch request takes
        every AGED_BATCH_TURN-th admission while interactive requests wait.

        NOTE: aging grants a share, not precedence. Under sustained overload every batch
        request in the queue has aged; were aged ones simply ranked with interactive ones
        (being older, ahead of them), interactive requests would wait behind the whole batch
        backlog. With a share, batch work keeps moving at a guaranteed rate and interactive
        requests wait only behind each other."""
        head = self._entries[0]
        if head.batch or self._interactive_streak < AGED_BATCH_TURN - 1:
            return head.request          # no interactive request waits, or not the batch's turn
        aged = next((e for e in self._entries if e.batch and now >= e.request.promoted_at), head)
        return aged.request

    def admit(self, request: Request) -> None:
        """Takes `request` out of the queue into the running batch, counting the admission
        towards the aged batch requests' share."""
        self.remove(request)
        self._interactive_streak = 0 if request.batch else self._interactive_streak + 1

    def remove(self, request: Request) -> None:
        """Takes `request` out of the queue (admitted, finished, aborted or passed over)."""
        for position, entry in enumerate(self._entries):
            if entry.request is request:
                del self._entries[position]
                return
        raise ValueError(f"request {request.request_id!r} is not waiting")

    def num_interactive(self) -> int:
        return sum(1 for entry in self._entries if not entry.batch)

    def first_interactive(self, count: int) -> list[Request]:
        """The first `count` interactive requests in queue order (fewer if fewer wait)."""
        heads = []
        for entry in self._entries[:max(count, 0)]:
            if entry.batch:
                break                    # the batch class starts here
            heads.append(entry.request)
        return heads
