"""Per-row random numbers keyed only by (seed, step), independent of the batch."""
from __future__ import annotations

_MASK64 = (1 << 64) - 1
# NOTE: 31 bits so that bits * (a CDF total of ~2**31) stays inside int64.
RANDOM_BITS = 31


def _splitmix64(x: int) -> int:
    """One round of the splitmix64 finaliser (a bijective 64-bit mix)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def random_bits(seed: int, step: int) -> int:
    """Returns RANDOM_BITS uniform random bits for token number `step` of seed `seed`.

    NOTE: a pure function of its arguments, so a request draws the same number whether
    it runs alone, in any batch, or is recomputed after preemption.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) >> (64 - RANDOM_BITS)
