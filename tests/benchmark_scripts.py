"""benchmarks/ holds scripts, not a package: the tests of their pieces load one as a module."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str, module_name: str) -> ModuleType:
    """benchmarks/`filename`, executed as the module `module_name` (registered in sys.modules:
    dataclasses look their module up by name)."""
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
