"""RequestQueue on its own: the waiting order, the aged batch requests' share, removal, peeking."""
from __future__ import annotations

import math

import pytest

from fake_runner import make_request
from shoal.engine.request import Request
from shoal.engine.request_queue import AGED_BATCH_TURN, RequestQueue


def _request(request_id: str, *, batch: bool = False, priority: int = 0, arrival: float = 0.0,
             aging: float = math.inf) -> Request:
    return make_request(request_id, [1, 2, 3], batch=batch, priority=priority, arrival_time=arrival,
                        batch_aging_s=aging)


def _drain(queue: RequestQueue, now: float = 0.0, count: int | None = None) -> list[str]:
    """Admits `count` requests (all by default), one at a time; returns the admission order."""
    order = []
    while queue and (count is None or len(order) < count):
        request = queue.peek(now)
        queue.admit(request)
        order.append(request.request_id)
    return order


def test_interactive_then_priority_then_arrival_then_insertion() -> None:
    queue = RequestQueue()
    requests = [
        _request("batch_urgent", batch=True, priority=-5, arrival=0.0),
        _request("late", arrival=3.0),
        _request("low", priority=2, arrival=0.0),
        _request("early", arrival=1.0),
        _request("tie_second", arrival=2.0),
        _request("tie_first", arrival=2.0),
        _request("batch", batch=True, arrival=0.0),
    ]
    seqs = {"tie_first": 0, "tie_second": 1}
    for seq, request in enumerate(requests, start=2):
        queue.push(request, seqs.get(request.request_id, seq))
    assert len(queue) == 7
    assert queue.num_interactive() == 5
    assert _drain(queue) == ["early", "tie_first", "tie_second", "late", "low", "batch_urgent",
                             "batch"]


def test_peek_does_not_take() -> None:
    queue = RequestQueue()
    first, second = _request("a", arrival=0.0), _request("b", arrival=1.0)
    queue.push(second, 1)
    queue.push(first, 0)
    assert queue.peek(0.0) is first and queue.peek(0.0) is first and len(queue) == 2


def test_an_aged_batch_request_takes_every_nth_admission_while_interactive_ones_wait() -> None:
    queue = RequestQueue()
    for i in range(3):
        queue.push(_request(f"batch{i}", batch=True, arrival=float(i), aging=5.0), i)
    for i in range(10):
        queue.push(_request(f"chat{i}", arrival=100.0 + i), 10 + i)
    # before any batch request has aged, interactive requests go first, all of them
    assert _drain(queue, now=4.0, count=AGED_BATCH_TURN) == [f"chat{i}" for i in range(AGED_BATCH_TURN)]
    # after aging: the streak already reached the turn, so the oldest aged batch request is next,
    # then AGED_BATCH_TURN - 1 interactive requests, then the next aged batch request
    order = _drain(queue, now=10.0, count=2 * AGED_BATCH_TURN)
    turn = AGED_BATCH_TURN - 1
    assert order == (["batch0"] + [f"chat{i}" for i in range(AGED_BATCH_TURN, AGED_BATCH_TURN + turn)]
                     + ["batch1"] + [f"chat{i}" for i in range(AGED_BATCH_TURN + turn,
                                                              AGED_BATCH_TURN + 2 * turn)])


def test_the_turn_goes_only_to_an_aged_batch_request() -> None:
    queue = RequestQueue()
    young = _request("young_batch", batch=True, arrival=0.0, aging=50.0)
    queue.push(young, 0)
    for i in range(AGED_BATCH_TURN + 2):
        queue.push(_request(f"chat{i}", arrival=1.0 + i), 1 + i)
    # not aged at now=10: the interactive requests keep the head however long the streak
    assert _drain(queue, now=10.0, count=AGED_BATCH_TURN + 1) == \
        [f"chat{i}" for i in range(AGED_BATCH_TURN + 1)]
    assert queue.peek(50.0) is young            # aged now, and its turn is overdue


def test_admitting_a_batch_request_restarts_the_count() -> None:
    queue = RequestQueue()
    queue.push(_request("old_batch", batch=True, arrival=0.0, aging=0.0), 0)
    queue.push(_request("other_batch", batch=True, arrival=1.0, aging=0.0), 1)
    for i in range(2 * AGED_BATCH_TURN):
        queue.push(_request(f"chat{i}", arrival=10.0 + i), 10 + i)
    order = _drain(queue, now=100.0, count=2 * AGED_BATCH_TURN)
    assert order.index("old_batch") == AGED_BATCH_TURN - 1
    assert order.index("other_batch") == 2 * AGED_BATCH_TURN - 1


def test_with_no_interactive_request_waiting_batch_requests_go_in_order() -> None:
    queue = RequestQueue()
    queue.push(_request("b_late", batch=True, arrival=5.0, aging=0.0), 0)
    queue.push(_request("b_early", batch=True, arrival=1.0, aging=1e9), 1)
    assert _drain(queue, now=10.0) == ["b_early", "b_late"]


def test_remove_takes_any_request_and_a_pushed_back_one_keeps_its_place() -> None:
    queue = RequestQueue()
    requests = [_request(f"r{i}", arrival=float(i)) for i in range(5)]
    for seq, request in enumerate(requests):
        queue.push(request, seq)
    queue.remove(requests[2])                    # from the middle
    queue.remove(requests[0])                    # the head
    assert len(queue) == 3 and queue.peek(0.0) is requests[1]
    queue.push(requests[0], 0)                   # e.g. passed over, or preempted
    assert _drain(queue) == ["r0", "r1", "r3", "r4"]
    with pytest.raises(ValueError):
        queue.remove(requests[2])


def test_remove_does_not_count_as_an_admission() -> None:
    queue = RequestQueue()
    queue.push(_request("batch", batch=True, arrival=0.0, aging=0.0), 0)
    chats = [_request(f"chat{i}", arrival=1.0 + i) for i in range(AGED_BATCH_TURN + 1)]
    for seq, request in enumerate(chats, start=1):
        queue.push(request, seq)
    for request in chats[:AGED_BATCH_TURN - 1]:
        queue.remove(request)                    # aborted, not admitted: no streak
    assert queue.peek(10.0) is chats[AGED_BATCH_TURN - 1]


def test_first_interactive_stops_at_the_batch_class() -> None:
    queue = RequestQueue()
    queue.push(_request("batch", batch=True, priority=-10, arrival=0.0), 0)
    chats = [_request(f"chat{i}", arrival=float(i)) for i in range(3)]
    for seq, request in enumerate(reversed(chats), start=1):
        queue.push(request, seq)
    assert queue.first_interactive(2) == chats[:2]
    assert queue.first_interactive(10) == chats
    assert queue.first_interactive(0) == [] and queue.first_interactive(-1) == []
    only_batch = RequestQueue()
    only_batch.push(_request("batch", batch=True), 0)
    assert only_batch.first_interactive(4) == [] and only_batch.num_interactive() == 0
