"""Where the server is in its life: starting, serving, draining (http/probes.py reports it)."""
from __future__ import annotations


class ServerLifecycle:
    """Set by the app's lifespan (started), by the server while its pinned models load
    (loading_pinned) and by the signal handler (draining)."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False
        self.loading_pinned = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and not self.loading_pinned

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        if self.loading_pinned:
            return "loading"
        return "ready" if self.started else "starting"
