"""The house rule, read from the code: imports run one way, from the HTTP edge down, with no circles.

Every `import` in src/shoal counts, wherever it stands (module level, inside a function, under
TYPE_CHECKING): an import moved into a function still ties the two modules together, so it
cannot hide a circle from this test.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The floors, top to bottom. A package may import its own floor's packages and any floor
# below; never one above. docs/architecture.md draws the same order.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli", "bench"),       # clients of the HTTP API (and of the store for local work)
    ("http",),              # FastAPI app, middleware, both dialects, log/audit/trace sinks
    ("serving",),           # the generate service, admission, quotas, residency, metrics state
    ("access",),            # keys, the keys DB, principals (no HTTP)
    ("store", "engine"),    # the model store; the engine (scheduler, KV, runner, sampling)
    ("model",),             # configs, loaders, the decoder, layers, kernels
    ("text",),              # tokenizers, chat templates, Go templates, detokenizer
    ("core",),              # errors, engine config, sampling params
)
# The package's face (shoal/__init__.py, __main__.py) stands above every floor.
TOP_MODULES = frozenset({"shoal", "shoal.__main__"})
# Only the HTTP edge (and its clients above it) may speak HTTP through a web framework.
WEB_FRAMEWORKS = frozenset({"fastapi", "starlette", "uvicorn"})
NO_WEB_FRAMEWORK = ("core", "text", "model", "engine", "store", "access", "serving")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The shoal modules one file imports (a name imported from a package counts as its submodule
    when one of that name exists)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:     # `import a.b.c` names module a.b.c
                target = target.rpartition(".")[0]
            if target.startswith("shoal") and target != name:
                found.add(target)
    return found


def _top_level_imports(path: Path) -> set[str]:
    """The top-level packages a file imports from (`a` for `import a.b` and `from a.b import c`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _floor(module: str) -> int:
    if module in TOP_MODULES:
        return -1
    package = module.split(".")[1]
    for index, floor in enumerate(LAYERS):
        if package in floor:
            return index
    raise AssertionError(f"{module}: package {package!r} stands on no floor; add it to LAYERS")


def test_every_package_stands_on_a_floor() -> None:
    packages = {p.name for p in (SRC / "shoal").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    placed = {package for floor in LAYERS for package in floor}
    assert packages == placed, f"on no floor: {sorted(packages - placed)}; gone: {sorted(placed - packages)}"
    loose = [p.name for p in (SRC / "shoal").glob("*.py") if p.stem not in ("__init__", "__main__")]
    assert not loose, f"modules outside every package: {loose}"


def test_no_import_runs_back_up() -> None:
    upward = [f"{importer} -> {imported}"
              for importer, imports in _graph().items()
              for imported in sorted(imports)
              if _floor(imported) < _floor(importer)]
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)


def test_only_the_http_edge_imports_a_web_framework() -> None:
    """Below http/ nothing imports FastAPI, Starlette or uvicorn: serving and access are used
    the same way from a route, a test or a benchmark."""
    found = [f"{name} imports {', '.join(sorted(frameworks))}"
             for name, path in _modules().items()
             if name not in TOP_MODULES and name.split(".")[1] in NO_WEB_FRAMEWORK
             and (frameworks := _top_level_imports(path) & WEB_FRAMEWORKS)]
    assert not found, "\n".join(found)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_no_import_circles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    described = []
    for members in cycles:
        ties = [f"  {a} -> {b}" for a in members for b in sorted(graph[a]) if b in members]
        described.append(f"circle of {len(members)}:\n" + "\n".join(ties))
    assert not cycles, "\n".join(described)


def test_the_checks_see_what_they_should() -> None:
    """The reader is not blind: it sees known arrows, relative imports and function-local ones."""
    graph = _graph()
    assert "shoal.engine.scheduler" in graph["shoal.engine.core"]
    assert "shoal.core.errors" in graph["shoal.model.config"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _floor("shoal.http.app") < _floor("shoal.serving.generate") < _floor("shoal.core.errors")
    assert "fastapi" in _top_level_imports(SRC / "shoal" / "http" / "app.py")
    assert set(NO_WEB_FRAMEWORK) < {p for floor in LAYERS for p in floor}


@pytest.mark.parametrize("package", [p for floor in LAYERS for p in floor])
def test_each_package_says_what_it_is(package: str) -> None:
    init = SRC / "shoal" / package / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc, f"{init} has no docstring saying what the package holds"


def test_no_package_is_imported_by_its_floor_in_both_directions() -> None:
    """Two packages on one floor may lean on each other only one way."""
    pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
    for importer, imports in _graph().items():
        for imported in imports:
            a, b = importer.split(".")[1:2], imported.split(".")[1:2]
            if a and b and a != b and _floor(importer) == _floor(imported):
                pairs[(a[0], b[0])].append(f"{importer} -> {imported}")
    both = [f"{x} <-> {y}: {pairs[(x, y)][0]} / {pairs[(y, x)][0]}" for (x, y) in pairs if (y, x) in pairs and x < y]
    assert not both, "\n".join(both)
