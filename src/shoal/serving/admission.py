"""Admission control: a bounded waiting queue per model and priority class.

A request is *waiting* from its admission until the engine first schedules it, then
*running* until its stream ends. Requests that find a free slot in the running batch
(`max_num_seqs` minus those running) never count against the queue; beyond that,
each class has its own bound on waiting requests (interactive: SHOAL_MAX_QUEUE, batch:
SHOAL_MAX_QUEUE_BATCH) and all classes share one bound on waiting prompt tokens
(SHOAL_MAX_QUEUED_TOKENS). Over a bound the request is refused with 503 + Retry-After
before anything reaches the engine, so memory stays bounded however many clients come.

Everything here runs on the event loop thread, so the counters need no lock.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal.access.principal import BATCH, INTERACTIVE, PRIORITY_CLASSES
from shoal.core.errors import ServerBusyError


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """The bounds of one model's waiting queue (ServerSettings' fields of the same names)."""

    max_queue: int                # interactive requests waiting beyond the running batch
    max_queue_batch: int          # batch requests waiting beyond the running batch
    max_queued_tokens: int        # prompt tokens waiting, both classes together


@dataclass(slots=True)
class ModelQueue:
    """One model's admitted requests: how many run, and what waits in each class."""

    running: int = 0
    running_by_class: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITY_CLASSES, 0))
    waiting: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITY_CLASSES, 0))
    waiting_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITY_CLASSES, 0))

    @property
    def in_flight(self) -> int:
        return self.running + sum(self.waiting.values())

    def free_slots(self, max_num_seqs: int) -> int:
        return max(0, max_num_seqs - self.running)

    def slots_ahead(self, priority_class: str, max_num_seqs: int) -> int:
        """Free running slots left for a new request of this class once the waiting requests
        the scheduler takes first (its class's, and interactive ones for batch) have theirs;
        zero or less: it would be the (1 - result)th of its class beyond the running batch."""
        free = self.free_slots(max_num_seqs)
        if priority_class == BATCH:
            free = max(0, free - self.waiting[INTERACTIVE])
        return free - self.waiting[priority_class]


class QueueSlot:
    """One admitted request's place: waiting until scheduled(), then running until release()."""

    __slots__ = ("_queue", "_class", "_tokens", "_state")

    def __init__(self, queue: ModelQueue, priority_class: str, prompt_tokens: int) -> None:
        self._queue, self._class, self._tokens = queue, priority_class, prompt_tokens
        self._state = "waiting"
        queue.waiting[priority_class] += 1
        queue.waiting_tokens[priority_class] += prompt_tokens

    @property
    def is_waiting(self) -> bool:
        return self._state == "waiting"

    def scheduled(self) -> None:
        """The engine took the request into its running batch (idempotent)."""
        if self._state == "waiting":
            self._leave_queue()
            self._queue.running += 1
            self._queue.running_by_class[self._class] += 1
            self._state = "running"

    def release(self) -> None:
        """The request ended, in whatever state (idempotent)."""
        if self._state == "waiting":
            self._leave_queue()
        elif self._state == "running":
            self._queue.running -= 1
            self._queue.running_by_class[self._class] -= 1
        self._state = "released"

    def _leave_queue(self) -> None:
        self._queue.waiting[self._class] -= 1
        self._queue.waiting_tokens[self._class] -= self._tokens


class AdmissionControl:
    """Admits requests per model within the queue bounds, or refuses them with ServerBusyError."""

    def __init__(self, limits: QueueLimits,
                 mean_latency: Callable[[str], float | None] = lambda _model: None) -> None:
        self.limits = limits
        self._mean_latency = mean_latency
        self._queues: dict[str, ModelQueue] = {}

    def queue(self, model: str) -> ModelQueue:
        return self._queues.setdefault(model, ModelQueue())

    def queues(self) -> Iterator[tuple[str, ModelQueue]]:
        return iter(list(self._queues.items()))

    def in_flight(self) -> int:
        """Requests admitted and not yet ended, over every model."""
        return sum(q.in_flight for q in self._queues.values())

    def most_at_once(self, max_num_seqs: int, priority_class: str) -> tuple[int, str]:
        """The most requests of this class the model ever holds at once (its running batch
        plus its class's queue), and the setting that bounds them."""
        if priority_class == BATCH:
            return max_num_seqs + self.limits.max_queue_batch, "SHOAL_MAX_QUEUE_BATCH"
        return max_num_seqs + self.limits.max_queue, "SHOAL_MAX_QUEUE"

    def admit(self, model: str, max_num_seqs: int, priority_class: str,
              prompt_tokens: int) -> QueueSlot:
        """A slot for one request, or ServerBusyError naming the bound it would pass."""
        queue = self.queue(model)
        if priority_class not in PRIORITY_CLASSES:
            priority_class = INTERACTIVE
        ahead = queue.slots_ahead(priority_class, max_num_seqs)
        if ahead <= 0:     # no free slot for it: it joins the queue proper
            bound, setting = ((self.limits.max_queue_batch, "SHOAL_MAX_QUEUE_BATCH")
                              if priority_class == BATCH else (self.limits.max_queue, "SHOAL_MAX_QUEUE"))
            if 1 - ahead > bound:
                raise ServerBusyError(
                    f"server busy: the {priority_class} queue of {model} is full ({bound} "
                    f"requests may wait beyond the running batch, {setting}); try again later",
                    self._retry_after(model, queue, max_num_seqs), "queue_full")
            waiting_tokens = sum(queue.waiting_tokens.values())
            if waiting_tokens + prompt_tokens > self.limits.max_queued_tokens:
                raise ServerBusyError(
                    f"server busy: {waiting_tokens} prompt tokens are already waiting for {model}, "
                    f"and this request's {prompt_tokens} would pass the limit of "
                    f"{self.limits.max_queued_tokens} (SHOAL_MAX_QUEUED_TOKENS); try again later",
                    self._retry_after(model, queue, max_num_seqs), "queue_tokens_full")
        return QueueSlot(queue, priority_class, prompt_tokens)

    def retry_after(self, model: str, max_num_seqs: int) -> int:
        return self._retry_after(model, self.queue(model), max_num_seqs)

    def _retry_after(self, model: str, queue: ModelQueue, max_num_seqs: int) -> int:
        """Seconds until a slot is likely free: batches of waiting requests x mean latency."""
        mean = self._mean_latency(model) or 1.0
        batches_ahead = max(1, sum(queue.waiting.values())) / max(1, max_num_seqs)
        return int(min(60, max(1, math.ceil(mean * batches_ahead))))


class AdmissionCollector(Collector):
    """The queue gauges, read at scrape time: waiting requests and prompt tokens per class."""

    def __init__(self, admission: AdmissionControl, prefix: str) -> None:
        self._admission = admission
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "priority_class"]
        requests = GaugeMetricFamily(self._prefix + "num_requests_queued",
                                     "Requests admitted and not yet scheduled, by priority class.",
                                     labels=labels)
        tokens = GaugeMetricFamily(self._prefix + "num_queued_prompt_tokens",
                                   "Prompt tokens of the requests not yet scheduled, by priority class.",
                                   labels=labels)
        for model, queue in self._admission.queues():
            for priority_class in PRIORITY_CLASSES:
                requests.add_metric([model, priority_class], queue.waiting[priority_class])
                tokens.add_metric([model, priority_class], queue.waiting_tokens[priority_class])
        yield requests
        yield tokens
