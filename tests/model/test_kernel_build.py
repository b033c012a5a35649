"""Where a C++ compiler is present, the kernels must build.

The kernel tests skip, and the engine falls back to PyTorch, when the build fails; without
this test a source that no longer compiles would only show as skipped tests and a slower
server."""
from __future__ import annotations

import pytest

from shoal.model.kernels import cpu


@pytest.mark.skipif(cpu._compiler() is None or not cpu.kernels_enabled(),
                    reason="no C++ compiler here, or SHOAL_CPU_KERNELS=0 (the kernels are optional)")
def test_the_kernels_build_where_a_compiler_is_present() -> None:
    kernels = cpu.load_cpu_kernels()
    status = cpu.kernel_status()
    assert kernels is not None and status.state == "ready", status.error
