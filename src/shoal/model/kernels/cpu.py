"""Builds (once, cached) and loads shoal's C++ CPU kernels; None when unavailable.

The kernels are compiled on first use with the machine's C++ compiler through
torch.utils.cpp_extension and cached under ~/.cache/torch_extensions (or
TORCH_EXTENSIONS_DIR). Where no compiler is present, or SHOAL_CPU_KERNELS=0,
shoal falls back to pure PyTorch paths with identical semantics.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("bindings.cpp", "paged_attention.cpp", "fused_ops.cpp", "sampling.cpp")]
_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False


def _build_name() -> str:
    digest = hashlib.sha256()
    for source in _SOURCES:
        digest.update(source.read_bytes())
    # NOTE: the build compiles against one torch's headers (their path is in build.ninja);
    # two environments sharing a name would rebuild each other's cache back and forth.
    import torch

    digest.update(f"{torch.__version__} {Path(torch.__file__).parent}".encode())
    # NOTE: -march=native code is only valid on the CPU that built it.
    digest.update(platform.processor().encode())
    try:
        digest.update(Path("/proc/cpuinfo").read_bytes().split(b"\n\n")[0])
    except OSError:
        pass
    return f"shoal_cpu_ops_{digest.hexdigest()[:12]}"


def load_cpu_kernels() -> ModuleType | None:
    """The compiled module, or None if kernels are disabled or cannot be built."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("SHOAL_CPU_KERNELS", "1") in ("0", "false", "no", "off"):
            return None
        try:
            from filelock import FileLock
            from torch.utils.cpp_extension import _get_build_directory, load

            name = _build_name()
            build_dir = Path(_get_build_directory(name, verbose=False))
            # NOTE: torch guards a build with a plain "lock" file and waits forever for it;
            # a build killed half-way (Ctrl-C on a first run) leaves it behind and every
            # later start would hang. shoal builds under its own OS lock (released when a
            # process dies), so a torch lock found while holding it is stale.
            with FileLock(str(build_dir / "shoal-build.lock")):
                (build_dir / "lock").unlink(missing_ok=True)
                _module = load(name=name, sources=[str(s) for s in _stable_copies(build_dir)],
                               extra_cflags=["-O3", "-march=native", "-fopenmp"],
                               extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
            log.warning("shoal CPU kernels unavailable, using PyTorch fallbacks: %s", exc)
            _module = None
        return _module


def _stable_copies(build_dir: Path) -> list[Path]:
    """The sources, copied into the build directory so their paths are the same everywhere.

    NOTE: ninja rebuilds when a source's path changes, and the build is cached by content;
    two checkouts of the same sources (git worktrees, a venv moved) would otherwise
    rebuild each other's cache back and forth.
    """
    copies = []
    for source in _SOURCES:
        copy = build_dir / "src" / source.name
        data = source.read_bytes()
        if not copy.exists() or copy.read_bytes() != data:
            copy.parent.mkdir(parents=True, exist_ok=True)
            tmp = copy.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(copy)
        copies.append(copy)
    return copies
