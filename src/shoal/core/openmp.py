"""How torch's OpenMP workers wait between parallel regions, set before torch loads.

libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when it loads. A worker that finished
a region spins for GOMP_SPINCOUNT rounds (one pause instruction each), then sleeps:
- libgomp's default spin (milliseconds) took a core from the C++ kernels' work pool
  (model/kernels/csrc/pool.h) after each of torch's ops in a decode step: one stream decoded
  ~25% slower;
- no spin at all (OMP_WAIT_POLICY=PASSIVE, the earlier setting) made every region of an
  embedding model's pass wake a sleeping worker, which on these VMs costs ~0.1 ms: all-MiniLM
  ran at half its speed;
- a short spin covers the gaps between one pass's back-to-back regions, and decode steps start
  no regions at all (ModelRunner.step_threads).
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

# ~0.1-0.5 ms of spinning (docs/benchmarks.md, "OpenMP's wait")
SPIN_ROUNDS = "10000"


def set_openmp_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """The short spin, unless the user chose a wait policy or a spin count (theirs wins)."""
    if "OMP_WAIT_POLICY" not in environ:
        environ.setdefault("GOMP_SPINCOUNT", SPIN_ROUNDS)
