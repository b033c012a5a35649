"""Where the server is in its life: starting, serving, draining (http/probes.py reports it)."""
from __future__ import annotations


class ServerLifecycle:
    """Set by the app's lifespan (started) and by the signal handler (draining)."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        return "ready" if self.started else "starting"
