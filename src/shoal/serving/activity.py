"""What the server is doing besides answering: loading models, building the CPU kernels.

One sentence for /readyz, /api/ps, `shoal serve`'s log and the CLI's progress lines, so a
client that waits (a first start: download, kernel build, weights) is never left silent.
"""
from __future__ import annotations

from shoal.model.kernels.cpu import kernel_status
from shoal.serving.residency import ResidencyManager


def server_activity(residency: ResidencyManager) -> str | None:
    """e.g. "loading smollm2:135m: downloading (3 s); building the CPU kernels (x86-64-v3, 2 s)",
    or None when the server is doing nothing but serving."""
    parts = [f"loading {name}: {phase} ({seconds:.0f} s)" for name, phase, seconds, _ in residency.loading()]
    kernels = kernel_status()
    if kernels.state == "building":
        parts.append(f"building the CPU kernels ({kernels.isa}, {kernels.seconds or 0:.0f} s)")
    return "; ".join(parts) or None
