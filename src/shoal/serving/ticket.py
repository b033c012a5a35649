"""AdmissionTicket: what one admitted request holds until it ends, given back exactly once.

Admission takes, in order, the caller's key quota (403/429) and a place in the model's queue
(503); a ticket then also holds the model loaded. Whatever ends the request (its last
token, an error, a client that left, the garbage collector for a stream never read)
releases the ticket, and a second release does nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from shoal.serving.admission import AdmissionControl, QueueSlot
from shoal.serving.quotas import KeyQuotas, QuotaLease
from shoal.serving.request import GenerateRequest
from shoal.serving.residency import ResidencyManager


class AdmissionTicket:
    """One admitted request's queue slot, its key's quota lease and its hold on the model."""

    __slots__ = ("request", "slot", "_lease", "_residency", "_on_release", "admitted_at", "_held")

    def __init__(self, request: GenerateRequest, slot: QueueSlot, lease: QuotaLease,
                 residency: ResidencyManager, on_release: Callable[[AdmissionTicket], None]) -> None:
        self.request, self.slot, self._lease = request, slot, lease
        self._residency, self._on_release, self._held = residency, on_release, True
        self.admitted_at = time.monotonic()
        # NOTE: the stream holds the model itself, so the caller can let go of its own
        # hold as soon as the stream exists; the model stays until the stream ends.
        residency.retain(request.model)

    @classmethod
    def admit(cls, request: GenerateRequest, quotas: KeyQuotas, admission: AdmissionControl,
              residency: ResidencyManager,
              on_release: Callable[[AdmissionTicket], None]) -> AdmissionTicket:
        """Takes the key's quota, then a queue slot; raises (holding nothing) when refused."""
        lease = quotas.admit(request)
        try:
            slot = admission.admit(request.model.name, request.model.engine.limits.max_num_seqs,
                                   request.principal.priority_class, len(request.prompt_token_ids))
        except BaseException:
            lease.cancel()
            raise
        return cls(request, slot, lease, residency, on_release)

    def abort(self) -> None:
        """Aborts the request in the engine (its stream then ends with reason "abort")."""
        self.request.model.engine.abort(self.request.request_id)

    def release(self, output_tokens: int | None = None) -> None:
        """output_tokens None: the request never ran (its key is not charged for it)."""
        if self._held:
            self._held = False
            if output_tokens is None:
                self._lease.cancel()
            else:
                self._lease.finish(output_tokens)
            self.slot.release()
            self._on_release(self)
            self._residency.release(self.request.model, self.request.keep_alive)
